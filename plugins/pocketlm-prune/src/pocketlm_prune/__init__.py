"""pocketlm-prune: pruning methods for pocketlm.

* ``magnitude``, ``wanda``, ``sparsegpt``: unstructured or N:M (2:4, 4:8) sparsity, recorded as
  masks (:func:`pocketlm.weights.set_mask`) that later stages keep;
* ``prune-width``: removes MLP channels and attention heads (GQA groups) physically;
* ``prune-depth``: removes whole layers, scored or chosen by hand.

Every method works on decoders (causal LMs) and encoders (the BERT family) alike, through the
architecture tables; nothing is named per family.
"""

from __future__ import annotations

from pocketlm import PHASE_RESTRUCTURE, PHASE_SPARSIFY, Method, hookimpl

from . import depth, magnitude, sparsegpt, wanda, width
from .common import prune_effect

__version__ = "0.3.0"
POCKETLM_API = ">=1.7,<2"

_NOT_AFTER = frozenset({"quantize"})


def methods() -> list[Method]:
    return [
        Method(name="magnitude", kind="prune", options=magnitude.MagnitudeOptions, compress=magnitude.compress,
               summary="zero the smallest weights (per layer or global; unstructured or N:M)",
               needs_calibration=False, effect=prune_effect, phase=PHASE_SPARSIFY, not_after=_NOT_AFTER,
               plan=magnitude.plan),
        Method(name="wanda", kind="prune", options=wanda.WandaOptions, compress=wanda.compress,
               summary="Wanda: prune by |W|·‖X‖ within each output row (unstructured or N:M)",
               needs_calibration=True, effect=prune_effect, phase=PHASE_SPARSIFY, not_after=_NOT_AFTER,
               plan=wanda.plan),
        Method(name="sparsegpt", kind="prune", options=sparsegpt.SparseGPTOptions, compress=sparsegpt.compress,
               summary="SparseGPT: Hessian-based pruning with weight reconstruction (unstructured or N:M)",
               needs_calibration=True, effect=prune_effect, phase=PHASE_SPARSIFY, not_after=_NOT_AFTER,
               plan=sparsegpt.plan),
        Method(name="prune-width", kind="prune", options=width.WidthOptions, compress=width.compress,
               summary="remove MLP channels and attention head groups by activation importance (Minitron)",
               needs_calibration=True, effect=width.effect, phase=PHASE_RESTRUCTURE, not_after=_NOT_AFTER,
               plan=width.plan),
        Method(name="prune-depth", kind="prune", options=depth.DepthOptions, compress=depth.compress,
               summary="remove whole layers: by block influence, loss or sentence-embedding change, or by index",
               needs_calibration=True, effect=depth.effect, phase=PHASE_RESTRUCTURE, not_after=_NOT_AFTER,
               plan=depth.plan),
    ]


@hookimpl
def register_methods(register):
    for method in methods():
        register(method)


@hookimpl
def register_translators(register):
    from pocketlm import Translator

    from . import translate_llmc as t

    register(Translator("SparseGPTModifier", t.translate_sparsegpt, "a sparsegpt stage"))
    register(Translator("WandaPruningModifier", t.translate_wanda, "a wanda stage"))
    register(Translator("MagnitudePruningModifier", t.translate_magnitude, "a magnitude stage (one-shot only)"))
    register(Translator("GMPruningModifier", t.translate_magnitude, "a magnitude stage (one-shot only)"))
    register(Translator("ConstantPruningModifier", t.translate_constant,
                        "no stage: later stages keep every pruning mask at zero"))
