"""The manifest of the modules that replaced dense ones (quantized linears and embeddings, a
plugin's own module types): what a stage checkpoint and a layer shard record so that loading
rebuilds each module before its weights are read. Nothing is pickled.

A plugin whose method replaces modules with a type of its own registers that type with
:func:`pocketlm.register_module_type` (also importable from :mod:`pocketlm.checkpoint`). This
module imports torch only when a manifest is written or read, so a plugin may register its type
when it is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

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


def describe_modules(model: nn.Module) -> dict[str, dict]:
    """The manifest of ``model``: for each module that replaced a dense one (a quantized linear or
    embedding, a registered plugin type), what rebuilding it takes, as JSON-able facts."""
    from .weights import QuantizedEmbedding, QuantizedLinear, tied_heads

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


def rebuild_module(spec: dict, model: nn.Module) -> nn.Module | None:
    """An empty quantized module as ``spec`` (a manifest entry) describes it, ready for its
    weights (a tied head shares its embedding's storage in ``model``); None for a dense one."""
    from .modules import get_module
    from .weights import QuantizedEmbedding, QuantizedLinear

    if spec["type"] == "dense":
        return None
    if spec["type"] == "QuantizedEmbedding":
        return QuantizedEmbedding(spec["rows"], spec["cols"], spec["bits"], spec["group_size"],
                                  spec["symmetric"], spec.get("padding_idx"))
    if spec.get("shares"):
        return get_module(model, spec["shares"]).tied_head()
    return QuantizedLinear(spec["in"], spec["out"], spec["bits"], spec["group_size"], spec["symmetric"],
                           spec["bias"], spec["g_idx"], spec["transposed"])
