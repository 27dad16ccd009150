"""The pure tensor functions of rtn and gptq on a random 64x64 matrix."""

from __future__ import annotations

import pytest
import torch

from pocketlm.weights import QuantizedLinear
from pocketlm_gptq.gptq import gptq_quantize, hessian_update
from pocketlm_gptq.rtn import dequantize_grid, group_grid, rtn_quantize


@pytest.fixture(scope="module")
def problem():
    generator = torch.Generator().manual_seed(0)
    W = torch.randn(64, 64, generator=generator)
    # correlated inputs with a few loud channels, like a transformer's
    X = torch.randn(2048, 64, generator=generator) @ (0.3 * torch.randn(64, 64, generator=generator))
    X[:, :4] *= 8
    H, n = None, 0
    for chunk in X.split(500):
        H, n = hessian_update(H, n, chunk)
    return W, X, H


def output_error(W, Q, X):
    return ((W - Q) @ X.t()).norm().item()


def test_hessian_is_two_over_n_xxt(problem):
    W, X, H = problem
    torch.testing.assert_close(H, 2 / X.shape[0] * X.t() @ X, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_rounds_to_nearest_grid_point(problem, bits, group_size, symmetric):
    W = problem[0]
    q, scales, zeros = rtn_quantize(W, bits, group_size, symmetric)
    assert q.dtype == torch.int32 and int(q.min()) >= 0 and int(q.max()) <= 2**bits - 1
    assert scales.shape == zeros.shape == (64, 1 if group_size == -1 else 2)
    assert torch.equal(scales, scales.half().float())  # float16-representable
    Wq = dequantize_grid(q, scales, zeros, group_size)
    step = scales.repeat_interleave(64 if group_size == -1 else group_size, 1)
    # nearest point of a grid that covers W (up to the float16 rounding of the scale)
    assert bool(((Wq - W).abs() <= step * (0.5 + 2 ** (bits - 1) / 1024) + 1e-6).all())
    if symmetric:
        assert bool((zeros == 2 ** (bits - 1)).all())


def test_group_grid_handles_a_partial_last_group():
    W = torch.randn(8, 80)
    scales, zeros = group_grid(W, 4, 32, False)
    assert scales.shape == (8, 3)
    q, s, z = rtn_quantize(W, 4, 32, False)
    assert ((dequantize_grid(q, s, z, 32) - W).abs().max() <= s.max() / 2 + 1e-6)


@pytest.mark.parametrize("bits,group_size", [(4, -1), (4, 32), (3, 32), (2, 32), (8, -1)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_the_layer_output(problem, bits, group_size, act_order):
    W, X, H = problem
    q, scales, zeros, g_idx = gptq_quantize(W, H, bits, group_size, True, act_order=act_order, block_size=16)
    assert g_idx is None  # static groups: plain group index even with act_order
    rq, rs, rz = rtn_quantize(W, bits, group_size, True)
    gptq_error = output_error(W, dequantize_grid(q, scales, zeros, group_size), X)
    rtn_error = output_error(W, dequantize_grid(rq, rs, rz, group_size), X)
    assert gptq_error < 0.85 * rtn_error, (gptq_error, rtn_error)


def test_gptq_block_size_only_changes_the_schedule(problem):
    W, X, H = problem
    a = gptq_quantize(W, H, 4, -1, True, block_size=8)
    b = gptq_quantize(W, H, 4, -1, True, block_size=64)
    # same algorithm, different lazy-batch size: float reassociation may flip a few roundings
    assert (a[0] != b[0]).float().mean() < 0.01


def test_gptq_keeps_pruned_weights_at_exactly_zero(problem):
    W, X, H = problem
    mask = torch.rand(64, 64, generator=torch.Generator().manual_seed(1)) > 0.5
    for act_order in (False, True):
        for symmetric in (True, False):
            q, scales, zeros, _ = gptq_quantize(W * mask, H, 4, 32, symmetric, act_order=act_order, mask=mask)
            Wq = dequantize_grid(q, scales, zeros, 32)
            assert int((Wq[~mask] != 0).sum()) == 0
            assert float((Wq[mask] != 0).float().mean()) > 0.85


def test_dead_input_columns_are_handled(problem):
    W, X, H = problem
    X = X.clone()
    X[:, 5] = 0
    H0, _ = hessian_update(None, 0, X)
    q, scales, zeros, _ = gptq_quantize(W, H0, 4, 32, True)
    assert torch.isfinite(dequantize_grid(q, scales, zeros, 32)).all()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_grid_packs_into_quantized_linear_exactly(problem, bits):
    W, X, H = problem
    q, scales, zeros, _ = gptq_quantize(W, H, bits, 32, False)
    module = QuantizedLinear.from_grid(q, scales, zeros, bits=bits, group_size=32, symmetric=False)
    assert torch.equal(module.storage.grid().to(torch.int32), q)
    assert torch.equal(module.dequantize(), dequantize_grid(q, scales, zeros, 32))
    assert module.storage.qweight.shape == (64, 2 * bits)  # 64 values of `bits` bits in int32 words


@pytest.mark.parametrize("cols", [64, 576, 1000])
def test_the_blocked_gram_update_equals_the_full_product(cols):
    """add_gram computes each off-diagonal block once and mirrors it: same H as x^T x."""
    from pocketlm_gptq.gptq import add_gram

    torch.manual_seed(0)
    x = torch.randn(200, cols)
    start = torch.randn(cols, cols)
    H = start + start.t()
    expected = H + x.t() @ x
    add_gram(H, x)
    torch.testing.assert_close(H, expected, rtol=1e-5, atol=1e-3)
    assert torch.equal(H, H.t())

