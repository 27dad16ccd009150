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

Registering imports no torch: options, size effect, plans and the loader's detection live in
:mod:`.options`, and the code that works on tensors is imported when first called
(:func:`pocketlm.lazy`).
"""

from __future__ import annotations

import importlib

from pocketlm import PHASE_SPARSIFY, Exporter, Loader, Method, ModuleType, hookimpl, lazy, register_module_type

from .options import ActivationSparsityOptions, DynamicExportOptions, effect, is_dynamic_export, plan

__version__ = "0.3.0"
POCKETLM_API = ">=1.8,<2"

_SUBMODULES = ("decode", "export", "kernel", "sparsity")

register_module_type(ModuleType("thresholded", owns=lazy("pocketlm_dynamic.sparsity:is_thresholded"),
                                describe=lazy("pocketlm_dynamic.sparsity:describe_thresholds"),
                                rebuild=lazy("pocketlm_dynamic.sparsity:rebuild_thresholds"),
                                provider="pocketlm-dynamic"))


@hookimpl
def register_methods(register):
    register(Method(
        name="activation-sparsity", kind="prune", options=ActivationSparsityOptions,
        compress=lazy("pocketlm_dynamic.sparsity:compress"), needs_calibration=True, effect=effect,
        phase=PHASE_SPARSIFY, plan=plan,
        summary="skip small input channels at run time (TEAL / CATS thresholds); size unchanged, "
                "batch-1 decoding reads fewer weight columns"))


@hookimpl
def register_exporters(register):
    register(Exporter(
        "dynamic", DynamicExportOptions, lazy("pocketlm_dynamic.export:export_dynamic"),
        represents=frozenset({"dense", "masked", "restructured", "quantized", "thresholds"}),
        packs=frozenset({"thresholds"}), check=lazy("pocketlm_dynamic.export:check"),
        summary="the weights in another installed format plus activation thresholds (sidecar JSON, GGUF metadata)"))


@hookimpl
def register_loaders(register):
    register(Loader("dynamic", is_dynamic_export, lazy("pocketlm_dynamic.export:load_dynamic"),
                    summary="a `dynamic` export: its weights with the activation thresholds applied"))


@hookimpl(wrapper=True)
def compress(model, method, options, context):
    # A later stage may replace thresholded linears (a quantizer does); put the thresholds (and
    # the low-rank corrections) back.
    from .sparsity import carry, low_ranks, thresholds

    before, factors = thresholds(model), low_ranks(model)
    result = yield
    if before:
        carry(before, model if result is None else result, factors)
    return result


def __getattr__(name: str):
    # the tensor modules were attributes of the package before: load them on use
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
