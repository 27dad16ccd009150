"""A checkpoint llm-compressor wrote itself, in its own environment (``data/llmc-w4a16-g32``, made
by ``data/make_llmc_checkpoint.py``: GPTQModifier W4A16 symmetric group 32 on a tiny random Llama,
saved pack-quantized, with compressed-tensors' own decompression of it beside the folder).

pocketlm loads it with every grid exact: its dequantized weights equal compressed-tensors'
bit for bit (the scales are float16 values and ``q * scale`` with ``|q| <= 8`` is exact in
float32, so neither side rounds), and the GGUF exporter writes it as Q4_0 blocks that gguf-py
dequantizes to the very same weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pocketlm.weights import QuantizedLinear

FOLDER = Path(__file__).parent / "data" / "llmc-w4a16-g32"
DECOMPRESSED = FOLDER.with_name(FOLDER.name + ".decompressed.safetensors")
GGUF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj"}


class _Options:
    dtype = "float32"
    trust_remote_code = False


def _decompressed() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(DECOMPRESSED))


def _load():
    pytest.importorskip("compressed_tensors")
    from pocketlm_gptq.import_compressed_tensors import is_compressed_tensors_folder, load_compressed_tensors

    assert is_compressed_tensors_folder(str(FOLDER))
    return load_compressed_tensors(str(FOLDER), _Options()).model


def test_every_linear_of_the_llmcompressor_checkpoint_is_a_4bit_group32_grid():
    model = _load()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, (QuantizedLinear, torch.nn.Linear))}
    quantized = {n: m for n, m in linears.items() if isinstance(m, QuantizedLinear)}
    assert sorted(quantized) == sorted(name[: -len(".weight")] for name in _decompressed())
    assert len(quantized) == 14 and set(linears) - set(quantized) == {"lm_head"}  # 2 layers x 7; head ignored
    for name, module in quantized.items():
        assert (module.bits, module.group_size, module.symmetric) == (4, 32, True), name
        assert module.storage.g_idx is None, name  # act-order off: plain group order


def test_its_dequantized_weights_equal_compressed_tensors_decompression_exactly():
    model = _load()
    modules = dict(model.named_modules())
    for key, reference in _decompressed().items():
        ours = modules[key[: -len(".weight")]].dequantize()
        assert ours.dtype == reference.dtype == torch.float32
        assert torch.equal(ours, reference), key
    # not a trivial equality: the weights really sit on a 4-bit grid of 32-wide groups
    down = modules["model.layers.0.mlp.down_proj"]
    assert 8 < len(torch.unique(down.storage.grid()[0, :32])) <= 16


def test_it_exports_to_q4_0_gguf_that_dequantizes_to_the_same_weights_bit_for_bit(tmp_path):
    gguf = pytest.importorskip("gguf")
    pytest.importorskip("compressed_tensors")
    from pocketlm.pipeline import Run
    from pocketlm.plugins import get_plugins
    from pocketlm.recipe import parse_recipe

    plugins = get_plugins()
    if "gguf" not in plugins.exporters:
        pytest.skip("needs pocketlm-gguf")
    from pocketlm_gguf.blocks import rope_permutation

    text = (f'[model]\nsource = "{FOLDER}"\n[evaluate]\nmetrics = []\nper_stage = []\n'
            '[export]\nformat = "gguf"\ntokenizer = false\n')
    Run(parse_recipe(text, plugins), tmp_path / "run", plugins, echo=lambda m: None).execute()
    reader = gguf.GGUFReader(tmp_path / "run" / "export" / "model.gguf")
    reference = _decompressed()
    heads = {"attn_q": 4, "attn_k": 2}
    compared = 0
    for tensor in reader.tensors:
        parts = tensor.name.split(".")
        if parts[0] != "blk" or parts[2] not in GGUF_NAMES:
            continue
        assert tensor.tensor_type.name == "Q4_0", tensor.name
        rows, cols = int(tensor.shape[1]), int(tensor.shape[0])
        values = gguf.dequantize(tensor.data, tensor.tensor_type).reshape(rows, cols)
        if parts[2] in heads:  # llama.cpp's q/k row order, undone
            values = values[np.argsort(rope_permutation(rows, heads[parts[2]]))]
        expected = reference[f"model.layers.{parts[1]}.{GGUF_NAMES[parts[2]]}.weight"]
        assert torch.equal(torch.from_numpy(np.ascontiguousarray(values)), expected), tensor.name
        compared += 1
    assert compared == 14
