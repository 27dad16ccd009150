"""pocketlm-mixed: mixed precision by measured sensitivity (method ``mixed``).

It measures each linear's sensitivity on the calibration windows, allocates bits per matrix
(2, 3, 4, 5, 6, 8, and the token embedding's own) under a byte budget with an exact knapsack,
and runs the allocation as ordinary ``rtn`` or ``gptq`` stages that name their linears; the
allocation is also saved as a recipe of those stages (``mixed-recipe.toml`` in the stage folder)."""

from __future__ import annotations

from pocketlm import PHASE_QUANTIZE, Method, hookimpl, lazy

from . import options

__version__ = "0.2.1"
POCKETLM_API = ">=1.8,<2"

__all__ = ["POCKETLM_API", "__version__", "register_methods"]


@hookimpl
def register_methods(register):
    register(Method(
        name="mixed", kind="quantize", options=options.MixedOptions,
        compress=lazy("pocketlm_mixed.mixed:compress_mixed"),
        summary="mixed precision: bits per matrix (2-8) by measured sensitivity under a byte budget (exact "
                "knapsack), run as rtn/gptq stages",
        needs_calibration=True, effect=options.effect, phase=PHASE_QUANTIZE, exclusive=True, plan=options.plan))
