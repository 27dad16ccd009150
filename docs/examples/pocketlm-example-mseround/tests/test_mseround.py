"""Tests of the grid rule: error below min-max on heavy-tailed weights, never above it, and
real grids from rtn and gptq on a tiny model."""

import pytest
import torch

from pocketlm.quant import dequantize_grid, group_grid, round_to_grid
from pocketlm.testing import make_context
from pocketlm.testing.models import tiny_model, tiny_windows
from pocketlm.weights import QuantizedLinear, linear_weight

from pocketlm_example_mseround import mseround


def squared_error(weight, bits, group_size, fit=None):
    q, scales, zeros = round_to_grid(weight, bits, group_size, True, fit=fit)
    return float((dequantize_grid(q, scales, zeros, group_size) - weight).pow(2).sum())


@pytest.mark.parametrize("bits,ratio", [(3, 0.85), (4, 0.9)])
def test_error_is_clearly_below_min_max_on_heavy_tailed_weights(bits, ratio):
    torch.manual_seed(0)
    weight = torch.distributions.StudentT(3.0).sample((64, 128)) * 0.02
    assert squared_error(weight, bits, 32, mseround.mse_grid) < ratio * squared_error(weight, bits, 32)


def test_never_worse_than_min_max_and_min_max_is_the_first_candidate():
    torch.manual_seed(1)
    weight = torch.randn(16, 64)
    assert squared_error(weight, 4, -1, mseround.mse_grid) <= squared_error(weight, 4, -1) + 1e-9
    scales, zeros = mseround.mse_grid(weight, 4, 32)
    minmax_scales, _ = group_grid(weight, 4, 32, True)
    assert (scales <= minmax_scales).all() and (zeros == 8).all()


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_rtn_and_gptq_quantize_with_the_rule(method):
    from pocketlm.plugins import get_plugins

    plugins = get_plugins()
    if method not in plugins.methods:
        pytest.skip("needs pocketlm-gptq")
    model = tiny_model("llama")
    before = {n: linear_weight(m).clone() for n, m in model.named_modules()
              if type(m).__name__ == "Linear" and "lm_head" not in n}
    spec = plugins.methods[method]
    spec.compress(model, spec.options(bits=4, group_size=32, grid="mse"), make_context(tiny_windows(4, 32)))
    for name, reference in before.items():
        module = model.get_submodule(name)
        assert isinstance(module, QuantizedLinear) and module.bits == 4 and (module.storage.zeros == 8).all()
        # 4-bit symmetric grid, group 32: relative error well under 20% per layer
        assert (linear_weight(module) - reference).norm() < 0.2 * reference.norm()
