"""AWQ's steps one by one (the scale search, the fold, the clip, the rounding) on 64x64
problems, and the ``grid`` option that chooses the rule of the rounding."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pocketlm import PocketError
from pocketlm import weights as W
from pocketlm.quant import group_grid, round_to_grid
from pocketlm.testing import make_context
from pocketlm.testing.models import tiny_model, tiny_windows
from pocketlm_awq.awq import (
    AWQOptions,
    awq_scales,
    clip_weight,
    compress,
    fold_scales,
    input_importance,
    linear_scale_loss,
    quantize_weight,
    scale_search,
    weight_mean,
)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _problem(outliers: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``[512, 64]`` and a weight ``[64, 64]``; with ``outliers`` four input channels are
    20 times larger than the rest (the salient channels AWQ protects)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=generator)
    if outliers:
        x[:, [3, 17, 40, 63]] *= 20
    return x, torch.randn(64, 64, generator=generator)


# ------------------------------------------------------------------------------ the scale search


@pytest.mark.parametrize("outliers", [False, True])
def test_the_chosen_scale_never_loses_to_plain_rounding(outliers):
    x, w = _problem(outliers)
    loss = linear_scale_loss(x, [w], bits=4, group_size=32, symmetric=False)
    choice = scale_search(x.abs().mean(0), [w], loss, group_size=32, duo_scaling=True, n_grid=20)
    assert sorted(a for a in choice.errors if a is not None) == [i / 20 for i in range(20)]
    plain = loss(torch.ones(64))   # alpha = 0 without duo scaling: the identity, plain rounding
    assert choice.errors[None] == plain
    chosen = loss(choice.scales)
    assert chosen == min(choice.errors.values())
    assert chosen <= plain and chosen <= choice.errors[0.0]
    if outliers:   # the salient channels are protected: a real gain, by a scale that is not the identity
        assert choice.alpha is not None and choice.alpha > 0
        assert chosen < 0.8 * plain, (chosen, plain)
        salient = choice.scales[[3, 17, 40, 63]]
        assert salient.min() > choice.scales.median()


def test_the_search_without_duo_scaling_uses_the_activation_scale_alone():
    x, w = _problem(outliers=True)
    loss = linear_scale_loss(x, [w], bits=4, group_size=32, symmetric=False)
    choice = scale_search(x.abs().mean(0), [w], loss, group_size=32, duo_scaling=False, n_grid=20)
    assert choice.alpha is not None
    expected = awq_scales(x.abs().mean(0), None, choice.alpha)
    assert torch.equal(choice.scales, expected)
    with_duo = awq_scales(x.abs().mean(0), weight_mean([w], 32), choice.alpha)
    assert not torch.equal(choice.scales, with_duo)


# ------------------------------------------------------------------------------ the fold


def test_folding_into_a_linear_keeps_the_float32_output_within_1e_5():
    torch.manual_seed(1)
    prev, nxt = nn.Linear(64, 64), nn.Linear(64, 32)
    x, _ = _problem(outliers=True)
    reference = nxt(prev(x)).detach()
    scales = awq_scales(x.abs().mean(0), weight_mean([nxt.weight.detach()], 32), 0.5)
    assert (scales.max() / scales.min()) > 2   # a scale that really moves the weights
    fold_scales(prev, [nxt], scales)
    assert (nxt(prev(x)).detach() - reference).abs().max() <= 1e-5


def test_folding_into_a_norm_keeps_the_float32_output_within_1e_5():
    torch.manual_seed(2)
    norm, first, second = nn.LayerNorm(64), nn.Linear(64, 64), nn.Linear(64, 64, bias=False)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    x, _ = _problem(outliers=False)
    references = [first(norm(x)).detach(), second(norm(x)).detach()]
    scales = awq_scales(torch.rand(64) + 0.1, None, 0.7)
    fold_scales(norm, [first, second], scales)
    for linear, reference in zip((first, second), references):
        assert (linear(norm(x)).detach() - reference).abs().max() <= 1e-5


# ------------------------------------------------------------------------------ the clip and the rounding


def test_clipping_lowers_the_output_error_of_the_rounding():
    x, w = _problem(outliers=False)
    options = AWQOptions(bits=3, group_size=32)
    clipped = clip_weight(w, x, options)
    changed = (clipped != w).reshape(64, 2, 32).any(-1)   # [rows, groups] that were clipped
    assert changed.sum() > 0 and (clipped.abs() <= w.abs()).all()

    def error(weight: torch.Tensor) -> float:
        q, scales, zeros = quantize_weight(weight, options)
        dequantized = W.QuantizedLinear.from_grid(q, scales, zeros, bits=3, group_size=32, symmetric=False).dequantize()
        return (x @ dequantized.t() - x @ w.t()).pow(2).mean().item()

    assert error(clipped) < error(w)


def test_the_rounding_is_the_named_rule_and_min_max_by_default():
    x, w = _problem(outliers=True)
    options = AWQOptions(bits=4, group_size=32)
    plain = quantize_weight(w, options)
    expected = round_to_grid(w, 4, 32, False)
    assert all(torch.equal(a, b) for a, b in zip(plain, expected))
    assert torch.equal(plain.scales, group_grid(w, 4, 32, False)[0])

    from pocketlm.grids import weighted_group_grid

    importance = input_importance(x)
    assert torch.allclose(importance, x.pow(2).mean(0))
    weighted = quantize_weight(w, options, fit=weighted_group_grid, importance=importance)
    assert not torch.equal(weighted.scales, plain.scales)
    assert torch.equal(weighted.q, round_to_grid(w, 4, 32, False, fit=weighted_group_grid, importance=importance).q)


# ------------------------------------------------------------------------------ the grid option


def _output_error(reference, model, windows) -> float:
    with torch.no_grad():
        a = reference(windows, output_hidden_states=True).hidden_states[-1]
        b = model(windows, output_hidden_states=True).hidden_states[-1]
    return ((a - b).pow(2).mean() / a.pow(2).mean()).item()


def _grids(model) -> dict[str, W.QuantizedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, W.QuantizedLinear)}


def test_a_weighted_mse_grid_is_valid_different_and_no_worse_than_minmax():
    original = tiny_model("llama", outliers=True)
    windows = tiny_windows(8, 32)
    results = {}
    for grid in ("minmax", "weighted-mse"):
        logs: list[str] = []
        context = make_context(windows)
        context.logger = logs.append
        results[grid] = compress(copy.deepcopy(original), AWQOptions(bits=4, group_size=32, grid=grid), context)
        assert any("awq: 2 layers" in m and (grid == "minmax") != ("grid weighted-mse" in m) for m in logs), logs
    minmax, weighted = _grids(results["minmax"]), _grids(results["weighted-mse"])
    assert minmax.keys() == weighted.keys() and len(minmax) == 14
    differing = 0
    for name, module in weighted.items():
        storage = module.storage
        q = storage.grid()
        assert int(q.min()) >= 0 and int(q.max()) <= 15, name
        assert torch.isfinite(storage.scales.float()).all() and (storage.scales.float() > 0).all(), name
        assert torch.isfinite(module.dequantize()).all(), name
        differing += not torch.equal(storage.scales, minmax[name].storage.scales)
    assert differing >= len(weighted) // 2, differing
    errors = {grid: _output_error(original, model, windows) for grid, model in results.items()}
    assert 0 < errors["weighted-mse"] <= 1.1 * errors["minmax"], errors


def test_an_unknown_grid_is_refused_naming_the_field_before_any_work():
    model = tiny_model("llama")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PocketError) as caught:
        compress(model, AWQOptions(bits=4, group_size=32, grid="no-such-rule"), make_context(tiny_windows(2, 32)))
    assert caught.value.field == "grid"
    assert "unknown grid rule 'no-such-rule'" in str(caught.value)
    assert "minmax" in caught.value.fix and "weighted-mse" in caught.value.fix
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_llmcompressor_backend_refuses_another_grid():
    with pytest.raises(PocketError) as caught:
        compress(tiny_model("llama"), AWQOptions(bits=4, group_size=32, grid="weighted-mse", backend="llmcompressor",
                                                 clip=False, search_tokens=None),
                 make_context(tiny_windows(2, 32)))
    assert caught.value.field == "grid" and "min-max grids only" in str(caught.value)


def test_the_default_grid_is_minmax():
    assert AWQOptions().grid == "minmax"
