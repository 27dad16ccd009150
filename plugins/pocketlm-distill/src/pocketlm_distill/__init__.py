"""pocketlm-distill: knowledge distillation (method ``distill``) and quantization-aware recovery
(method ``qat``) for pocketlm."""

from __future__ import annotations

from pocketlm import PHASE_QUANTIZE, PHASE_TRAIN, Method, SizeEffect, hookimpl

from .distill import DistillOptions, distill, kd_loss, lr_factor
from .encoder import removed_fraction
from .recovery import QATOptions, qat

POCKETLM_API = ">=1.7,<2"
__version__ = "0.5.0"
__all__ = ["DistillOptions", "QATOptions", "distill", "kd_loss", "lr_factor", "qat"]


def effect(options: DistillOptions) -> SizeEffect:
    """No change in size, unless ``student_layers`` keeps only some layers: a restructured model
    (the share removed is estimated from the option alone, see :func:`removed_fraction`)."""
    if options.student_layers is None:
        return SizeEffect()
    return SizeEffect(params_removed=removed_fraction(options.student_layers), features=frozenset({"restructured"}))


def recovery_effect(options: QATOptions) -> SizeEffect:
    """No change in size. The planner's prior of the loss won back is what the reference model
    measured (README, Benchmark): the block phase took retention from 0.806 to 0.829 (12% of the
    loss), end-to-end steps to 0.854 (25%)."""
    return SizeEffect(recovers=0.25 if options.e2e_steps else 0.12)


def recovery_plan(budget=None) -> list[dict]:
    """What the planner may try for ``qat``: the block-wise phase at its defaults (2 passes per
    layer), after whichever quantizer the candidate holds; the size does not change."""
    return [{"epochs": 2}]


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
        effect=recovery_effect,
        phase=PHASE_QUANTIZE + 5,
        needs_before=frozenset({"quantize"}),
        plan=recovery_plan,
    ))
