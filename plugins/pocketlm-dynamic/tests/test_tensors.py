"""The pure tensor functions, each checked on a random 64x64 matrix."""

import copy
import io

import pytest
import torch

from pocketlm_dynamic.decode import gather_matvec
from pocketlm_dynamic.kernel import gather_matvec as compiled_gather, gather_matvec_low_rank, load
from pocketlm_dynamic.sparsity import (greedy_allocation, greedy_search, low_rank_correction, low_rank_factors,
                                       relative_error, skipped_fraction, sparsify, threshold_for, thresholds_at)


def _x(seed=0):
    return torch.randn(64, 64, generator=torch.Generator().manual_seed(seed))


def test_sparsify_at_zero_is_identity_and_zeroes_below_threshold():
    x = _x()
    x[0, :5] = 0
    assert torch.equal(sparsify(x, 0.0), x)
    y = sparsify(x, 0.5)
    assert torch.equal(y[x.abs() > 0.5], x[x.abs() > 0.5]) and not y[x.abs() <= 0.5].any()


def test_threshold_for_reaches_the_requested_fraction():
    x = _x()
    for s in (0.25, 0.4, 0.5, 0.95):
        t = threshold_for(x.abs(), s)
        assert abs(skipped_fraction(x, t) - s) < 1 / x.numel() + 1e-9
    assert threshold_for(x.abs(), 0.0) == 0.0
    sampled = thresholds_at(x.abs(), [0.0, 0.4, 0.5], sample=1 << 20)
    assert sampled[0] == 0.0 and sampled[1] == threshold_for(x.abs(), 0.4)


def test_low_rank_correction_is_exact_at_full_rank_and_its_error_falls_with_rank():
    w, x = _x(1), _x(2)
    t = threshold_for(x.abs(), 0.5)
    skipped = x - sparsify(x, t)
    dropped = skipped @ w.t()                        # what the skipped inputs would have added
    a, b = low_rank_factors(w, 64)
    assert a.shape == (64, 64) and b.shape == (64, 64) and torch.allclose(a @ b, w, atol=1e-4)
    assert torch.allclose(low_rank_correction(skipped, a, b), dropped, atol=1e-4)
    errors = []
    for rank in (0, 8, 16, 32, 48):
        a, b = low_rank_factors(w, rank)
        assert a.shape == (64, rank) and b.shape == (rank, 64)
        errors.append(float((dropped - low_rank_correction(skipped, a, b)).norm() / dropped.norm()))
    assert errors[0] == pytest.approx(1.0) and errors == sorted(errors, reverse=True) and errors[-1] < 0.6
    assert low_rank_factors(w[:, :20], 64)[0].shape == (64, 20)  # the rank is at most the weight's


def test_relative_error_is_zero_dense_and_grows_with_sparsity():
    w, x = _x(1), _x(2)
    errors = [relative_error(w, x, threshold_for(x.abs(), s)) for s in (0.0, 0.25, 0.5, 0.75)]
    assert errors[0] == 0.0 and errors == sorted(errors) and errors[-1] < 1


def test_greedy_allocation_spends_sparsity_where_it_costs_least():
    levels = [i * 0.05 for i in range(20)]
    cheap = [0.1 * s for s in levels]
    dear = [10.0 * s for s in levels]
    sizes = {"cheap": 64 * 64, "dear": 64 * 64}
    got = greedy_allocation({"cheap": cheap, "dear": dear}, sizes, 0.4)
    assert abs(sum(got[n] * sizes[n] for n in got) / sum(sizes.values()) - 0.4) < 1e-9
    assert got["cheap"] > got["dear"] and got["cheap"] == 0.8
    # Equal costs, unequal sizes: the weighted mean still lands on the target.
    got = greedy_allocation({"a": cheap, "b": cheap}, {"a": 100, "b": 300}, 0.33)
    assert abs((got["a"] * 100 + got["b"] * 300) / 400 - 0.33) < 1e-9


def test_greedy_search_keeps_the_cheapest_candidate_per_weight_on_the_block_error():
    # The block error is not a sum: raising "a" once makes every step of "b" dear, so the search
    # must measure each candidate on the block as it stands, not on a per-candidate curve.
    calls = []

    def error(levels):
        calls.append(dict(levels))
        return 10.0 * levels["a"] * levels["b"] + 0.1 * levels["a"] + 0.1 * levels["b"]

    got = greedy_search({"a": 100, "b": 100}, error, 0.49)
    # a tie at the first step goes to the first candidate; after that "a" is always cheaper,
    # up to its top level (0.95), and the last step, on "b", is taken in part to land on 0.49
    assert abs(got["a"] - 0.95) < 1e-9 and abs(got["b"] - 0.03) < 1e-9
    assert abs((got["a"] + got["b"]) / 2 - 0.49) < 1e-9
    # each step tries every candidate below the top once: 19 steps of two, then one for the last
    assert len(calls) == 19 * 2 + 1 and calls[1] == {"a": 0, "b": 1} and calls[-1] == {"a": 19, "b": 1}


def test_greedy_search_weighs_the_added_error_by_the_weights_skipped():
    # "big" adds twice the error of "small" per step but skips four times the weights: it is the
    # cheaper per weight, and it takes every step until the target
    got = greedy_search({"small": 100, "big": 400}, lambda lv: 1.0 * lv["small"] + 2.0 * lv["big"], 0.4)
    assert got == {"small": 0.0, "big": 0.5}
    # an oracle with no cost left anywhere (every candidate at its top) stops short of the target
    assert greedy_search({"x": 10}, lambda lv: 0.0, 0.95, top=0.5) == {"x": 0.5}


def test_gather_matvec_reads_only_surviving_rows_and_matches_the_rule():
    w_t, x = _x(3).contiguous(), _x(4)[0]
    t = threshold_for(x.abs(), 0.5)
    expected = sparsify(x, t) @ w_t
    assert torch.allclose(gather_matvec(x, w_t, t), expected, atol=1e-5)
    poisoned = w_t.clone()
    poisoned[x.abs() <= t] = float("nan")  # rows of skipped inputs must never be read
    assert torch.allclose(gather_matvec(x, poisoned, t), expected, atol=1e-5)
    fn = load()
    if fn is not None:  # the compiled kernel, where a C compiler is present
        assert torch.allclose(compiled_gather(fn, x, poisoned, t), expected, atol=1e-5)
        assert torch.allclose(compiled_gather(fn, x, w_t, 0.0), x @ w_t, atol=1e-5)


@pytest.mark.parametrize("out_features", [1, 5, 64])
def test_compiled_kernel_for_any_count_of_surviving_rows_and_any_split(out_features):
    # the kernel adds surviving rows eight at a time and the rest one by one, and splits the
    # output columns between threads: every count of survivors and every split must agree
    fn = load()
    if fn is None:
        pytest.skip("no C compiler: the decode path uses PyTorch operations")
    generator = torch.Generator().manual_seed(5)
    w_t = torch.randn(64, out_features, generator=generator)
    x = torch.randn(64, generator=generator)
    ordered = x.abs().sort().values
    threads = torch.get_num_threads()
    try:
        for survivors in (0, 1, 7, 8, 9, 16, 23, 63, 64):
            t = 0.0 if survivors == 64 else float(ordered[63 - survivors])
            assert int((x.abs() > t).sum()) == survivors
            poisoned = w_t.clone()
            poisoned[x.abs() <= t] = float("nan")
            for count in (1, 2, 3):
                torch.set_num_threads(count)
                got = compiled_gather(fn, x, poisoned, t)
                assert torch.allclose(got, sparsify(x, t) @ w_t, atol=1e-5), (survivors, count)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("compiled", [True, False])
def test_decode_linear_reads_a_threshold_loaded_into_it(compiled):
    # the decode path keeps its threshold as a Python float for speed: loading a state dict
    # must still change what it skips
    from pocketlm_dynamic.decode import SparseDecodeLinear

    w_t, x = _x(3).contiguous(), _x(4)[0]
    low, high = threshold_for(x.abs(), 0.25), threshold_for(x.abs(), 0.75)
    module = SparseDecodeLinear(w_t, None, low, compiled=compiled)
    assert torch.allclose(module(x[None, None]), (sparsify(x, low) @ w_t)[None, None], atol=1e-5)
    module.load_state_dict({**module.state_dict(), "threshold": torch.tensor(float(high))})
    assert torch.allclose(module(x[None, None]), (sparsify(x, high) @ w_t)[None, None], atol=1e-5)
    copied = copy.deepcopy(module)   # a decode model copies and saves like any module
    assert torch.allclose(copied(x[None, None]), (sparsify(x, high) @ w_t)[None, None], atol=1e-5)
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.allclose(loaded(x[None, None]), (sparsify(x, high) @ w_t)[None, None], atol=1e-5)


@pytest.mark.skipif(load() is None, reason="no C compiler: the decode path uses PyTorch operations")
def test_compiled_low_rank_gather_adds_the_skipped_inputs_through_the_factors():
    w, x = _x(3)[:, :48], _x(4)[0, :48]     # a 64 x 48 weight stored [48, 64]
    x[:3] = 0.0                             # exact zeros are neither kept nor corrected
    t = threshold_for(x.abs(), 0.4)
    a, b = low_rank_factors(w, 12)
    expected = sparsify(x, t) @ w.t() + low_rank_correction(x - sparsify(x, t), a, b)
    got = gather_matvec_low_rank(load(), x, w.t().contiguous(), b.t().contiguous(), a.t().contiguous(), t)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, sparsify(x, t) @ w.t(), atol=1e-3)
