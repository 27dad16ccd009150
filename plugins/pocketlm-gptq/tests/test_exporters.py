"""The gptq and compressed-tensors exporters, each verified against its consumer's convention."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import pocketlm
from pocketlm.testing.models import tiny_model
from pocketlm.weights import QuantizedLinear
from pocketlm_gptq.export_compressed_tensors import CTExportOptions, check_compressed_tensors, export_compressed_tensors
from pocketlm_gptq.export_gptq import GPTQExportOptions, check_gptq, export_gptq
from pocketlm_gptq.gptq import GPTQOptions, compress_gptq
from pocketlm_gptq.rtn import RTNOptions, compress_rtn


# ------------------------------------------------------------------ gptq: by documented layout


def reference_unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """An unpacker written from the GPTQ convention, independent of pocketlm's ``unpack``:
    along dim 0 of ``packed`` (int32 words), every ``bits`` consecutive words hold 32 values as
    one little-endian bit stream; value ``k`` is bits ``k*bits .. k*bits+bits-1`` of the
    stream, bit ``b`` of the stream is bit ``b % 32`` of word ``b // 32``."""
    words = packed.to(torch.int64) & 0xFFFFFFFF                       # [n_words, cols]
    stream = (words.unsqueeze(1) >> torch.arange(32).view(1, 32, 1)) & 1  # [n_words, 32, cols]
    stream = stream.reshape(-1, packed.shape[1])                       # bit stream per column
    values = stream[: count * bits].reshape(count, bits, -1)
    return (values << torch.arange(bits).view(1, bits, 1)).sum(1)      # [count, cols]


def reference_dequantize(tensors: dict, prefix: str, bits: int, in_features: int, out_features: int,
                         checkpoint_format: str) -> torch.Tensor:
    """The dequantization GPTQ loaders (AutoGPTQ's torch path, GPTQModel) perform, as ``[out, in]``:
    ``w[i, o] = scales[g_idx[i], o] * (q[i, o] - zero[g_idx[i], o])`` with the stored zero plus one
    (masked to ``bits``) for checkpoint_format "gptq" (v1) and as stored for "gptq_v2"."""
    qweight, qzeros = tensors[prefix + "qweight"], tensors[prefix + "qzeros"]
    scales, g_idx = tensors[prefix + "scales"].float(), tensors[prefix + "g_idx"].long()
    assert qweight.dtype == torch.int32 and qweight.shape == (in_features * bits // 32, out_features)
    assert qzeros.dtype == torch.int32 and qzeros.shape == (scales.shape[0], out_features * bits // 32)
    assert tensors[prefix + "scales"].dtype == torch.float16 and g_idx.shape == (in_features,)
    q = reference_unpack(qweight, bits, in_features)                    # [in, out]
    zeros = reference_unpack(qzeros.t().contiguous(), bits, out_features).t()  # [groups, out]
    if checkpoint_format == "gptq":
        zeros = (zeros + 1) & (2**bits - 1)
    return ((q - zeros[g_idx]) * scales[g_idx]).t()


@pytest.mark.parametrize("family,bits,group_size,symmetric,fmt", [
    ("llama", 4, 32, True, "gptq"), ("llama", 3, 32, True, "gptq"), ("llama", 8, -1, True, "gptq"),
    ("llama", 2, 64, True, "gptq"), ("llama", 4, 32, False, "gptq_v2"), ("gpt2", 4, 32, True, "gptq"),
    ("gpt2", 3, 64, False, "gptq_v2"),
])
def test_gptq_export_matches_the_documented_layout(family, bits, group_size, symmetric, fmt, context, tmp_path):
    """No GPTQ consumer runs here (transformers 5 needs gptqmodel, which replaces torch), so the
    export is checked against the documented tensor layout with the independent
    ``reference_unpack``/``reference_dequantize`` above: every linear must reconstruct the
    in-memory dequantized weights exactly."""
    model = compress_rtn(tiny_model(family), RTNOptions(bits=bits, group_size=group_size, symmetric=symmetric), context)
    options = GPTQExportOptions(checkpoint_format=fmt, dtype="float32")
    assert check_gptq(model, options) == []
    export_gptq(model, tmp_path, options, None)
    tensors = load_file(tmp_path / "model.safetensors")
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config == json.loads((tmp_path / "quantize_config.json").read_text())
    assert (config["quant_method"], config["bits"], config["group_size"], config["sym"], config["desc_act"],
            config["checkpoint_format"]) == ("gptq", bits, group_size, symmetric, False, fmt)
    checked = 0
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            weight = reference_dequantize(tensors, name + ".", bits, module.in_features, module.out_features, fmt)
            assert torch.equal(weight, module.dequantize()), name
            if module.bias is not None:
                assert torch.equal(tensors[name + ".bias"].float(), module.bias.data.half().float())
            assert name + ".weight" not in tensors
            checked += 1
    assert checked == 14 if family == "llama" else checked == 8
    # the dense rest: norms, embeddings and head, as in the model
    state = model.state_dict()
    for key in ("lm_head.weight", "model.norm.weight" if family == "llama" else "transformer.ln_f.weight"):
        assert torch.equal(tensors[key], state[key])


def test_gptq_v1_stores_zero_minus_one(context, tmp_path):
    model = compress_rtn(tiny_model("llama"), RTNOptions(bits=4, group_size=32, symmetric=True), context)
    export_gptq(model, tmp_path, GPTQExportOptions(), None)
    qzeros = load_file(tmp_path / "model.safetensors")["model.layers.0.self_attn.q_proj.qzeros"]
    # symmetric 4-bit zero point 8 is stored as 7 in every nibble: 0x77777777
    assert bool((qzeros == 0x77777777).all())


def test_gptq_v1_refuses_a_zero_point_of_zero(context):
    model = compress_rtn(tiny_model("llama"), RTNOptions(bits=4, group_size=32, symmetric=False), context)
    layer = model.model.layers[0].self_attn.q_proj
    layer.storage.zeros[0, 0] = 0
    problems = check_gptq(model, GPTQExportOptions(checkpoint_format="gptq"))
    assert any("gptq_v2" in p for p in problems)
    assert check_gptq(model, GPTQExportOptions(checkpoint_format="gptq_v2")) == []


def test_gptq_export_refuses_what_it_cannot_hold(context, tmp_path):
    dense = tiny_model("llama")
    assert any("no quantized linear" in p for p in check_gptq(dense, GPTQExportOptions()))
    partial = compress_rtn(tiny_model("llama"), RTNOptions(targets=["*.q_proj"]), context)
    assert any("dense" in p for p in check_gptq(partial, GPTQExportOptions()))
    with pytest.raises(pocketlm.PocketError):
        export_gptq(partial, tmp_path, GPTQExportOptions(), None)
    seven = compress_rtn(tiny_model("llama"), RTNOptions(bits=7, group_size=32), context)
    assert "gptq kernels read 2, 3, 4 or 8 bits, not 7: export 7-bit grids with gguf" in check_gptq(seven, GPTQExportOptions())


def test_gptq_export_writes_a_tied_quantized_embedding(context, tmp_path):
    model = tiny_model("llama")
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    compress_rtn(model, RTNOptions(bits=4, group_size=32), context)
    compress_rtn(model, RTNOptions(bits=8, group_size=-1, targets=["embed"]), context)
    export_gptq(model, tmp_path, GPTQExportOptions(dtype="float32"), None)
    tensors = load_file(tmp_path / "model.safetensors")
    assert torch.equal(tensors["model.embed_tokens.weight"], model.model.embed_tokens.dequantize())
    assert "lm_head.weight" not in tensors and "lm_head.qweight" not in tensors  # tied: stored once
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is True


# ------------------------------------------- compressed-tensors: reloaded through transformers


def _reload(path):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    # run_compressed=False: decompress on load (CPU). The default path mis-sizes asymmetric
    # packed zero points in transformers 5.24 + compressed-tensors 0.20.
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=CompressedTensorsConfig(run_compressed=False)).eval()


@pytest.mark.parametrize("family,method,bits,group_size,symmetric,dtype", [
    ("llama", "gptq", 4, 32, True, "float32"), ("llama", "rtn", 4, 64, False, "float32"),
    ("llama", "rtn", 8, -1, True, "float32"), ("llama", "rtn", 3, 32, False, "float32"),
    ("llama", "rtn", 4, 32, True, "float16"), ("opt", "gptq", 4, 32, False, "float32"),
    ("llama", "rtn", 7, -1, False, "float32"),
])
def test_compressed_tensors_export_reloads_in_transformers(family, method, bits, group_size, symmetric, dtype, windows,
                                                          context, tmp_path):
    """Exported, then loaded back by transformers (compressed-tensors decompresses on CPU): the
    logits match the in-memory quantized model."""
    compress, options = (compress_gptq, GPTQOptions) if method == "gptq" else (compress_rtn, RTNOptions)
    model = compress(tiny_model(family), options(bits=bits, group_size=group_size, symmetric=symmetric), context)
    options = CTExportOptions(dtype=dtype)
    assert check_compressed_tensors(model, options) == []
    export_compressed_tensors(model, tmp_path, options, None)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    weights = config["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["symmetric"]) == (bits, symmetric)
    tensors = load_file(tmp_path / "model.safetensors")
    prefix = "model.layers.0.self_attn.q_proj." if family == "llama" else "model.decoder.layers.0.self_attn.q_proj."
    assert tensors[prefix + "weight_packed"].dtype == torch.int32
    assert tensors[prefix + "weight_packed"].shape == (64, 64 * bits // 32)
    reloaded = _reload(tmp_path)
    with torch.no_grad():
        expected = model(input_ids=windows).logits
        got = reloaded(input_ids=windows).logits.float()
    tolerance = 1e-4 if dtype == "float32" else 2e-2
    assert (got - expected).abs().max() <= tolerance * expected.abs().max()


def test_compressed_tensors_refuses_conv1d_and_partial_groups(context):
    gpt2 = compress_rtn(tiny_model("gpt2"), RTNOptions(), context)
    assert any("Conv1D" in p for p in check_compressed_tensors(gpt2, CTExportOptions()))
    partial = compress_rtn(tiny_model("llama"), RTNOptions(group_size=128, allow_partial_group=True), context)
    assert any("whole groups" in p for p in check_compressed_tensors(partial, CTExportOptions()))
    assert check_gptq(partial, GPTQExportOptions()) == []  # the gptq format holds a short last group


def test_compressed_tensors_export_with_a_tied_quantized_embedding(windows, context, tmp_path):
    model = tiny_model("llama")
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    compress_rtn(model, RTNOptions(bits=8, group_size=-1, targets=["embed"]), context)
    compress_gptq(model, GPTQOptions(bits=4, group_size=32), context)
    export_compressed_tensors(model, tmp_path, CTExportOptions(dtype="float32"), None)
    reloaded = _reload(tmp_path)
    with torch.no_grad():
        expected = model(input_ids=windows).logits
        got = reloaded(input_ids=windows).logits
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
