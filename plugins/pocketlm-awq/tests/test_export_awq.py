"""The ``awq`` exporter writes AutoAWQ's GEMM layout.

AutoAWQ, gptqmodel and vLLM cannot be installed into pocketlm's environment (see PEERS.md), so
these tests check the tensors against the documented convention with an independent reference
unpacker written here from the format's description (AutoAWQ ``WQLinear_GEMM.from_linear`` packs
``[in, out]`` integers eight to an int32 word along the output dimension in the order
``AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]``; readers undo it with ``AWQ_REVERSE_ORDER =
[0, 4, 1, 5, 2, 6, 3, 7]``): the unpacked grid, zeros and scales must rebuild the in-memory
dequantized weights exactly, and a dense model rebuilt from the files must give the same logits.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from pocketlm import weights as W
from pocketlm.plugins import get_plugins
from pocketlm.testing import make_context
from pocketlm.testing.models import tiny_model, tiny_windows
from pocketlm_awq.awq import AWQOptions, compress
from pocketlm_awq.export_awq import AWQExportOptions, check, export_awq, pack_awq

AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]


def reference_unpack(qweight, qzeros, scales, group_size):
    """Dequantize one AWQ GEMM layer to ``[out, in]``, independently of the exporter's code."""
    shifts = torch.arange(0, 32, 4)
    def unpack(packed):
        values = (packed.to(torch.int64)[:, :, None] >> shifts) & 0xF  # nibble i of each word
        values = values.reshape(packed.shape[0], -1)
        reverse = torch.arange(values.shape[1]).view(-1, 8)[:, AWQ_REVERSE_ORDER].reshape(-1)
        return values[:, reverse]
    q, zeros = unpack(qweight), unpack(qzeros)  # [in, out], [in / g, out]
    zeros = zeros.repeat_interleave(group_size, dim=0)
    scales = scales.float().repeat_interleave(group_size, dim=0)
    return ((q - zeros).float() * scales).t()


@pytest.fixture(scope="module")
def quantized():
    model = tiny_model("llama", outliers=True)
    compress(model, AWQOptions(bits=4, group_size=32), make_context(tiny_windows(8, 32)))
    return model


def test_pack_order_is_awq_interleaved():
    values = torch.arange(8).view(1, 8)  # output channel i holds value i
    assert int(pack_awq(values)[0, 0]) == 0x75316420  # nibbles: 0, 2, 4, 6, 1, 3, 5, 7
    assert int(pack_awq(torch.full((1, 8), 15))[0, 0]) == -1


def test_export_matches_the_documented_gemm_layout(quantized, tmp_path):
    assert check(quantized, AWQExportOptions()) == []
    export_awq(quantized, tmp_path, AWQExportOptions(), None)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config == {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm",
                      "modules_to_not_convert": ["lm_head"]}
    layers = {n: m for n, m in quantized.named_modules() if isinstance(m, W.QuantizedLinear)}
    assert len(layers) == 14
    for name, module in layers.items():
        qweight, qzeros, scales = (tensors[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales"))
        out_features, in_features = module.out_features, module.in_features
        assert qweight.dtype == torch.int32 and qweight.shape == (in_features, out_features // 8)
        assert qzeros.dtype == torch.int32 and qzeros.shape == (in_features // 32, out_features // 8)
        assert scales.dtype == torch.float16 and scales.shape == (in_features // 32, out_features)
        assert torch.equal(reference_unpack(qweight, qzeros, scales, 32), module.dequantize())
    assert not any(".storage." in k for k in tensors)
    assert tensors["model.embed_tokens.weight"].dtype == torch.float16 and "lm_head.weight" in tensors


def test_a_model_rebuilt_from_the_files_gives_the_same_logits(quantized, tmp_path):
    export_awq(quantized, tmp_path, AWQExportOptions(dtype="float32"), None)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    rebuilt = tiny_model("llama", seed=123)  # different random weights, overwritten below
    state = {k: v for k, v in tensors.items() if not k.endswith((".qweight", ".qzeros", ".scales"))}
    for name, module in quantized.named_modules():
        if isinstance(module, W.QuantizedLinear):
            state[f"{name}.weight"] = reference_unpack(tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"],
                                                       tensors[f"{name}.scales"], module.group_size)
    missing, unexpected = rebuilt.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if "rotary" not in k]
    windows = tiny_windows(2, 32, seed=5)
    with torch.no_grad():
        assert torch.allclose(rebuilt(windows).logits, quantized(windows).logits, atol=1e-5)


def test_check_refuses_what_awq_gemm_cannot_hold():
    context = make_context(tiny_windows(8, 32))
    three = tiny_model("llama")
    compress(three, AWQOptions(bits=3, group_size=32), context)
    problems = check(three, AWQExportOptions())
    assert problems and "4-bit only" in problems[0] and "compressed-tensors" in problems[0]
    per_channel = tiny_model("opt")
    compress(per_channel, AWQOptions(bits=4, group_size=-1), context)
    assert any("group size" in p for p in check(per_channel, AWQExportOptions()))
    conv = tiny_model("gpt2")
    compress(conv, AWQOptions(bits=4, group_size=32), context)
    assert any("Conv1D" in p for p in check(conv, AWQExportOptions()))
    assert "no quantized linear" in check(tiny_model("llama"), AWQExportOptions())[0]


def test_registered_exporter():
    exporter = get_plugins().exporters["awq"]
    # registered lazily (pocketlm.lazy), so registration imports no torch; it resolves to this check
    assert exporter.check.resolve() is check and "quantized" in exporter.represents


def test_compressed_tensors_exporter_reads_the_awq_result(quantized, tmp_path):
    """The result is the core's QuantizedLinear, so the compressed-tensors exporter of
    pocketlm-gptq (when installed) writes it unchanged."""
    exporters = get_plugins().exporters
    if "compressed-tensors" not in exporters:
        pytest.skip("pocketlm-gptq (compressed-tensors exporter) is not installed")
    exporter = exporters["compressed-tensors"]
    options = exporter.options()
    assert (exporter.check(quantized, options) if exporter.check else []) == []
    exporter.export(copy.deepcopy(quantized), tmp_path, options, make_context())
    assert (tmp_path / "config.json").exists()


def test_compress_and_export_through_the_hooks(tmp_path):
    """The pipeline's path: the ``compress`` and ``export`` working hooks dispatch to awq."""
    plugins = get_plugins()
    model = tiny_model("qwen2", outliers=True)
    method, exporter = plugins.methods["awq"], plugins.exporters["awq"]
    context = make_context(tiny_windows(8, 32), plugins=plugins)
    result = plugins.hook.compress(model=model, method=method, options=method.options(group_size=32), context=context)
    assert isinstance(result.model.layers[0].mlp.down_proj, W.QuantizedLinear)
    plugins.hook.export(model=result, exporter=exporter, options=exporter.options(), path=tmp_path, context=context)
    assert "model.layers.0.mlp.down_proj.qweight" in load_file(str(tmp_path / "model.safetensors"))
