"""Stage checkpoints: a model with quantized modules and masks, saved so it reloads exactly.

A checkpoint folder holds ``config.json`` (updated by structural changes), the tokenizer,
``model.safetensors`` (shared tensors stored once), ``masks.safetensors`` and
``pocketlm-modules.json``, which records the modules that replaced dense ones so the loader can
rebuild them before loading the weights. Nothing is pickled.

A plugin whose method replaces modules with a type of its own registers that type with
:func:`register_module_type`: the manifest then records the module under the type's name with
what :func:`describe` returns, and loading asks the registered ``rebuild`` for it, after the
core has rebuilt whatever quantized module it wraps. A checkpoint that names a type no
installed plugin registered is refused with the plugin to install, never loaded without it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, load_model
from torch import nn

from .components import LoadedModel
from .errors import PocketError
from .modules import auto_class, get_module, set_module
from .streaming import save_tensors
from .weights import MASK_BUFFER, QuantizedEmbedding, QuantizedLinear, masks, tied_heads

MANIFEST = "pocketlm-modules.json"


@dataclass(frozen=True)
class ModuleType:
    """A plugin's module type: ``owns(module)`` recognises one, ``describe(module)`` returns the
    JSON-able facts needed to rebuild it, ``rebuild(spec, module)`` turns ``module`` (the model's
    module at that name, already rebuilt by the core when it is quantized) into the plugin's type
    before the weights load. ``provider`` names the distribution for the error message."""

    name: str
    owns: Callable[[nn.Module], bool]
    describe: Callable[[nn.Module], dict]
    rebuild: Callable[[dict, nn.Module], nn.Module]
    provider: str


MODULE_TYPES: dict[str, ModuleType] = {}


def register_module_type(module_type: ModuleType) -> None:
    """Teach checkpoints a plugin's module type (call once, at the plugin's import)."""
    MODULE_TYPES[module_type.name] = module_type


def _describe(model: nn.Module) -> dict[str, dict]:
    tied = tied_heads(model)
    described: dict[str, dict] = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedEmbedding):
            described[name] = {"type": "QuantizedEmbedding", "rows": module.num_embeddings,
                               "cols": module.embedding_dim, "bits": module.bits,
                               "group_size": module.group_size, "symmetric": module.symmetric,
                               "padding_idx": module.padding_idx}
        elif isinstance(module, QuantizedLinear):
            described[name] = {"type": "QuantizedLinear", "in": module.in_features,
                               "out": module.out_features, "bits": module.bits,
                               "group_size": module.group_size, "symmetric": module.symmetric,
                               "bias": module.bias is not None,
                               "g_idx": module.storage.g_idx is not None,
                               "transposed": module.transposed,
                               "shares": tied.get(name)}
        for extension in MODULE_TYPES.values():
            if extension.owns(module):
                entry = described.setdefault(name, {"type": "dense"})
                entry["extension"] = {"type": extension.name, "provider": extension.provider,
                                      **extension.describe(module)}
    return described


def save_checkpoint(model: nn.Module, tokenizer, folder: Path) -> None:
    """Write ``model`` (and ``tokenizer``) into ``folder``, which must not hold another model."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(folder / "config.json")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    (folder / MANIFEST).write_text(json.dumps(_describe(model), indent=1, sort_keys=True))
    save_tensors(model.state_dict(), folder / "model.safetensors")   # one tensor in memory at a time
    save_tensors(masks(model), folder / "masks.safetensors")


def is_checkpoint(folder: Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def _rebuild(spec: dict, model: nn.Module) -> nn.Module:
    if spec["type"] == "dense":
        return None
    if spec["type"] == "QuantizedEmbedding":
        return QuantizedEmbedding(spec["rows"], spec["cols"], spec["bits"], spec["group_size"],
                                  spec["symmetric"], spec.get("padding_idx"))
    if spec.get("shares"):
        return get_module(model, spec["shares"]).tied_head()
    return QuantizedLinear(spec["in"], spec["out"], spec["bits"], spec["group_size"], spec["symmetric"],
                           spec["bias"], spec["g_idx"], spec["transposed"])


def load_checkpoint(folder: Path) -> LoadedModel:
    """Rebuild the model saved by :func:`save_checkpoint`."""
    from transformers import AutoConfig, AutoTokenizer

    folder = Path(folder)
    from . import streaming

    if streaming.is_streamed_checkpoint(folder):
        return streaming.load_streamed_checkpoint(folder)
    try:
        config = AutoConfig.from_pretrained(folder)
        config.tie_word_embeddings = getattr(config, "tie_word_embeddings", False)
        model = auto_class(config).from_config(config, dtype=torch.float32)
        manifest = json.loads((folder / MANIFEST).read_text())
        for name in sorted(manifest, key=lambda n: manifest[n]["type"] != "QuantizedEmbedding"):
            rebuilt = _rebuild(manifest[name], model)
            if rebuilt is not None:
                set_module(model, name, rebuilt)
        for name, spec in manifest.items():
            if "extension" in spec:
                set_module(model, name, _extension(spec["extension"], folder).rebuild(
                    spec["extension"], get_module(model, name)))
        missing, unexpected = load_model(model, str(folder / "model.safetensors"), strict=False)
        missing = [k for k in missing if not _tied_alias(model, k)]
        if missing or unexpected:
            raise ValueError(f"missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}")
        for name, mask in load_file(str(folder / "masks.safetensors")).items():
            get_module(model, name).register_buffer(MASK_BUFFER, mask, persistent=False)
        tokenizer = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").exists() else None
    except PocketError:
        raise
    except Exception as exc:  # noqa: BLE001 - any damage is reported the same way
        raise PocketError(f"the checkpoint in {folder} cannot be loaded: {type(exc).__name__}: {exc}",
                          fix="delete this stage folder and rerun with --resume to recompute it",
                          exit_code=1) from None
    return LoadedModel(model.eval(), tokenizer, str(folder))


def _extension(spec: dict, folder: Path) -> ModuleType:
    known = MODULE_TYPES.get(spec["type"])
    if known is None:
        raise PocketError(f"the checkpoint in {folder} holds {spec['type']} modules, which no installed plugin "
                          "provides", fix=f"pip install {spec.get('provider', 'the plugin that wrote it')}")
    return known


def _tied_alias(model: nn.Module, key: str) -> bool:
    # A tied head's weight is the embedding's tensor; safetensors stores it once.
    return key.endswith("weight") and bool(getattr(model.config, "tie_word_embeddings", False))
