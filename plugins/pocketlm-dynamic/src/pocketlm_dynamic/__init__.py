"""pocketlm-dynamic: activation sparsity (dynamic pruning) for pocketlm.

* method ``activation-sparsity`` (kind ``prune``, phase sparsify): calibrates one threshold per
  linear input (TEAL) or per MLP gate activation (CATS) so that a target fraction of input
  channels is skipped at run time (:mod:`pocketlm_dynamic.sparsity`);
* a batch-1 decode path that reads only the surviving weight columns
  (:mod:`pocketlm_dynamic.decode`);
* exporter ``dynamic``: any installed format for the weights plus the thresholds as a sidecar
  JSON (and inside a GGUF file's metadata); a loader that runs such an export with its
  thresholds (:mod:`pocketlm_dynamic.export`).

Thresholds survive later stages: a quantizer after ``activation-sparsity`` replaces the linears,
and the ``compress`` wrapper below puts the thresholds back on the replacements.
"""

from __future__ import annotations

from pocketlm import PHASE_SPARSIFY, Exporter, Loader, Method, hookimpl
from pocketlm.checkpoint import ModuleType, register_module_type

from . import export, sparsity

__version__ = "0.1.2"
POCKETLM_API = ">=1.6,<2"


def _describe(module) -> dict:
    return {where: float(module._buffers[where]) for where in (sparsity.INPUT, sparsity.OUTPUT)
            if where in module._buffers}


def _rebuild(spec: dict, module):
    for where in (sparsity.INPUT, sparsity.OUTPUT):
        if where in spec:
            sparsity.set_threshold(module, where, spec[where])
    return module


register_module_type(ModuleType("thresholded", owns=lambda m: isinstance(m, sparsity.Thresholded),
                                describe=_describe, rebuild=_rebuild, provider="pocketlm-dynamic"))


@hookimpl
def register_methods(register):
    register(Method(
        name="activation-sparsity", kind="prune", options=sparsity.ActivationSparsityOptions,
        compress=sparsity.compress, needs_calibration=True, effect=sparsity.effect, phase=PHASE_SPARSIFY,
        plan=sparsity.plan,
        summary="skip small input channels at run time (TEAL / CATS thresholds); size unchanged, "
                "batch-1 decoding reads fewer weight columns"))


@hookimpl
def register_exporters(register):
    register(Exporter(
        "dynamic", export.DynamicExportOptions, export.export_dynamic,
        represents=frozenset({"dense", "masked", "restructured", "quantized", "thresholds"}),
        packs=frozenset({"thresholds"}), check=export.check,
        summary="the weights in another installed format plus activation thresholds (sidecar JSON, GGUF metadata)"))


@hookimpl
def register_loaders(register):
    register(Loader("dynamic", export.is_dynamic_export, export.load_dynamic,
                    summary="a `dynamic` export: its weights with the activation thresholds applied"))


@hookimpl(wrapper=True)
def compress(model, method, options, context):
    # A later stage may replace thresholded linears (a quantizer does); put the thresholds back.
    before = sparsity.thresholds(model)
    result = yield
    if before:
        sparsity.carry(before, model if result is None else result)
    return result
