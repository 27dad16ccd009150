"""pocketlm: make language models pocket-sized with pluggable compression methods.

The public API for plugin authors is everything named here; see docs/plugin-api.md. For
programs and notebooks: ``pocketlm.run(recipe)`` and ``pocketlm.compress(model, tokenizer,
stages=[...])`` (see :mod:`pocketlm.api`).

Names whose modules need torch (``Context``, ``CalibrationSpec``, ``run``, ``compress``, ...)
are imported on first use (PEP 562), so ``import pocketlm`` and the command line start fast.
"""

from __future__ import annotations

import pluggy

__version__ = "0.2.14"

#: The version of the plugin API (hooks, components, context). Plugins declare the range they
#: support in ``POCKETLM_API``. Minor versions only add; a major version may break.
API_VERSION = "1.12"

hookimpl = pluggy.HookimplMarker("pocketlm")

from .components import (  # noqa: E402
    KINDS,
    PHASE_QUANTIZE,
    PHASE_RESTRUCTURE,
    PHASE_SPARSIFY,
    PHASE_TRAIN,
    PHASE_TRANSFORM,
    Architecture,
    Evaluator,
    Exporter,
    GridRule,
    LoadedModel,
    Loader,
    Method,
    NoOptions,
    Options,
    SizeEffect,
    Smooth,
    Translator,
)
from .errors import PocketError  # noqa: E402
from .lazy import Lazy, lazy  # noqa: E402
from .module_types import ModuleType, register_module_type  # noqa: E402
from .progress import Progress  # noqa: E402

# name -> module that defines it, imported on first access
_LAZY = {"CalibrationSpec": "context", "Context": "context",
         "LayerHandler": "calibration", "module_input": "calibration", "batch_rows": "calibration",
         "run": "api", "compress": "api", "Result": "api",
         "is_streamed": "streaming", "require_whole_model": "streaming", "installed_plugins": "plugins",
         "load_tokenizer": "tokenizers", "load_quantized_folder": "quantized_sources"}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pocketlm' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "API_VERSION", "KINDS", "PHASE_QUANTIZE", "PHASE_RESTRUCTURE", "PHASE_SPARSIFY", "PHASE_TRAIN",
    "PHASE_TRANSFORM", "Architecture", "CalibrationSpec", "Context", "Evaluator", "Exporter", "GridRule",
    "LayerHandler", "Lazy", "LoadedModel", "Loader", "Method", "ModuleType", "NoOptions", "Options", "PocketError", "Progress", "Result",
    "SizeEffect", "Smooth", "Translator", "batch_rows", "compress", "hookimpl", "installed_plugins", "is_streamed",
    "lazy", "load_quantized_folder", "load_tokenizer", "module_input", "register_module_type", "require_whole_model",
    "run", "__version__",
]
