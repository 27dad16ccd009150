"""AWQ on tiny random models of every built-in family, and its pure tensor functions."""

from __future__ import annotations

import copy
import dataclasses
import types

import pytest
import torch
from pydantic import ValidationError

import pocketlm
from pocketlm import PocketError, hookimpl
from pocketlm import weights as W
from pocketlm.builtins.architectures import LLAMA
from pocketlm.modules import find_architecture, get_module, select_linears
from pocketlm.plugins import Plugins, get_plugins
from pocketlm.quant import fake_quantize_groups
from pocketlm.quant import round_to_grid as quantize_groups
from pocketlm.testing import make_context
from pocketlm.testing.models import ARCHITECTURES, tiny_model, tiny_windows
from pocketlm_awq.awq import (
    AWQOptions,
    apply_clip,
    awq_scales,
    compress,
    fold_scales,
    fold_width,
    linear_scale_loss,
    search_clip,
    search_scale,
    weight_mean,
)

torch.set_num_threads(1)


def _context(logs: list | None = None, plugins=None, n: int = 8):
    context = make_context(tiny_windows(n, 32), plugins=plugins)
    if logs is not None:
        context.logger = logs.append
    return context


def _hidden(model, windows):
    with torch.no_grad():
        return model(windows, output_hidden_states=True).hidden_states[-1]


def _relative_error(reference, model, windows) -> float:
    a, b = _hidden(reference, windows), _hidden(model, windows)
    return ((a - b).pow(2).mean() / a.pow(2).mean()).item()


def _rtn(model, bits: int, group_size: int):
    """Local round-to-nearest reference: every targeted linear on its min-max group grid."""
    for module in select_linears(model, ["*"], ["lm_head"]).values():
        weight = W.linear_weight(module).float()
        rows, cols = weight.shape
        grouped = weight.reshape(rows, cols // group_size, group_size).reshape(-1, group_size)
        scale, zero = W.minmax_grid(grouped, bits, symmetric=False)
        W.set_linear_weight(module, W.fake_quantize(grouped, scale, zero, bits).reshape(rows, cols))
    return model


# ------------------------------------------------------------------ pure functions (64x64)


def test_quantize_groups_matches_the_core_grid():
    torch.manual_seed(0)
    w = torch.randn(64, 64)
    q, scales, zeros = quantize_groups(w, 4, 32, symmetric=False)
    assert q.shape == (64, 64) and scales.shape == (64, 2) and zeros.shape == (64, 2)
    assert int(q.min()) >= 0 and int(q.max()) <= 15
    module = W.QuantizedLinear.from_grid(q, scales, zeros, bits=4, group_size=32, symmetric=False)
    assert torch.equal(module.dequantize(), fake_quantize_groups(w, 4, 32, False))
    assert (module.dequantize() - w).abs().max() <= scales.max() / 2 + 1e-6


def test_awq_scales_are_normalised_and_follow_the_formula():
    torch.manual_seed(0)
    x_mean, w_mean = torch.rand(64) + 0.1, torch.rand(64) + 0.1
    scales = awq_scales(x_mean, w_mean, 0.5)
    assert abs((scales.max() * scales.min()).item() - 1) < 1e-5
    raw = x_mean.sqrt() / (w_mean.sqrt() + 1e-4)
    assert torch.allclose(scales, raw / (raw.max() * raw.min()).sqrt(), rtol=1e-5)
    assert torch.allclose(awq_scales(x_mean, None, 0.0), torch.ones(64))


def test_scale_search_protects_outlier_channels_on_a_64x64_matrix():
    torch.manual_seed(0)
    w = torch.randn(64, 64) * 0.1
    x = torch.randn(512, 64)
    x[:, :4] *= 30  # outlier input channels, as in real LLMs
    loss = linear_scale_loss(x, [w], bits=3, group_size=32, symmetric=False)
    choice = search_scale(x.abs().mean(0), weight_mean([w], 32), loss, n_grid=20)
    assert choice.alpha is not None and choice.alpha > 0
    identity = choice.errors[None]
    assert min(choice.errors.values()) == choice.errors[choice.alpha]
    assert choice.errors[choice.alpha] < 0.6 * identity  # a real gain over plain rounding
    assert choice.scales[:4].min() > choice.scales[4:].max()  # outliers get the largest scales


def test_clip_search_lowers_the_output_error_of_every_group():
    torch.manual_seed(0)
    w = torch.randn(64, 64)
    w[::7, 3] = 8.0  # a few large weights that stretch their group's range
    x = torch.randn(256, 64)
    bounds = search_clip(w, x, bits=3, group_size=32, symmetric=False, n_grid=20, max_shrink=0.5)
    original = w.abs().reshape(64, 2, 32).amax(-1)
    assert bounds.shape == (64, 2)
    assert (bounds <= original + 1e-6).all() and (bounds >= 0.5 * original * 0.99).all()
    assert (bounds < original - 1e-6).any()

    def group_error(weight):
        quantized = fake_quantize_groups(weight, 3, 32, False)
        parts = [(x[:, g * 32:(g + 1) * 32] @ (quantized - w)[:, g * 32:(g + 1) * 32].t()).pow(2).mean(0)
                 for g in range(2)]
        return torch.stack(parts, 1)  # [out, groups]

    clipped = group_error(apply_clip(w, bounds, 32))
    plain = group_error(w)
    assert (clipped <= plain + 1e-6).all()
    assert clipped.sum() < 0.9 * plain.sum()


def test_folding_a_linear_into_a_linear_is_exact_on_64x64():
    torch.manual_seed(0)
    first, second = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)
    x = torch.randn(16, 64)
    before = second(torch.relu(first(x)))
    fold_scales(first, [second], torch.rand(64) * 4 + 0.1)  # ReLU commutes with positive scales
    assert torch.allclose(second(torch.relu(first(x))), before, atol=1e-5)


def test_folding_into_a_norm_and_into_the_second_half_of_a_fused_linear():
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(64)
    norm.weight.data.uniform_(0.5, 2)
    norm.bias.data.normal_()
    up, down = torch.nn.Linear(64, 128), torch.nn.Linear(64, 64)
    x = torch.randn(16, 64)

    def run():
        gate, value = up(norm(x)).chunk(2, dim=-1)
        return down(torch.nn.functional.silu(gate) * value)

    before = run()
    assert fold_width(up, "second_half") == 64 and fold_width(norm) == 64
    fold_scales(norm, [up], torch.rand(64) + 0.5)
    fold_scales(up, [down], torch.rand(64) + 0.5, prev_rows="second_half")
    assert torch.allclose(run(), before, atol=1e-5)


# ------------------------------------------------------------------ folding on every family


@pytest.mark.parametrize("family", ARCHITECTURES)
def test_folding_every_pair_leaves_the_model_unchanged(family):
    model = tiny_model(family, outliers=True)
    reference = copy.deepcopy(model)
    architecture = find_architecture(model, get_plugins().architectures)
    generator = torch.Generator().manual_seed(0)
    folded = 0
    for layer in get_module(model, architecture.layers):
        for smooth in architecture.smooth:
            prev = get_module(layer, smooth.prev)
            linears = [get_module(layer, n) for n in smooth.linears]
            width = fold_width(prev, smooth.prev_rows)
            if {W.linear_shape(m)[1] for m in linears} != {width}:
                continue  # v -> o under grouped-query attention
            fold_scales(prev, linears, torch.rand(width, generator=generator) * 3 + 0.2, smooth.prev_rows)
            folded += 1
    assert folded >= 2 * 2
    windows = tiny_windows(2, 32, seed=3)
    with torch.no_grad():
        a, b = reference(windows).logits, model(windows).logits
    assert (a - b).abs().max().item() < 1e-4 * a.abs().max().item()


# ------------------------------------------------------------------ the method end to end


@pytest.mark.parametrize("family", ARCHITECTURES)
@pytest.mark.parametrize("bits", [3, 4])
def test_awq_beats_round_to_nearest_on_outlier_models(family, bits):
    reference = tiny_model(family, outliers=True)
    awq, rtn = copy.deepcopy(reference), _rtn(copy.deepcopy(reference), bits, 32)
    # 3-bit searches scales on 2 of the 8 calibration sequences (exercises the subsampling)
    options = AWQOptions(bits=bits, group_size=32, search_tokens=64 if bits == 3 else None)
    compress(awq, options, _context())
    quantized = [m for m in awq.modules() if isinstance(m, W.QuantizedLinear)]
    assert len(quantized) == len(select_linears(reference, ["*"], ["lm_head"]))
    assert all(m.bits == bits and m.group_size == 32 and not m.symmetric for m in quantized)
    assert not isinstance(awq.lm_head, W.QuantizedLinear)
    held_out = tiny_windows(4, 32, seed=1)
    awq_error, rtn_error = _relative_error(reference, awq, held_out), _relative_error(reference, rtn, held_out)
    assert awq_error < 0.9 * rtn_error, (awq_error, rtn_error)


def _spy_folds(monkeypatch) -> list:
    """Record the (prev shape or "norm", number of linears) of every fold AWQ makes."""
    import pocketlm_awq.awq as awq_module

    folds, real = [], awq_module.fold_scales

    def spy(prev, linears, scales, prev_rows="all"):
        folds.append((W.linear_shape(prev) if W.is_linear(prev) else "norm", len(linears)))
        return real(prev, linears, scales, prev_rows)

    monkeypatch.setattr(awq_module, "fold_scales", spy)
    return folds


def test_gqa_skips_v_to_o_and_says_so_once(monkeypatch):
    logs: list[str] = []
    folds = _spy_folds(monkeypatch)
    model = tiny_model("llama", outliers=True)  # 4 heads, 2 key/value heads: v_proj is 64 -> 32
    compress(model, AWQOptions(group_size=32), _context(logs))
    skipped = [m for m in logs if "not folding self_attn.v_proj" in m]
    assert len(skipped) == 1 and "32 channels" in skipped[0] and "[64]" in skipped[0]
    assert (32, 64) not in [f[0] for f in folds]  # v_proj never folded
    assert ("norm", 3) in folds and (128, 64) in [f[0] for f in folds]  # norm -> q/k/v, up -> down
    assert isinstance(model.model.layers[1].self_attn.o_proj, W.QuantizedLinear)


def test_mha_folds_v_into_o(monkeypatch):
    logs: list[str] = []
    folds = _spy_folds(monkeypatch)
    compress(tiny_model("opt", outliers=True), AWQOptions(group_size=32), _context(logs))
    assert not any("not folding" in m for m in logs)
    assert (64, 64) in [f[0] for f in folds]  # v_proj (64 -> 64) folded into out_proj


def test_pruned_weights_stay_zero():
    model = tiny_model("llama", outliers=True)
    target = model.model.layers[1].mlp.down_proj
    mask = torch.rand(target.weight.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    W.set_mask(target, mask)
    compress(model, AWQOptions(group_size=32), _context())
    quantized = model.model.layers[1].mlp.down_proj
    assert isinstance(quantized, W.QuantizedLinear)
    assert (quantized.dequantize()[~mask] == 0).all()
    assert torch.equal(W.get_mask(quantized), mask)


# ------------------------------------------------------------------ architecture table


def test_a_third_party_architecture_works_through_the_hook():
    renamed = dataclasses.replace(LLAMA, name="myarch", model_types=("myllama",))
    plugin = types.ModuleType("myarch_plugin")
    plugin.POCKETLM_API = ">=1.0,<2"

    @hookimpl
    def register_architectures(register):
        register(renamed)

    plugin.register_architectures = register_architectures
    plugins = Plugins(entry_points=True, extra=[("myarch", plugin)])
    assert not [p for p in plugins.problems if p.name == "myarch"] and "awq" in plugins.methods
    assert renamed in plugins.architectures

    model = tiny_model("llama", outliers=True)
    model.config.model_type = "myllama"
    with pytest.raises(PocketError) as missing:
        compress(copy.deepcopy(model), AWQOptions(group_size=32), _context())
    assert "register_architectures" in str(missing.value) and "myllama" in str(missing.value)

    reference = copy.deepcopy(model)
    compress(model, AWQOptions(bits=3, group_size=32), _context(plugins=plugins))
    assert isinstance(model.model.layers[0].mlp.up_proj, W.QuantizedLinear)
    held_out = tiny_windows(4, 32, seed=1)
    rtn = _rtn(copy.deepcopy(reference), 3, 32)
    assert _relative_error(reference, model, held_out) < _relative_error(reference, rtn, held_out)


def test_an_architecture_without_smooth_pairs_is_refused():
    bare = dataclasses.replace(LLAMA, name="bare", model_types=("bare",), smooth=())
    model = tiny_model("llama")
    model.config.model_type = "bare"
    context = _context()
    context.architectures = (bare,)
    with pytest.raises(PocketError) as error:
        compress(model, AWQOptions(group_size=32), context)
    assert "smooth" in str(error.value) and "register_architectures" in str(error.value)


# ------------------------------------------------------------------ options


def test_group_size_that_does_not_divide_is_refused_with_working_sizes():
    model = tiny_model("llama")  # hidden 64: 128 does not divide q/k/v/gate/up
    with pytest.raises(PocketError) as error:
        compress(model, AWQOptions(group_size=128), _context())
    text = str(error.value)
    assert "q_proj (in=64)" in text and "-1, 32, 64" in text
    assert not any(isinstance(m, W.QuantizedLinear) for m in model.modules())


def test_options_are_validated():
    assert AWQOptions().bits == 4 and AWQOptions().group_size == 128 and AWQOptions().symmetric is False
    assert AWQOptions().ignore == ["lm_head", "embed"] and AWQOptions().duo_scaling and AWQOptions().clip
    for bad in ({"bits": 2}, {"group_size": 48}, {"n_grid": 0}, {"unknown": 1}):
        with pytest.raises(ValidationError):
            AWQOptions(**bad)


def test_registered_as_an_exclusive_quantizer():
    method = get_plugins().methods["awq"]
    assert method.kind == "quantize" and method.exclusive and method.needs_calibration
    assert method.phase == pocketlm.PHASE_QUANTIZE
    assert method.effect(AWQOptions(bits=4, group_size=64)).bits == pytest.approx(4 + 20 / 64)


def test_symmetric_and_per_channel_grids():
    model = tiny_model("qwen2", outliers=True)
    compress(model, AWQOptions(bits=8, group_size=-1, symmetric=True), _context())
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.symmetric and layer.group_size == -1 and (layer.storage.zeros == 128).all()
