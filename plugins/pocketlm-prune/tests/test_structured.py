"""prune-width and prune-depth: exactness, shapes, config, and round trips through transformers."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from pocketlm import PocketError
from pocketlm.builtins.export_hf import export_hf
from pocketlm.modules import decoder_layers, get_module
from pocketlm.plugins import get_plugins
from pocketlm.testing import make_context
from pocketlm.testing.models import tiny_model, tiny_windows
from pocketlm.weights import linear_shape, linear_weight, masks

FAMILIES = ["llama", "qwen2", "gpt2", "opt"]
GQA = ["llama", "qwen2", "phi3"]  # families whose config states head_dim (phi3: fused qkv)
IDS = tiny_windows(2, 16, seed=5)


def run(method, model, **options):
    spec = get_plugins().methods[method]
    spec.compress(model, spec.options(**options), make_context(tiny_windows(4, 32)))
    return model


def logits(model):
    with torch.no_grad():
        return model(IDS, use_cache=False).logits


def arch_of(model):
    return make_context().architecture(model)


def reload(model, tmp_path):
    export_hf(model, tmp_path, None, None)
    return AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()


def zero_mlp_channels(model, channels):
    """Make intermediate channels ``channels`` exactly zero in every layer (their mlp_in rows)."""
    arch = arch_of(model)
    for layer in decoder_layers(model, arch):
        inter = linear_shape(get_module(layer, arch.mlp_out))[1]
        rows = torch.cat([channels, channels + inter]) if arch.mlp_fused_gate_up else channels
        for name in arch.mlp_in:
            module = get_module(layer, name)
            w = linear_weight(module).clone()
            w[rows] = 0
            from pocketlm.weights import set_linear_weight
            set_linear_weight(module, w)
            if getattr(module, "bias", None) is not None:
                module.bias.data[rows] = 0


@pytest.mark.parametrize("family", FAMILIES + ["phi3"])
def test_pruning_zero_importance_mlp_channels_leaves_logits_unchanged(family, tmp_path):
    model = tiny_model(family)
    zero_mlp_channels(model, torch.tensor([3, 17, 40, 41, 90, 127]))
    before = logits(model)
    run("prune-width", model, intermediate_size=122)
    arch = arch_of(model)
    for layer in decoder_layers(model, arch):
        assert linear_shape(get_module(layer, arch.mlp_out)) == (64, 122)
        for name in arch.mlp_in:
            assert linear_shape(get_module(layer, name))[0] == (244 if arch.mlp_fused_gate_up else 122)
    assert getattr(model.config, arch.intermediate_size_key) == 122
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=1e-5)
    loaded = reload(model, tmp_path)
    torch.testing.assert_close(logits(loaded), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", GQA)
def test_pruning_a_silent_kv_group_leaves_logits_unchanged(family, tmp_path):
    """A key/value group whose values are zero contributes nothing; removing it with its query
    heads (GQA) must not change the logits, and the result must load in transformers."""
    model = tiny_model(family)  # 4 query heads, 2 kv groups, head_dim 16
    arch, d = arch_of(model), 16
    for index, layer in enumerate(decoder_layers(model, arch)):
        group = index % 2  # a different group in each layer
        att = arch.attention
        name, offset = (att["qkv"], 4 * d + 2 * d) if "qkv" in att else (att["v"], 0)
        module = get_module(layer, name)
        module.weight.data[offset + group * d: offset + (group + 1) * d] = 0
        if module.bias is not None:
            module.bias.data[offset + group * d: offset + (group + 1) * d] = 0
    before = logits(model)
    run("prune-width", model, kv_heads=1)
    config = model.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 1, 16)
    layer = decoder_layers(model, arch)[0]
    assert linear_shape(get_module(layer, arch.attention["o"])) == (64, 32)
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=1e-5)
    loaded = reload(model, tmp_path)
    assert loaded.config.num_key_value_heads == 1 and loaded.config.head_dim == 16
    torch.testing.assert_close(logits(loaded), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_width_round_trip_shapes_config_and_generation(family, tmp_path):
    model = tiny_model(family)
    heads = {"head_ratio": 0.5} if family in GQA else {}
    before = sum(p.numel() for p in model.parameters())
    run("prune-width", model, mlp_ratio=0.25, **heads)
    assert sum(p.numel() for p in model.parameters()) < before
    assert getattr(model.config, arch_of(model).intermediate_size_key) == 96
    loaded = reload(model, tmp_path)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(logits(loaded), logits(model), atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # cached generation runs on the smaller shapes
        cached = loaded.generate(IDS[:1, :4], max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        plain = loaded.generate(IDS[:1, :4], max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, plain)


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_head_pruning_refuses_families_whose_config_derives_head_dim(family):
    with pytest.raises(PocketError, match="head pruning is not possible"):
        run("prune-width", tiny_model(family), head_ratio=0.5)


def test_width_keeps_masks_of_an_earlier_stage():
    model = tiny_model("llama")
    run("magnitude", model, sparsity=0.5)
    run("prune-width", model, mlp_ratio=0.25)
    layer = decoder_layers(model, arch_of(model))[0]
    mask = masks(model)["model.layers.0.mlp.down_proj"]
    assert mask.shape == (64, 96) and (linear_weight(layer.mlp.down_proj)[~mask] == 0).all()


def make_identity_layer(model, index):
    """Zero the output projections of layer ``index`` so it returns its input unchanged."""
    arch = arch_of(model)
    layer = decoder_layers(model, arch)[index]
    for name in (arch.attention["o"], arch.mlp_out):
        module = get_module(layer, name)
        module.weight.data.zero_()
        if getattr(module, "bias", None) is not None:
            module.bias.data.zero_()


@pytest.mark.parametrize("family", FAMILIES)
def test_depth_removes_the_layer_that_does_nothing(family, tmp_path):
    model = tiny_model(family, layers=3)
    make_identity_layer(model, 1)
    before = logits(model)
    run("prune-depth", model, layers=1)
    arch = arch_of(model)
    layers = decoder_layers(model, arch)
    assert len(layers) == 2 and getattr(model.config, arch.layer_count_key) == 2
    for index, layer in enumerate(layers):
        assert all(m.layer_idx == index for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int))
    if getattr(model.config, "layer_types", None) is not None:
        assert len(model.config.layer_types) == 2
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=1e-5)
    loaded = reload(model, tmp_path)
    torch.testing.assert_close(logits(loaded), before, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        cached = loaded.generate(IDS[:1, :4], max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        plain = loaded.generate(IDS[:1, :4], max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, plain)


def test_depth_perplexity_metric_removes_the_least_harmful_layer():
    from pocketlm_prune.depth import DepthOptions, DepthPruner

    model = tiny_model("llama", layers=3)
    make_identity_layer(model, 2)
    pruner = DepthPruner(DepthOptions(layers=1, metric="perplexity", samples=4), make_context(tiny_windows(4, 32)))
    pruner(model)
    assert abs(pruner.scores[2]) < 1e-5
    assert pruner.removed == [min(range(3), key=lambda i: pruner.scores[i])]
    assert len(decoder_layers(model, arch_of(model))) == 2
