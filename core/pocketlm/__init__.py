"""pocketlm: make language models pocket-sized with pluggable compression methods.

The public API for plugin authors is everything imported here; see docs/plugin-api.md.
"""

from __future__ import annotations

import pluggy

__version__ = "0.1.3"

#: The version of the plugin API (hooks, components, context). Plugins declare the range they
#: support in ``POCKETLM_API``. Minor versions only add; a major version may break.
API_VERSION = "1.3"

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
)
from .context import CalibrationSpec, Context, Progress  # noqa: E402
from .errors import PocketError  # noqa: E402

__all__ = [
    "API_VERSION", "KINDS", "PHASE_QUANTIZE", "PHASE_RESTRUCTURE", "PHASE_SPARSIFY", "PHASE_TRAIN",
    "PHASE_TRANSFORM", "Architecture", "CalibrationSpec", "Context", "Evaluator", "Exporter", "GridRule",
    "LoadedModel", "Loader", "Method", "NoOptions", "Options", "PocketError", "Progress",
    "SizeEffect", "Smooth", "hookimpl", "__version__",
]
