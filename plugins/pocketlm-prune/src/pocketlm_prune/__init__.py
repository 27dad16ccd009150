"""pocketlm-prune: pruning methods for pocketlm.

* ``magnitude``, ``wanda``, ``sparsegpt``: unstructured or N:M (2:4, 4:8) sparsity, recorded as
  masks (:func:`pocketlm.weights.set_mask`) that later stages keep;
* ``prune-width``: removes MLP channels and attention heads (GQA groups) physically;
* ``prune-depth``: removes whole layers, scored or chosen by hand.

Every method works on decoders (causal LMs) and encoders (the BERT family) alike, through the
architecture tables; nothing is named per family.

Registering imports no torch: options, size effects and plans live in :mod:`.options`, and each
method's ``compress`` is imported when it first runs (:func:`pocketlm.lazy`).
"""

from __future__ import annotations

import importlib

from pocketlm import PHASE_RESTRUCTURE, PHASE_SPARSIFY, Method, hookimpl, lazy

from .options import (DepthOptions, MagnitudeOptions, SparseGPTOptions, WandaOptions, WidthOptions, depth_effect,
                      depth_plan, prune_effect, sparsity_plan, width_effect, width_plan)

__version__ = "0.3.1"
POCKETLM_API = ">=1.8,<2"

_NOT_AFTER = frozenset({"quantize"})
_SUBMODULES = ("common", "depth", "magnitude", "sparsegpt", "translate_llmc", "wanda", "width")


def methods() -> list[Method]:
    return [
        Method(name="magnitude", kind="prune", options=MagnitudeOptions,
               compress=lazy("pocketlm_prune.magnitude:compress"),
               summary="zero the smallest weights (per layer or global; unstructured or N:M)",
               needs_calibration=False, effect=prune_effect, phase=PHASE_SPARSIFY, not_after=_NOT_AFTER,
               plan=sparsity_plan),
        Method(name="wanda", kind="prune", options=WandaOptions,
               compress=lazy("pocketlm_prune.wanda:compress"),
               summary="Wanda: prune by |W|·‖X‖ within each output row (unstructured or N:M)",
               needs_calibration=True, effect=prune_effect, phase=PHASE_SPARSIFY, not_after=_NOT_AFTER,
               plan=sparsity_plan),
        Method(name="sparsegpt", kind="prune", options=SparseGPTOptions,
               compress=lazy("pocketlm_prune.sparsegpt:compress"),
               summary="SparseGPT: Hessian-based pruning with weight reconstruction (unstructured or N:M)",
               needs_calibration=True, effect=prune_effect, phase=PHASE_SPARSIFY, not_after=_NOT_AFTER,
               plan=sparsity_plan),
        Method(name="prune-width", kind="prune", options=WidthOptions,
               compress=lazy("pocketlm_prune.width:compress"),
               summary="remove MLP channels and attention head groups by activation importance (Minitron)",
               needs_calibration=True, effect=width_effect, phase=PHASE_RESTRUCTURE, not_after=_NOT_AFTER,
               plan=width_plan),
        Method(name="prune-depth", kind="prune", options=DepthOptions,
               compress=lazy("pocketlm_prune.depth:compress"),
               summary="remove whole layers: by block influence, loss or sentence-embedding change, or by index",
               needs_calibration=True, effect=depth_effect, phase=PHASE_RESTRUCTURE, not_after=_NOT_AFTER,
               plan=depth_plan),
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


def __getattr__(name: str):
    # the method modules (they import torch) were attributes of the package before: load on use
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
