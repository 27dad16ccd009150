"""pocketlm-distill: knowledge distillation (method ``distill``) and quantization-aware recovery
(method ``qat``) for pocketlm.

Registering imports no torch: options and size effects live in :mod:`.options`, the training
code is imported when a method first runs (:func:`pocketlm.lazy`) or one of its names is read.
"""

from __future__ import annotations

import importlib
import sys
import types

from pocketlm import PHASE_QUANTIZE, PHASE_TRAIN, Method, hookimpl, lazy

from .options import DistillOptions, QATOptions, effect, recovery_effect, recovery_plan, removed_fraction  # noqa: F401

POCKETLM_API = ">=1.12,<2"
__version__ = "0.12.1"
__all__ = ["DistillOptions", "QATOptions", "distill", "kd_loss", "lr_factor", "qat"]

# heavy names of the package, imported from their module on first use (PEP 562)
_HEAVY = {"distill": "distill", "kd_loss": "distill", "lr_factor": "distill", "qat": "recovery"}
_SUBMODULES = ("distill", "encoder", "recovery")


@hookimpl
def register_methods(register):
    register(Method(
        name="distill",
        kind="distill",
        options=DistillOptions,
        compress=lazy("pocketlm_distill.distill:distill"),
        summary="Knowledge distillation from the original (or a named) teacher: KL on logits at a "
                "temperature, optional CE and hidden-state MSE; encoders (BERT family): sentence-embedding "
                "or masked-LM distillation, student made of every other teacher layer; AdamW + cosine, masks and quantized "
                "grids kept; trains through accelerate (CPU, GPU, multi-process), resumable.",
        needs_calibration=True,
        effect=effect,
        phase=PHASE_TRAIN,
    ))
    # qat trains what a quantizer made, so it goes right after the quantizers in the canonical order
    register(Method(
        name="qat",
        kind="distill",
        options=QATOptions,
        compress=lazy("pocketlm_distill.recovery:qat"),
        summary="Quantization-aware recovery after rtn/gptq (EfficientQAT/LSQ): trains the scales of quantized "
                "layers with the integer grid fixed, block by block to the original layers' outputs, then "
                "optionally end to end by distillation; k-quant super-blocks kept exact, masks kept, resumable.",
        needs_calibration=True,
        effect=recovery_effect,
        phase=PHASE_QUANTIZE + 5,
        needs_before=frozenset({"quantize"}),
        plan=recovery_plan,
    ))


def __getattr__(name: str):
    if name in _HEAVY:
        value = getattr(importlib.import_module(f".{_HEAVY[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Package(types.ModuleType):
    """Importing the submodule ``pocketlm_distill.distill`` binds the package's name ``distill``
    to it; the name stays the function ``distill``, as it was when the package imported it."""

    def __setattr__(self, name, value):
        if name == "distill" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
