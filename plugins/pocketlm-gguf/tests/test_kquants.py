"""k-quants: Q2_K ... Q6_K blocks packed from pocketlm grids, read back by gguf-py's own
dequantizer value for value; the q*_k grid rules through gptq and the exporter; llama.cpp's
fallbacks for rows that 256 does not divide."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import export, model_of, tensor_types
from gguf import GGUFReader, quants
from gguf import GGMLQuantizationType as Q

from pocketlm import PocketError
from pocketlm import weights as W
from pocketlm.plugins import get_plugins
from pocketlm.recipe import parse_recipe
from pocketlm.testing.models import tiny_windows
from pocketlm.testing import make_context
from pocketlm_gguf import blocks, kquants

BYTES = {"q2_k": 84, "q3_k": 110, "q4_k": 144, "q5_k": 176, "q6_k": 210}


def _kquant_linear(name, cols=512, rows=8, importance=None, seed=0):
    kind = kquants.KQUANTS[name]
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05
    scales, zeros = kquants.fit_kquant(kind, w, importance)
    q = W.quantize(w, scales.repeat_interleave(kind.sub, 1), zeros.repeat_interleave(kind.sub, 1), kind.bits)
    module = W.QuantizedLinear.from_grid(q.to(torch.int32), scales, zeros, bits=kind.bits, group_size=kind.sub,
                                         symmetric=True)
    return module, w


@pytest.mark.parametrize("name", list(kquants.KQUANTS))
@pytest.mark.parametrize("skewed", [False, True])
def test_kquant_blocks_round_trip_through_gguf_py_exactly(name, skewed):
    importance = torch.rand(512, generator=torch.Generator().manual_seed(3)) ** 8 * 50 if skewed else None
    module, w = _kquant_linear(name, importance=importance)
    packed = blocks.exact_blocks(module.storage)
    kind = kquants.KQUANTS[name]
    assert packed.qtype == kind.qtype and packed.exact
    assert packed.data.dtype == np.uint8 and packed.data.shape == (8, 2 * BYTES[name])
    back = torch.from_numpy(quants.dequantize(packed.data, kind.qtype).reshape(8, 512).copy())
    assert torch.equal(back, module.dequantize())                   # bit for bit
    if not skewed:   # a real quantization of w: the error shrinks with the bits
        error = float((module.dequantize() - w).norm() / w.norm())
        assert error < {2: 0.45, 3: 0.25, 4: 0.12, 5: 0.06, 6: 0.03}[kind.bits]
    else:            # fitted to the importance: lower weighted error than the grid fitted without it
        plain, _ = _kquant_linear(name)
        weighted = lambda m: float((((m.dequantize() - w) ** 2) * importance).sum())
        assert weighted(module) < weighted(plain)


def test_super_block_scale_is_float16_and_sub_scales_integers():
    kind = kquants.KQUANTS["q4_k"]
    module, _ = _kquant_linear("q4_k")
    d, sc = kquants.super_block_d(module.storage.scales.float().numpy().reshape(-1, 8), kind)
    assert np.array_equal(d.astype(np.float16).astype(np.float32), d)
    assert sc.min() >= 1 and sc.max() <= 63 and sc.max() >= 32      # the range of sc is used
    # the block starts with d, then dmin = 8 d (the symmetric grid's zero point times d)
    packed = blocks.exact_blocks(module.storage).data.reshape(-1, 144)
    assert np.array_equal(packed[:, :2].copy().view(np.float16).astype(np.float32), d)
    assert np.array_equal(packed[:, 2:4].copy().view(np.float16).astype(np.float32), 8 * d)


def test_a_minmax_grid_is_not_mistaken_for_a_kquant():
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(0))
    scales, zeros = W.minmax_grid(w.reshape(-1, 32), 4, True)
    q = W.quantize(w.reshape(-1, 32), scales, zeros, 4).reshape(8, 256)
    module = W.QuantizedLinear.from_grid(q.to(torch.int32), scales.view(8, 8), zeros.view(8, 8), bits=4,
                                         group_size=32, symmetric=True)
    packed = blocks.exact_blocks(module.storage)
    assert packed.qtype == Q.Q4_0
    assert "two-level grid" in blocks.kquant_blocks(module.storage)


@pytest.mark.parametrize("name,fallback", [("q2_k", Q.Q4_0), ("q3_k", Q.Q4_0), ("q4_k", Q.Q4_0),
                                           ("q5_k", Q.Q5_0), ("q6_k", Q.Q8_0)])
def test_rows_not_a_multiple_of_256_get_a_32_block_grid_written_exactly(name, fallback):
    module, _ = _kquant_linear(name, cols=576)
    packed = blocks.exact_blocks(module.storage)
    assert packed.qtype == fallback and packed.exact
    assert torch.equal(blocks.decode(packed, 576), module.dequantize())


def _gptq_kquant(name, intermediate=256):
    from pocketlm_gptq.gptq import GPTQOptions, compress_gptq

    kind = kquants.KQUANTS[name]
    model = model_of("llama", intermediate=intermediate)
    context = make_context(tiny_windows(4, 32))
    compress_gptq(model, GPTQOptions(bits=kind.bits, group_size=kind.sub, grid=name), context)
    return model


def _gguf_matrices(path):
    return {t.name: (t.tensor_type, quants.dequantize(t.data, t.tensor_type)) for t in GGUFReader(path).tensors}


@pytest.mark.parametrize("name,fallback", [("q4_k", "Q4_0"), ("q6_k", "Q8_0"), ("q3_k", "Q4_0")])
def test_gptq_with_a_kquant_grid_exports_those_blocks_bit_for_bit(tmp_path, name, fallback):
    """Hidden width 64 (not a multiple of 256): q/k/v/o/gate/up fall back; down_proj reads the
    256-wide intermediate and is written as the k-quant. Every matrix equals the model's."""
    model = _gptq_kquant(name)
    path, log = export(model, tmp_path, dtype="f32")
    matrices = _gguf_matrices(path)
    kind = kquants.KQUANTS[name]
    heads = model.config.num_attention_heads
    for index, layer in enumerate(model.model.layers):
        for module_name, gguf_name in [("mlp.down_proj", "ffn_down"), ("mlp.up_proj", "ffn_up"),
                                       ("mlp.gate_proj", "ffn_gate"), ("self_attn.v_proj", "attn_v"),
                                       ("self_attn.o_proj", "attn_output"), ("self_attn.q_proj", "attn_q")]:
            module = layer.get_submodule(module_name)
            qtype, values = matrices[f"blk.{index}.{gguf_name}.weight"]
            assert qtype.name == (kind.qtype.name if gguf_name == "ffn_down" else fallback), gguf_name
            ours = module.dequantize()
            if gguf_name == "attn_q":
                ours = ours[blocks.rope_permutation(ours.shape[0], heads)]
            assert torch.equal(torch.from_numpy(values.reshape(ours.shape).copy()), ours), gguf_name
    text = log.text()
    assert f"2 {kind.qtype.name} exact" in text
    assert (f"not a multiple of 256, so no {name.upper()}: written exactly as {fallback} (llama.cpp's quantizer "
            f"falls back to {kind.llama_fallback.upper()} here)") in text


def test_dense_kquant_quantize_option_with_llama_cpp_row_fallbacks(tmp_path):
    model = model_of("llama", intermediate=256)
    path, log = export(model, tmp_path, dtype="f32", quantize="q4_k")
    types = tensor_types(path)
    assert types["blk.0.ffn_down.weight"] == "Q4_K" and types["blk.0.attn_q.weight"] == "Q5_0"
    assert types["token_embd.weight"] == "F32"
    text = log.text()
    assert "12 layer(s): input width 64 is not a multiple of 256, so no Q4_K: Q5_0 instead, as llama.cpp's " \
           "quantizer does" in text
    # the k-quant blocks are a close round-to-nearest of the dense weights
    matrices = _gguf_matrices(path)
    down = model.model.layers[0].mlp.down_proj.weight.data
    back = torch.from_numpy(matrices["blk.0.ffn_down.weight"][1].reshape(down.shape).copy())
    assert float((back - down).norm() / down.norm()) < 0.12


def test_q2_k_dense_rows_fall_back_to_q4_0_and_say_llama_cpp_uses_iq4_nl(tmp_path):
    model = model_of("llama", intermediate=256)
    path, log = export(model, tmp_path, dtype="f32", quantize="q2_k")
    assert tensor_types(path)["blk.0.ffn_down.weight"] == "Q2_K"
    assert "Q4_0 instead (llama.cpp writes IQ4_NL, the same 4.5 bits per weight, which gguf-py cannot quantize)" \
        in log.text()


def test_grid_rules_are_registered_and_checked_by_the_recipe():
    plugins = get_plugins()
    assert {"q2_k", "q3_k", "q4_k", "q5_k", "q6_k"} <= set(plugins.grid_rules)
    assert plugins.grid_rules["q6_k"].bits == (6,) and plugins.grid_rules["q6_k"].group_sizes == (16,)
    recipe = """[model]
source = "tiny:llama"
[[stages]]
method = "gptq"
bits = 3
group_size = 32
grid = "q4_k"
[export]
format = "gguf"
"""
    with pytest.raises(PocketError) as error:
        parse_recipe(recipe, plugins, file="recipe.toml")
    assert "grid rule 'q4_k' needs bits = 4 (not 3), symmetric" not in str(error.value)
    assert "grid rule 'q4_k' needs bits = 4 (not 3)" in str(error.value)
    assert "set bits = 4 in this stage" in error.value.fix
