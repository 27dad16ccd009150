"""The quantizer kit (``pocketlm.quant``) and the public weight format (``PackedGrid``,
``tied_heads``, ``distinct_storages``, ``pocketlm.saving``), on random 64x64 matrices and tiny
models."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from packaging.version import Version
from torch import nn

import pocketlm
from pocketlm import PocketError
from pocketlm.quant import (Grid, QuantScheme, dequantize_grid, fake_quantize_groups, group_grid, quantize_embedding,
                            quantize_linears, replace_with_grid, round_to_grid, select_targets, size_effect)
from pocketlm.saving import densify, save_dense
from pocketlm.testing import make_context
from pocketlm.testing.models import tiny_model
from pocketlm.weights import (PackedGrid, QuantizedEmbedding, QuantizedLinear, _PackedGrid, distinct_storages,
                              get_mask, linear_weight, packed_bits_per_weight, set_mask, tied_heads)

ROOT = Path(__file__).resolve().parents[1]


def _matrix(seed=0, cols=64):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(64, cols, generator=generator) * torch.rand(1, cols, generator=generator) * 3


# ---------------------------------------------------------------------- pure functions


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 32, True), (3, 16, False), (8, -1, False), (2, 64, True)])
def test_round_to_grid_is_within_half_a_step_but_at_the_ends(bits, group_size, symmetric):
    W = _matrix()
    q, scales, zeros = round_to_grid(W, bits, group_size, symmetric)
    groups = 1 if group_size == -1 else 64 // group_size
    assert q.dtype == torch.int32 and scales.shape == zeros.shape == (64, groups)
    assert int(q.min()) >= 0 and int(q.max()) <= 2**bits - 1
    step = scales.repeat_interleave(64 // groups, dim=1)
    error = (dequantize_grid(q, scales, zeros, group_size) - W).abs()
    # rounding is half a step at most; only the ends of a group's range, where the integer zero
    # point shifts the grid or the symmetric grid stops a step short, may be a whole step off
    assert (error <= step + 1e-6).all()
    assert (error <= step / 2 + 1e-6).float().mean() > 0.95
    assert torch.equal(scales, scales.half().float())          # stored exactly as float16


def test_masked_weights_sit_on_the_zero_point_and_dequantize_to_zero():
    W = _matrix(1)
    mask = torch.rand(64, 64, generator=torch.Generator().manual_seed(2)) > 0.5
    q, scales, zeros = round_to_grid(W, 3, 32, False, mask)
    assert (dequantize_grid(q, scales, zeros, 32)[~mask] == 0).all()
    kept, _, _ = round_to_grid(W, 3, 32, False)
    assert torch.equal(q[mask], kept[mask])


@pytest.mark.parametrize("cols,group_size", [(64, 32), (72, 32), (64, -1)])
def test_fake_quantize_is_round_to_grid_mapped_back(cols, group_size):
    W = _matrix(3, cols)
    q, scales, zeros = round_to_grid(W, 4, group_size, False)
    assert torch.equal(fake_quantize_groups(W, 4, group_size, False), dequantize_grid(q, scales, zeros, group_size))


def test_a_grid_rule_fit_replaces_min_max():
    W = _matrix(4)
    halved = lambda w, bits, g, sym, importance=None: tuple(t * f for t, f in zip(group_grid(w, bits, g, sym), (0.5, 1)))
    q, scales, zeros = round_to_grid(W, 4, 32, True, fit=halved)
    assert torch.equal(scales, group_grid(W, 4, 32, True)[0] * 0.5)
    assert int((q == 0).sum() + (q == 15).sum()) > int((round_to_grid(W, 4, 32, True).q == 15).sum())  # clipped ends


# ------------------------------------------------------------------------ module swaps


def test_replace_with_grid_pins_the_mask_keeps_the_bias_and_transfers_the_mask():
    root = nn.Sequential(nn.Linear(64, 64))
    with torch.no_grad():
        root[0].weight.copy_(_matrix(5))
    mask = torch.rand(64, 64, generator=torch.Generator().manual_seed(6)) > 0.3
    set_mask(root[0], mask)
    bias = root[0].bias.detach().clone()
    unpinned = round_to_grid(_matrix(5), 4, 32, False)   # fitted without the mask: pruned weights not on zero
    new = replace_with_grid(root, "0", unpinned, QuantScheme(bits=4, group_size=32, symmetric=False))
    assert root[0] is new and isinstance(new, QuantizedLinear) and torch.equal(get_mask(new), mask)
    assert (new.dequantize()[~mask] == 0).all() and torch.equal(new.bias, bias)
    x = torch.randn(5, 64)
    assert torch.allclose(new(x), x @ new.dequantize().t() + bias, atol=1e-5)


def test_quantize_linears_walks_filters_and_swaps():
    model = tiny_model("llama")
    set_mask(model.model.layers[0].mlp.up_proj, torch.rand(128, 64, generator=torch.Generator().manual_seed(0)) > 0.5)
    seen = {}

    def fit(weight, mask, name):
        seen[name] = mask
        return round_to_grid(weight, 4, 32, True, mask)

    scheme = QuantScheme(bits=4, group_size=32, ignore=["lm_head", "embed", "*.o_proj"])
    selection = quantize_linears(model, scheme, make_context(), fit, method="probe")
    assert set(seen) == set(selection.linears) and len(seen) == 2 * 6          # 7 linears a layer, o_proj ignored
    assert seen["model.layers.0.mlp.up_proj"] is not None and seen["model.layers.1.mlp.up_proj"] is None
    assert all(isinstance(model.get_submodule(n), QuantizedLinear) for n in seen)
    assert isinstance(model.model.layers[0].self_attn.o_proj, nn.Linear)
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.model.embed_tokens, nn.Embedding)
    assert (model.model.layers[0].mlp.up_proj.dequantize()[~get_mask(model.model.layers[0].mlp.up_proj)] == 0).all()
    with pytest.raises(PocketError, match="already quantized"):
        select_targets(model, QuantScheme(), make_context().architecture(model), "probe")


def test_the_group_size_policy_names_the_sizes_that_work():
    model = tiny_model("llama")   # widths 64 and 128
    with pytest.raises(PocketError) as error:
        quantize_linears(model, QuantScheme(group_size=128), make_context(), lambda w, m, n: None, method="probe")
    assert "q_proj (in=64)" in str(error.value) and "-1, 16, 32, 64" in str(error.value)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())   # refused before any work


# ------------------------------------------------------------------------- size effect


def test_size_effect_is_the_packed_layout():
    assert size_effect(QuantScheme(bits=4, group_size=64)).bits == 4 + 16 / 64
    assert size_effect(QuantScheme(bits=4, group_size=64, symmetric=False)).bits == 4 + 20 / 64
    assert size_effect(QuantScheme(bits=8, group_size=-1)).bits == 8
    assert packed_bits_per_weight(3, 128, False) == 3 + 19 / 128
    embedding = size_effect(QuantScheme(targets=["embed"], ignore=[]))
    assert embedding.covers == "embedding" and "quantized-embedding" in embedding.features
    assert size_effect(QuantScheme(targets=["model.layers.0.mlp.up_proj"])).modules == {"model.layers.0.mlp.up_proj"}


# ----------------------------------------------------------------------- weight format


def _tied_quantized():
    model = tiny_model("llama", seed=1)
    model.lm_head.weight = model.model.embed_tokens.weight
    model.config.tie_word_embeddings = True
    scheme = QuantScheme(bits=4, group_size=32, targets=["*", "embed"], ignore=[])
    selection = select_targets(model, scheme, make_context().architecture(model))
    assert quantize_embedding(model, selection, scheme).endswith("(one shared 4-bit grid)")
    return model


def test_tied_heads_and_distinct_storages():
    model = _tied_quantized()
    assert isinstance(model.model.embed_tokens, QuantizedEmbedding)
    assert tied_heads(model) == {"lm_head": "model.embed_tokens"}
    assert list(distinct_storages(model)) == ["model.embed_tokens"]
    assert distinct_storages(model)["model.embed_tokens"] is model.lm_head.storage
    assert tied_heads(tiny_model("llama")) == {} and distinct_storages(tiny_model("llama")) == {}


def test_a_bare_encoder_whose_config_says_tied_has_no_head_to_tie():
    """BERT's config says tie_word_embeddings = True (all-MiniLM-L6-v2's does) while a bare
    encoder has no head: quantizing its embedding must not invent a head module named ''."""
    model = tiny_model("bert", seed=1)
    model.config.tie_word_embeddings = True
    scheme = QuantScheme(bits=8, group_size=-1, targets=["*", "embed"], ignore=[])
    selection = select_targets(model, scheme, make_context().architecture(model))
    assert not selection.tied
    assert quantize_embedding(model, selection, scheme) == "quantized embeddings.word_embeddings to 8 bits"
    assert "" not in dict(model.named_children())
    assert not [key for key in model.state_dict() if key.startswith(".")]


def test_packed_grid_is_public_and_the_old_name_stays():
    assert _PackedGrid is PackedGrid and Version(pocketlm.API_VERSION) >= Version("1.5")
    storage = PackedGrid(64, 64, 4, 32, True, False)
    q, scales, zeros = round_to_grid(_matrix(7), 4, 32, True)
    storage.set_grid(q, scales, zeros)
    assert torch.equal(storage.grid().to(torch.int32), q)
    assert torch.equal(storage.dequantize(), dequantize_grid(q, scales, zeros, 32))
    assert storage.storage_bytes() == 64 * 64 * 4 // 8 + 64 * 2 * (2 + 1)   # grid, float16 scales, uint8 zeros


def test_densify_and_save_dense(tmp_path):
    model = _tied_quantized()
    dense = densify(model)
    assert isinstance(dense.model.embed_tokens, nn.Embedding) and dense.lm_head.weight is dense.model.embed_tokens.weight
    assert torch.equal(dense.model.embed_tokens.weight, model.model.embed_tokens.dequantize())
    save_dense(model, tmp_path / "out", dtype=torch.float16)
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert loaded.dtype == torch.float16
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.dequantize().half())
    assert torch.equal(linear_weight(loaded.model.layers[0].mlp.up_proj), linear_weight(model.model.layers[0].mlp.up_proj).half())


def test_no_plugin_imports_the_core_internals():
    pattern = re.compile(r"^\s*(from|import)\s+pocketlm\.(builtins|plugins)\b|from pocketlm import .*\bplugins\b", re.M)
    sources = [*ROOT.glob("plugins/*/src/**/*.py"), *ROOT.glob("docs/examples/*/src/**/*.py")]
    assert sources
    offenders = [str(p.relative_to(ROOT)) for p in sources if pattern.search(p.read_text())]
    assert not offenders, offenders
