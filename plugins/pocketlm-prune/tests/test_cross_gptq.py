"""Masks survive a following quantization stage (the gptq plugin, when installed)."""

import pytest
import torch

pytest.importorskip("pocketlm_gptq")

from pocketlm.plugins import get_plugins  # noqa: E402
from pocketlm.testing import make_context  # noqa: E402
from pocketlm.testing.models import tiny_model, tiny_windows  # noqa: E402
from pocketlm.weights import get_mask, is_quantized, linear_weight, masks  # noqa: E402


@pytest.mark.parametrize("family,options", [("llama", {"sparsity": 0.5}), ("gpt2", {"pattern": "2:4"})])
def test_sparsegpt_masks_survive_gptq(family, options):
    methods = get_plugins().methods
    if "gptq" not in methods:
        pytest.skip("the gptq plugin is installed but did not load")
    model = tiny_model(family)
    windows = tiny_windows(4, 32)
    methods["sparsegpt"].compress(model, methods["sparsegpt"].options(**options), make_context(windows))
    pruned = {name: mask.clone() for name, mask in masks(model).items()}
    gptq = methods["gptq"]
    gptq.compress(model, gptq.options(), make_context(windows))
    for name, mask in pruned.items():
        module = model.get_submodule(name)
        assert is_quantized(module), name
        assert torch.equal(get_mask(module), mask), name
        assert (linear_weight(module)[~mask] == 0).all(), name
        assert (linear_weight(module)[mask] != 0).float().mean() > 0.5, name
