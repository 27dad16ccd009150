"""AWQ on encoders: BERT-family layers are post-norm, so the only exact fold is v -> o; AWQ
searches it, quantizes every layer linear, and leaves the pooler (outside the layers) in float."""

from __future__ import annotations

import copy

import pytest
import torch

from pocketlm import weights as W
from pocketlm.modules import find_architecture, get_module
from pocketlm.plugins import get_plugins
from pocketlm.testing import make_context
from pocketlm.testing.models import tiny_model, tiny_windows
from pocketlm_awq.awq import AWQOptions, compress, fold_scales


def _relative_error(reference, model, windows) -> float:
    with torch.no_grad():
        a = reference(windows, output_hidden_states=True).hidden_states[-1]
        b = model(windows, output_hidden_states=True).hidden_states[-1]
    return ((a - b).pow(2).mean() / a.pow(2).mean()).item()


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_folding_v_into_o_leaves_an_encoder_unchanged(family):
    model = tiny_model(family, outliers=True)
    reference = copy.deepcopy(model)
    architecture = find_architecture(model, get_plugins().architectures)
    assert [s.prev for s in architecture.smooth] == [architecture.attention["v"]]
    for layer in get_module(model, architecture.layers):
        (smooth,) = architecture.smooth
        scales = torch.rand(64, generator=torch.Generator().manual_seed(0)) * 3 + 0.2
        fold_scales(get_module(layer, smooth.prev), [get_module(layer, n) for n in smooth.linears], scales)
    windows = tiny_windows(2, 32, seed=3)
    assert _relative_error(reference, model, windows) < 1e-10


@pytest.mark.parametrize("family", ["bert", "distilbert", "bert-mlm"])
def test_awq_quantizes_every_layer_linear_of_an_encoder_and_leaves_the_rest(family):
    reference = tiny_model(family, outliers=True)
    model, logs = copy.deepcopy(reference), []
    context = make_context(tiny_windows(8, 32))
    context.logger = logs.append
    compress(model, AWQOptions(bits=4, group_size=32), context)
    architecture = find_architecture(model, get_plugins().architectures)
    quantized = {n for n, m in model.named_modules() if isinstance(m, W.QuantizedLinear)}
    in_layers = {n for n, m in reference.named_modules() if W.is_linear(m) and n.startswith(architecture.layers + ".")}
    assert quantized == in_layers
    outside = {n for n, m in reference.named_modules() if W.is_linear(m)} - in_layers
    if outside - {architecture.lm_head}:
        assert any("outside the layers; left in float" in line for line in logs)
    assert _relative_error(reference, model, tiny_windows(4, 32, seed=1)) < 0.05


def test_naming_a_linear_outside_the_layers_is_still_an_error():
    from pocketlm import PocketError

    with pytest.raises(PocketError, match="outside them: pooler.dense"):
        compress(tiny_model("bert"), AWQOptions(group_size=32, targets=["*.dense"]), make_context(tiny_windows(8, 32)))
