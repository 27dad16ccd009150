"""The conformance kit: the contract every pocketlm plugin component must meet, as checks.

Use it from a plugin's tests in one of two ways.

**Subclass a pytest class** (each check becomes its own test, parametrized over the tiny
architectures)::

    from pocketlm.testing.conformance import MethodConformance

    class TestConformance(MethodConformance):
        method = "foo"
        options = {"sparsity": 0.5}
        unsupported = {"opt": "OPT's fused ... is not handled yet"}   # optional, with a reason

**Call the functions** (each raises :class:`ConformanceError`, an ``AssertionError``, with every
problem it found)::

    from pocketlm.testing.conformance import check_method, check_exporter, check_loader, check_evaluator

    check_method("foo", {"sparsity": 0.5})
    check_exporter("bar", method="my-quantizer", method_options={"bits": 4})
    check_grid_rule("baz")

What a **method** must do (``check_method``, ``MethodConformance``):

* options: the defaults build (unless the options model needs a choice from the user), an
  unknown key is rejected, instances are frozen, and options survive the JSON round trip a run
  folder makes (``model_dump(mode="json")`` then validate gives the same options);
* registration: ``effect(options)`` is a :class:`pocketlm.SizeEffect`, ``plan`` (if any) only
  proposes option sets that validate;
* runs on each tiny architecture (llama, qwen2, gpt2, opt) with 4 calibration windows of 16
  tokens, changes the model, leaves no NaN/inf in weights or logits;
* never modifies what it is handed besides the model: the calibration windows and the
  teacher (``context.teacher()``) hash the same before and after;
* keeps the model loadable: saved with the core checkpoint and reloaded it gives the same
  logits; exported with the ``hf`` exporter, plain transformers reloads it with the same logits;
* is deterministic: two runs on the same model with the same seed give identical tensors;
* respects masks: weights an earlier stage pruned (``weights.set_mask``) are still exactly
  zero afterwards and the masks are kept;
* respects ``ignore`` (when its options have one): ignored linears are left untouched;
* allocates on the device of the layer it works on (``check_allocations``): run again with
  PyTorch's default device set to ``meta``, a tensor made without ``device=`` breaks the run or
  the result, so both runs must give identical tensors (this needs no GPU);
* gives on a CUDA device what it gives on the CPU, within ``CUDA_TOLERANCE``
  (``check_cuda_matches_cpu``; skipped with its reason where there is no CUDA device).

An architecture a method does not support is skipped only when the test declares it in
``unsupported`` with the reason; otherwise a failure there is a failure.

**Exporters** write only inside the temporary folder they are given, leave nothing behind when
they fail (the core's :func:`pocketlm.atomic.folder`), never change the model, and write the
same bytes twice. **Evaluators** return a flat dict of finite numbers and leave the model as
they found it. **Loaders** claim their source and return a :class:`pocketlm.LoadedModel` whose
model gives finite logits. **Grid rules** (``check_grid_rule``, ``GridRuleConformance``) return,
at every setting they support, float16 scales and integer zero points in range of the documented
``[rows, groups]`` shape on the weight's device, deterministically, without touching their inputs,
ignoring ``importance`` unless they declare ``uses_importance``, with a round-trip error within
``ERROR_RATIO`` times min-max's.

**Registration** (``check_light_registration("my_plugin")``) imports no tensor library: the
commands that only read recipes load every installed plugin, so a plugin's module, its options
and its size effects stay free of torch, and the callables that do the work are given as
``pocketlm.lazy("my_plugin.method:compress")``.

One module per kind of component: :mod:`.methods`, :mod:`.exporters`, :mod:`.evaluators`,
:mod:`.loaders`, :mod:`.grid_rules` (and :mod:`._shared`, what they share); every public name is
importable from ``pocketlm.testing.conformance`` itself.
"""


from __future__ import annotations

from ._shared import (ATOL, FAMILIES, SEQ_LEN, WINDOWS, ConformanceError, logits, nonfinite, state_hash, tensors, tiny,
                      windows)
from .evaluators import EvaluatorConformance, check_evaluator
from .exporters import ExporterConformance, check_exporter, export_model, prepared_model
from .grid_rules import (ERROR_RATIO, GridRuleConformance, check_grid_allocations, check_grid_fit, check_grid_rule,
                         supported_settings)
from .loaders import LoaderConformance, check_loader
from .registration import HEAVY_MODULES, check_light_registration, heavy_imports
from .methods import (CUDA_TOLERANCE, MethodConformance, MethodRun, build_options, check_allocations,
                      check_cuda_matches_cpu, check_deterministic, check_ignore, check_loadable, check_masks,
                      check_method, check_options, check_runs, compare_devices, hf_represents, mask_everything,
                      run_method)

__all__ = [
    "ATOL", "CUDA_TOLERANCE", "ConformanceError", "ERROR_RATIO", "EvaluatorConformance", "ExporterConformance",
    "FAMILIES", "GridRuleConformance", "HEAVY_MODULES", "LoaderConformance", "MethodConformance", "MethodRun", "SEQ_LEN", "WINDOWS",
    "build_options", "check_allocations", "check_cuda_matches_cpu", "check_deterministic", "check_evaluator",
    "check_exporter", "check_grid_allocations", "check_light_registration", "check_grid_fit", "check_grid_rule", "check_ignore",
    "check_loadable", "check_loader", "check_masks", "check_method", "check_options", "check_runs",
    "compare_devices", "export_model", "heavy_imports", "hf_represents", "logits", "mask_everything", "nonfinite", "prepared_model",
    "run_method", "state_hash", "supported_settings", "tensors", "tiny", "windows",
]
