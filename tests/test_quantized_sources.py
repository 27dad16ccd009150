"""``pocketlm.load_quantized_folder``: a toy quantized format (plain integer grids beside the
dense tensors) loads with its grids exactly, and a folder that does not fit its config is refused
naming the folder and ``model.source``."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import pocketlm
from pocketlm import PocketError
from pocketlm.quantized_sources import config_quantization
from pocketlm.testing.models import save_tiny_model
from pocketlm.weights import QuantizedLinear

OPTIONS = SimpleNamespace(dtype="float32", trust_remote_code=False)
NAMES = ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj")


def _toy_folder(folder):
    """A tiny llama whose two linears are stored as ``toy_q``/``toy_scales``/``toy_zeros`` (4-bit,
    groups of 32) and a ``quantization_config`` naming the toy format; returns the grids."""
    save_tiny_model(folder, "llama")
    weights = folder / "model.safetensors"
    tensors = load_file(str(weights))
    generator = torch.Generator().manual_seed(0)
    grids = {}
    for name in NAMES:
        rows, cols = tensors.pop(f"{name}.weight").shape
        grids[name] = (torch.randint(0, 16, (rows, cols), generator=generator),
                       (torch.rand(rows, cols // 32, generator=generator) / 10 + 0.01).half(),
                       torch.randint(0, 16, (rows, cols // 32), generator=generator))
        q, scales, zeros = grids[name]
        tensors.update({f"{name}.toy_q": q.to(torch.uint8), f"{name}.toy_scales": scales,
                        f"{name}.toy_zeros": zeros.to(torch.uint8)})
    save_file(tensors, str(weights), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "toy", "bits": 4, "group_size": 32}
    (folder / "config.json").write_text(json.dumps(config))
    return grids


def _toy_grids(tensors):
    names = sorted(n[: -len(".toy_q")] for n in tensors if n.endswith(".toy_q"))
    return {name: QuantizedLinear.from_grid(tensors.pop(f"{name}.toy_q").long(), tensors.pop(f"{name}.toy_scales"),
                                            tensors.pop(f"{name}.toy_zeros").long(), bits=4, group_size=32,
                                            symmetric=False)
            for name in names}


def test_a_toy_format_loads_with_its_grids_exactly(tmp_path):
    grids = _toy_folder(tmp_path)
    assert config_quantization(tmp_path) == {"quant_method": "toy", "bits": 4, "group_size": 32}
    assert config_quantization(tmp_path / "nowhere") == {}
    loaded = pocketlm.load_quantized_folder(tmp_path, OPTIONS, _toy_grids, what="toy checkpoint")
    assert loaded.source == str(tmp_path) and loaded.tokenizer is not None
    quantized = {n: m for n, m in loaded.model.named_modules() if isinstance(m, QuantizedLinear)}
    assert sorted(quantized) == sorted(NAMES)
    for name, (q, scales, zeros) in grids.items():
        storage = quantized[name].storage
        assert torch.equal(storage.grid().long(), q) and torch.equal(storage.scales, scales)
        assert torch.equal(storage.zeros.long(), zeros)
    stored = load_file(str(tmp_path / "model.safetensors"))
    assert torch.equal(loaded.model.model.norm.weight, stored["model.norm.weight"])
    assert not hasattr(loaded.model.config, "quantization_config")


def test_a_folder_that_does_not_fit_its_config_is_refused(tmp_path):
    _toy_folder(tmp_path)

    def wrong_name(tensors):  # the down projection's grid set on the up projection
        grids = _toy_grids(tensors)
        grids["model.layers.0.mlp.up_proj"] = grids.pop(NAMES[0])
        return grids

    with pytest.raises(PocketError) as error:
        pocketlm.load_quantized_folder(tmp_path, OPTIONS, wrong_name)
    assert f"{tmp_path}: model.layers.0.mlp.up_proj holds a 64x128 grid, but the config builds a different shape" \
        == error.value.message and error.value.field == "model.source"

    with pytest.raises(PocketError) as error:  # nothing takes the toy tensors
        pocketlm.load_quantized_folder(tmp_path, OPTIONS, lambda tensors: {})
    assert f"{tmp_path}: the weights do not match the config (missing: ['model.layers.0.mlp.down_proj.weight'" \
        in error.value.message

    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(PocketError) as error:
        pocketlm.load_quantized_folder(tmp_path, OPTIONS, _toy_grids, what="toy checkpoint")
    assert error.value.message == f"{tmp_path} is a toy checkpoint without safetensors weights"
    assert error.value.fix == "convert its weights to safetensors"
