"""pocketlm-distill: knowledge distillation for pocketlm (method ``distill``)."""

from __future__ import annotations

from pocketlm import PHASE_TRAIN, Method, SizeEffect, hookimpl

from .distill import DistillOptions, distill, kd_loss, lr_factor
from .encoder import removed_fraction

POCKETLM_API = ">=1.5,<2"
__version__ = "0.3.1"
__all__ = ["DistillOptions", "distill", "kd_loss", "lr_factor"]


def effect(options: DistillOptions) -> SizeEffect:
    """No change in size, unless ``student_layers`` keeps only some layers: a restructured model
    (the share removed is estimated from the option alone, see :func:`removed_fraction`)."""
    if options.student_layers is None:
        return SizeEffect()
    return SizeEffect(params_removed=removed_fraction(options.student_layers), features=frozenset({"restructured"}))


@hookimpl
def register_methods(register):
    register(Method(
        name="distill",
        kind="distill",
        options=DistillOptions,
        compress=distill,
        summary="Knowledge distillation from the original (or a named) teacher: KL on logits at a "
                "temperature, optional CE and hidden-state MSE; encoders (BERT family): sentence-embedding "
                "or masked-LM distillation, student made of every other teacher layer; AdamW + cosine, masks and quantized "
                "grids kept; trains through accelerate (CPU, GPU, multi-process), resumable.",
        needs_calibration=True,
        effect=effect,
        phase=PHASE_TRAIN,
    ))
