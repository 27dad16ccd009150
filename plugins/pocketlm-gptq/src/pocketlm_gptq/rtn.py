"""Round-to-nearest (RTN): the baseline weight quantizer.

Each group of ``group_size`` input columns of a row gets the grid the ``grid`` rule fits
(min-max by default) and every weight is rounded to its nearest grid point. No calibration
data, unless the rule weighs errors by the activations. RTN is also how pocketlm quantizes
token embeddings (and a tied head): an embedding is a lookup table, so there are no activations
to weigh its error by.

The pure functions and the walk are the core's quantizer kit (``pocketlm.quant``); this file
is the method: which grid, and the importance an importance-weighted rule needs.
Stage: :func:`compress_rtn` (method ``rtn``).
"""

from __future__ import annotations

import torch
from torch import nn

from pocketlm.grids import input_importance
from pocketlm.quant import (check_group_size, dequantize_grid, grid_rule, group_grid, quantize_linears, round_to_grid,
                            select_targets)

from .options import RTNOptions
from .options import plan_rtn as plan  # noqa: F401  (kept importable from here)

rtn_quantize = round_to_grid          # the names before the kit; kept for code that imports them
__all__ = ["RTNOptions", "compress_rtn", "dequantize_grid", "group_grid", "plan", "rtn_quantize"]


def linear_importance(model: nn.Module, names, context) -> dict[str, torch.Tensor]:
    """Mean squared input per channel of the linears ``names`` on the calibration windows (empty
    where the context has none): the core's one walk for importance-weighted grid rules."""
    return input_importance(model, names, context, description="rtn: importance")


def compress_rtn(model: nn.Module, options: RTNOptions, context) -> nn.Module:
    selection = select_targets(model, options, context.architecture(model), "rtn")
    check_group_size(model, selection, options, "rtn")
    rule = grid_rule(context, options.grid, options)
    fit = None if rule.name == "minmax" else rule.fit
    importance = linear_importance(model, selection.linears, context) if rule.uses_importance else {}

    def fit_linear(weight, mask, name):
        return round_to_grid(weight, options.bits, options.group_size, options.symmetric, mask, fit,
                             importance.get(name))

    quantize_linears(model, options, context, fit_linear, method="rtn", embedding_fit=fit, selection=selection)
    context.log(f"rtn: {len(selection.linears)} linears to {options.bits} bits, group {options.group_size}"
                + ("" if fit is None else f", grid {rule.name}")
                + (", weighted by calibration activations" if importance else
                   ", every input channel weighted alike (no calibration data)" if rule.uses_importance else ""))
    return model
