"""The ``grid`` option of rtn and gptq: min-max stays bit for bit what it was, and other rules
are called through the plugins' grid-rule table."""

from __future__ import annotations

import copy

import pytest
import torch

import pocketlm
from pocketlm.plugins import get_plugins
from pocketlm.testing.models import tiny_model
from pocketlm.weights import QuantizedLinear
from pocketlm_gptq.gptq import GPTQOptions, compress_gptq, gptq_quantize, hessian_update
from pocketlm_gptq.rtn import RTNOptions, compress_rtn, group_grid, rtn_quantize

from conftest import capture_linear_inputs


def _problem(seed):
    generator = torch.Generator().manual_seed(seed)
    W = torch.randn(64, 128, generator=generator) * torch.rand(1, 128, generator=generator) * 3
    X = torch.randn(1024, 128, generator=generator)
    X[:, :6] *= 10                                    # a few loud input channels
    H, _ = hessian_update(None, 0, X)
    return W, H


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 32, True), (3, 64, False), (8, -1, True), (2, 128, False)])
def test_minmax_rule_gives_the_grids_of_before_bit_for_bit(seed, bits, group_size, symmetric):
    W, H = _problem(seed)
    minmax = get_plugins().grid_rules["minmax"].fit
    # rtn: the rule's grid is exactly the hard-coded group grid
    before, after = group_grid(W, bits, group_size, symmetric), minmax(W, bits, group_size, symmetric)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    for a, b in zip(rtn_quantize(W, bits, group_size, symmetric), rtn_quantize(W, bits, group_size, symmetric, fit=minmax)):
        assert torch.equal(a, b)
    # gptq with act-order: static grids from the rule equal the built-in ones
    old = gptq_quantize(W, H, bits, group_size, symmetric, act_order=True)
    new = gptq_quantize(W, H, bits, group_size, symmetric, act_order=True, fit=minmax)
    for a, b in zip(old[:3], new[:3]):
        assert torch.equal(a, b)


def test_default_grid_is_minmax_and_unchanged_through_the_stage(context):
    model = tiny_model("llama")
    a = compress_rtn(copy.deepcopy(model), RTNOptions(bits=4, group_size=32), context)
    b = compress_rtn(copy.deepcopy(model), RTNOptions(bits=4, group_size=32, grid="minmax"), context)
    assert RTNOptions().grid == "minmax"
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def _layer_error(original, quantized, inputs):
    modules = dict(quantized.named_modules())
    total = 0.0
    for name, module in original.named_modules():
        if name in inputs:
            X = inputs[name]
            W, Q = module.weight.data, modules[name].dequantize()
            total += float(((W - Q) @ X.t()).norm() / (W @ X.t()).norm())
    return total


def test_weighted_mse_grid_lowers_gptq_layer_error_on_outlier_activations(windows, context):
    original = tiny_model("llama", outliers=True)
    inputs = capture_linear_inputs(original, windows)
    errors = {}
    for grid in ("minmax", "weighted-mse"):
        gptq = compress_gptq(copy.deepcopy(original), GPTQOptions(bits=3, group_size=32, grid=grid), context)
        assert all(m.bits == 3 for m in gptq.modules() if isinstance(m, QuantizedLinear))
        errors[grid] = _layer_error(original, gptq, inputs)
    assert errors["weighted-mse"] < errors["minmax"]


def test_an_unknown_grid_rule_is_refused_when_the_stage_runs(context):
    with pytest.raises(pocketlm.PocketError) as error:
        compress_rtn(tiny_model("llama"), RTNOptions(grid="nope"), context)
    assert "unknown grid rule 'nope'" in str(error.value) and "minmax" in error.value.fix


def test_llmcompressor_backend_refuses_other_grids():
    with pytest.raises(ValueError, match="min-max grids only"):
        GPTQOptions(backend="llmcompressor", grid="weighted-mse")


def test_rtn_weighs_an_importance_rule_by_calibration_activations(windows, context):
    from pocketlm.testing import make_context

    original = tiny_model("llama", outliers=True)
    inputs = capture_linear_inputs(original, windows)
    lines = []
    with_data = make_context(windows)
    with_data.logger = lines.append
    weighted = compress_rtn(copy.deepcopy(original), RTNOptions(bits=3, group_size=32, grid="weighted-mse"), with_data)
    assert "weighted by calibration activations" in lines[-1]
    without = make_context()
    without.logger = lines.append
    plain = compress_rtn(copy.deepcopy(original), RTNOptions(bits=3, group_size=32, grid="weighted-mse"), without)
    assert "every input channel weighted alike (no calibration data)" in lines[-1]
    minmax = compress_rtn(copy.deepcopy(original), RTNOptions(bits=3, group_size=32), context)
    errors = [_layer_error(original, m, inputs) for m in (weighted, plain, minmax)]
    assert errors[0] < errors[1] < errors[2]


def test_cli_validate_names_the_unknown_grid_rule_and_the_installed_ones(tmp_path):
    from click.testing import CliRunner

    from pocketlm.cli import main

    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[model]\nsource = "tiny:llama"\n[[stages]]\nmethod = "gptq"\ngrid = "minmx"\n[export]\nformat = "hf"\n')
    result = CliRunner().invoke(main, ["validate", str(recipe)])
    assert result.exit_code == 2
    assert "recipe.toml:5: stages[0].grid: method 'gptq': unknown grid rule 'minmx'" in result.output
    assert "did you mean 'minmax'?" in result.output and "minmax" in result.output and "weighted-mse" in result.output
    assert "Traceback" not in result.output
