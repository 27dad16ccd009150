"""pocketlm-distill: knowledge distillation (method ``distill``) and quantization-aware recovery
(method ``qat``) for pocketlm."""

from __future__ import annotations

from pocketlm import PHASE_QUANTIZE, PHASE_TRAIN, Method, SizeEffect, hookimpl

from .distill import DistillOptions, distill, kd_loss, lr_factor
from .encoder import removed_fraction
from .recovery import QATOptions, qat

POCKETLM_API = ">=1.6,<2"
__version__ = "0.4.1"
__all__ = ["DistillOptions", "QATOptions", "distill", "kd_loss", "lr_factor", "qat"]


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
    # qat trains what a quantizer made, so it goes right after the quantizers in the canonical order
    register(Method(
        name="qat",
        kind="distill",
        options=QATOptions,
        compress=qat,
        summary="Quantization-aware recovery after rtn/gptq (EfficientQAT/LSQ): trains the scales of quantized "
                "layers with the integer grid fixed, block by block to the original layers' outputs, then "
                "optionally end to end by distillation; k-quant super-blocks kept exact, masks kept, resumable.",
        needs_calibration=True,
        effect=lambda options: SizeEffect(),
        phase=PHASE_QUANTIZE + 5,
    ))
