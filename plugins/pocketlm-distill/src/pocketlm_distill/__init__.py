"""pocketlm-distill: knowledge distillation for pocketlm (method ``distill``)."""

from __future__ import annotations

from pocketlm import PHASE_TRAIN, Method, SizeEffect, hookimpl

from .distill import DistillOptions, distill, kd_loss, lr_factor

POCKETLM_API = ">=1.3,<2"
__version__ = "0.2.2"
__all__ = ["DistillOptions", "distill", "kd_loss", "lr_factor"]


@hookimpl
def register_methods(register):
    register(Method(
        name="distill",
        kind="distill",
        options=DistillOptions,
        compress=distill,
        summary="Knowledge distillation from the original (or a named) teacher: KL on logits at a "
                "temperature, optional CE and hidden-state MSE; AdamW + cosine, masks and quantized "
                "grids kept; trains through accelerate (CPU, GPU, multi-process), resumable.",
        needs_calibration=True,
        effect=lambda options: SizeEffect(),
        phase=PHASE_TRAIN,
    ))
