"""Quantized checkpoint folders as model sources, their integer grids kept exactly.

A folder that another toolkit quantized (``config.json`` with a ``quantization_config``, the
weights in safetensors files) holds per quantized linear a few packed tensors in that toolkit's
layout. A loader plugin knows the layout; what is left is the same for every format and lives
here: build the architecture from the config without handing the model to transformers'
quantizer, read the tensors, let the plugin turn each linear's tensors into a
:class:`pocketlm.weights.QuantizedLinear` (``grids(tensors)``), set those in place and load
every other tensor as stored. A plugin's ``Loader.load`` is then a few lines::

    def load_mine(source, options):
        folder = Path(source).expanduser()

        def grids(tensors):  # pops the tensors it uses
            return {name: my_linear(tensors.pop(f"{name}.packed"), ...) for name in ...}

        return pocketlm.load_quantized_folder(folder, options, grids, what="my checkpoint")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from .components import LoadedModel
from .errors import PocketError
from .modules import get_module, set_module
from .tokenizers import load_tokenizer
from .weights import QuantizedLinear, is_transposed, linear_shape


def exact_float16(scales: torch.Tensor) -> torch.Tensor:
    """``scales`` as float16 (pocketlm's scale dtype), or ``ValueError`` where a value would
    round: a grid is loaded exactly or not at all."""
    half = scales.to(torch.float16)
    if not torch.equal(half.to(scales.dtype), scales):
        raise ValueError(f"its {str(scales.dtype).replace('torch.', '')} scales are not all exact in float16 "
                         "(pocketlm's scale dtype)")
    return half


def config_quantization(folder: Path) -> dict:
    """``quantization_config`` of ``folder``'s config.json ({} where there is none or it is
    unreadable)."""
    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        return {}
    try:
        return json.loads(config_path.read_text()).get("quantization_config") or {}
    except (json.JSONDecodeError, AttributeError):
        return {}


def _read_tensors(folder: Path, what: str) -> dict[str, torch.Tensor]:
    """Every tensor of ``folder``'s safetensors files, by name."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise PocketError(f"{folder} is a {what} without safetensors weights", field="model.source",
                          fix="convert its weights to safetensors")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        tensors.update(load_file(str(path)))
    return tensors


def load_quantized_folder(folder: Path, options,
                          grids: Callable[[dict[str, torch.Tensor]], dict[str, QuantizedLinear]],
                          what: str = "quantized checkpoint") -> LoadedModel:
    """Load the checkpoint folder ``folder`` with its quantized linears as exact grids.

    The architecture comes from ``folder``'s config, its ``quantization_config`` dropped so
    transformers builds a plain model. The tokenizer is read first (a folder without one is
    refused before any weight loads). ``grids(tensors)`` gets every tensor of the folder's
    safetensors files by name, pops the ones it turns into grids and returns
    ``{module name: QuantizedLinear}``; each replaces the module of that name (GPT-2's
    ``Conv1D`` orientation recorded), scales kept in float16 as the checkpoint holds them. Every
    tensor left is loaded as stored, floating-point ones cast to ``options.dtype``.

    ``options`` is the recipe's ``[model]`` section (``dtype``, ``trust_remote_code``);
    ``what`` names the format in messages ("my checkpoint"). A grid whose shape differs from
    the config's linear, or tensors the config does not expect (or expected ones missing), raise
    a :class:`pocketlm.PocketError` naming ``folder`` and ``model.source``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    trust = bool(getattr(options, "trust_remote_code", False))
    tokenizer = load_tokenizer(folder, trust)  # before the weights: a missing one fails fast
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # transformers would hand the model to its quantizer
    dtype = getattr(torch, getattr(options, "dtype", "float32"))
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust)
    tensors = _read_tensors(folder, what)
    quantized = grids(tensors)
    for name, module in quantized.items():
        original = get_module(model, name)
        if (module.out_features, module.in_features) != tuple(linear_shape(original)):
            raise PocketError(f"{folder}: {name} holds a {module.out_features}x{module.in_features} grid, but the "
                              "config builds a different shape", field="model.source")
        module.transposed = is_transposed(original)  # GPT-2's Conv1D: the dense exporter restores it
        set_module(model, name, module)  # scales stay float16: the grid is the checkpoint's
    missing, unexpected = model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v
                                                 for k, v in tensors.items()}, strict=False)
    expected_missing = {k for k in missing if k.startswith(tuple(q + "." for q in quantized))
                        or (k == "lm_head.weight" and getattr(config, "tie_word_embeddings", False))}
    if set(missing) - expected_missing or unexpected:
        raise PocketError(f"{folder}: the weights do not match the config (missing: "
                          f"{sorted(set(missing) - expected_missing)[:3]}, unexpected: {sorted(unexpected)[:3]})",
                          field="model.source")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return LoadedModel(model.eval(), tokenizer, str(folder))
