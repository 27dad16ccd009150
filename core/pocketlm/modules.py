"""Finding and replacing submodules by dotted name, and the architecture of a model."""

from __future__ import annotations

import fnmatch
from typing import Iterable

from torch import nn

from .components import Architecture
from .errors import PocketError
from .weights import is_linear


def get_module(root: nn.Module, name: str) -> nn.Module:
    """``root``'s submodule at dotted ``name`` ("" is ``root`` itself)."""
    return root.get_submodule(name) if name else root


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace ``root``'s submodule at dotted ``name`` with ``module``."""
    parent_name, _, child = name.rpartition(".")
    setattr(get_module(root, parent_name), child, module)


def find_architecture(model: nn.Module, architectures: Iterable[Architecture]) -> Architecture:
    """The registered architecture whose ``model_types`` holds ``model.config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for architecture in architectures:
        if model_type in architecture.model_types:
            return architecture
    known = sorted({t for a in architectures for t in a.model_types})
    raise PocketError(
        f"no architecture is registered for model type {model_type!r}",
        fix="register one through the register_architectures hook (see docs/plugin-api.md); "
        f"known model types: {', '.join(known)}",
    )


def decoder_layers(model: nn.Module, architecture: Architecture) -> nn.ModuleList:
    return get_module(model, architecture.layers)


def matches(name: str, patterns: Iterable[str]) -> bool:
    """True when ``name`` matches any glob pattern, or a pattern names one of its parents
    or its last components (``"lm_head"`` matches ``"lm_head"``; ``"*.q_proj"`` and
    ``"q_proj"`` match ``"model.layers.0.self_attn.q_proj"``)."""
    for pattern in patterns:
        if fnmatch.fnmatchcase(name, pattern) or name == pattern or name.endswith("." + pattern):
            return True
        if name.startswith(pattern + "."):
            return True
    return False


def select_linears(model: nn.Module, targets: Iterable[str], ignore: Iterable[str]) -> dict[str, nn.Module]:
    """Linear modules whose names match ``targets`` and none of ``ignore``."""
    targets, ignore = list(targets), list(ignore)
    return {
        name: module
        for name, module in model.named_modules()
        if name and is_linear(module) and matches(name, targets) and not matches(name, ignore)
    }
