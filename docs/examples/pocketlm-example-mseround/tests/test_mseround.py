"""Tests of the algorithm: error below plain round-to-nearest, real grids on a tiny model."""

import pytest
import torch

from pocketlm import PocketError
from pocketlm.testing import make_context
from pocketlm.testing.models import tiny_model
from pocketlm.weights import QuantizedLinear, linear_weight, minmax_grid, quantize

from pocketlm_example_mseround import mseround


def rtn_error(weight, bits, group_size):
    total = 0.0
    for start in range(0, weight.shape[1], group_size):
        block = weight[:, start:start + group_size]
        scale, zero = minmax_grid(block, bits, True)
        total += float((((quantize(block, scale, zero, bits) - zero) * scale) - block).pow(2).sum())
    return total


@pytest.mark.parametrize("bits", [3, 4])
def test_error_is_clearly_below_round_to_nearest_on_heavy_tailed_weights(bits):
    torch.manual_seed(0)
    weight = torch.distributions.StudentT(3.0).sample((64, 128)) * 0.02
    q, scales, zeros = mseround.mse_grid(weight, bits, 32)
    ours = mseround.rounding_error(weight, q, scales, zeros, 32)
    assert ours < 0.9 * rtn_error(weight, bits, 32)
    assert q.min() >= 0 and q.max() <= 2**bits - 1


def test_never_worse_than_round_to_nearest():
    torch.manual_seed(1)
    weight = torch.randn(16, 64)
    q, scales, zeros = mseround.mse_grid(weight, 4, -1, grid=5)
    assert mseround.rounding_error(weight, q, scales, zeros, -1) <= rtn_error(weight, 4, 64) + 1e-9


def test_quantizes_every_targeted_linear_and_keeps_the_head(tiny_family):
    model = tiny_model(tiny_family)
    head = model.get_output_embeddings().weight.clone()
    before = {n: linear_weight(m).clone() for n, m in model.named_modules()
              if type(m).__name__ in ("Linear", "Conv1D") and "lm_head" not in n}
    mseround.compress(model, mseround.MSERoundOptions(bits=4, group_size=32), make_context())
    for name, reference in before.items():
        module = model.get_submodule(name)
        assert isinstance(module, QuantizedLinear) and module.bits == 4
        # 4-bit symmetric grid, group 32: relative error well under 20% per layer
        assert (linear_weight(module) - reference).norm() < 0.2 * reference.norm()
    assert torch.equal(model.get_output_embeddings().weight, head)


def test_a_group_size_that_does_not_divide_is_refused():
    model = tiny_model("llama")  # widths 64 and 128
    with pytest.raises(PocketError, match="does not divide"):
        mseround.compress(model, mseround.MSERoundOptions(group_size=128), make_context())
