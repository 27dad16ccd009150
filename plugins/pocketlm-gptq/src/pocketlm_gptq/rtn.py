"""Round-to-nearest (RTN): the baseline weight quantizer.

Each group of ``group_size`` input columns of a row gets a min-max grid (``weights.minmax_grid``)
and every weight is rounded to its nearest grid point. No calibration data. RTN is also how
pocketlm quantizes token embeddings (and a tied head): an embedding is a lookup table, so there
are no activations to weigh its error by.

Pure functions: :func:`group_grid`, :func:`rtn_quantize`, :func:`dequantize_grid`.
Stage: :func:`compress_rtn` (method ``rtn``).
"""

from __future__ import annotations

import torch
from torch import nn

from pocketlm.grids import input_importance
from pocketlm.modules import get_module, set_module
from pocketlm.weights import (QuantizedEmbedding, QuantizedLinear, get_mask, is_transposed, linear_bias,
                              linear_weight, minmax_grid, n_groups, quantize, transfer_mask)

from .common import QuantOptions, Selection, check_group_size, grid_rule, select


class RTNOptions(QuantOptions):
    """Round-to-nearest options: exactly the shared quantizer options (see ``QuantOptions``)."""


# ----------------------------------------------------------------------- pure functions


def group_grid(W: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max ``scales`` and integer ``zeros`` (both ``[rows, groups]``) for ``W`` ``[rows, cols]``.
    A last group shorter than ``group_size`` covers the remaining columns."""
    rows, cols = W.shape
    size = cols if group_size == -1 else group_size
    scales, zeros = [], []
    for start in range(0, cols, size):
        scale, zero = minmax_grid(W[:, start:start + size], bits, symmetric)
        scales.append(scale)
        zeros.append(zero)
    return torch.cat(scales, 1), torch.cat(zeros, 1)


def _expand(t: torch.Tensor, cols: int, group_size: int) -> torch.Tensor:
    size = cols if group_size == -1 else group_size
    return t.repeat_interleave(size, dim=1)[:, :cols]


def rtn_quantize(W: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                 mask: torch.Tensor | None = None, fit=None,
                 importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round ``W`` (``[rows, cols]``) to its group grids: returns ``(q, scales, zeros)`` with
    ``q`` integer ``[rows, cols]`` and ``scales``/``zeros`` ``[rows, groups]``. Where ``mask``
    (True = kept) is False, ``q`` is the zero point, so the weight dequantizes to exactly 0.
    ``fit`` is a grid rule's ``fit`` (None: min-max) and ``importance`` its per-column weights."""
    W = W.float()
    if fit is None:
        scales, zeros = group_grid(W, bits, group_size, symmetric)
    else:
        scales, zeros = fit(W, bits, group_size, symmetric, importance)
    scale_full, zero_full = _expand(scales, W.shape[1], group_size), _expand(zeros, W.shape[1], group_size)
    q = quantize(W, scale_full, zero_full, bits)
    if mask is not None:
        q = torch.where(mask, q, zero_full)
    assert scales.shape[1] == n_groups(W.shape[1], group_size)
    return q.to(torch.int32), scales, zeros


def dequantize_grid(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(q - zero) * scale`` with per-group ``scales``/``zeros`` expanded over the columns."""
    cols = q.shape[1]
    return (q.float() - _expand(zeros, cols, group_size)) * _expand(scales, cols, group_size)


# ------------------------------------------------------------------------ module helpers


def replace_linear(root: nn.Module, name: str, module: nn.Module, q, scales, zeros, options: QuantOptions) -> QuantizedLinear:
    """Put a ``QuantizedLinear`` holding grid ``q`` in place of ``root``'s linear ``name``."""
    bias = linear_bias(module)
    new = QuantizedLinear.from_grid(q, scales, zeros, bits=options.bits, group_size=options.group_size,
                                    symmetric=options.symmetric, bias=bias, transposed=is_transposed(module))
    transfer_mask(module, new)
    set_module(root, name, new)
    return new


def quantize_embedding(model: nn.Module, selection: Selection, options: QuantOptions, log, fit=None) -> None:
    """RTN-quantize the token embedding into a ``QuantizedEmbedding``; a tied head becomes its
    ``tied_head()`` so both read one grid."""
    if selection.embed is None:
        return
    embedding = get_module(model, selection.embed)
    q, scales, zeros = rtn_quantize(embedding.weight.data, options.bits, options.group_size, options.symmetric,
                                    fit=fit)
    new = QuantizedEmbedding.from_grid(q, scales, zeros, bits=options.bits, group_size=options.group_size,
                                       symmetric=options.symmetric, padding_idx=embedding.padding_idx)
    set_module(model, selection.embed, new)
    if selection.tied:
        set_module(model, selection.head, new.tied_head())
        log(f"quantized {selection.embed} and its tied {selection.head} (one shared {options.bits}-bit grid)")
    else:
        log(f"quantized {selection.embed} to {options.bits} bits")


# ---------------------------------------------------------------- importance for grid rules


def linear_importance(model: nn.Module, names, context) -> dict[str, torch.Tensor]:
    """Mean squared input per channel of the linears ``names`` on the calibration windows (empty
    where the context has none): the core's one walk for importance-weighted grid rules."""
    return input_importance(model, names, context, description="rtn: importance")


# ----------------------------------------------------------------------------- the stage


def _round(root: nn.Module, name: str, options: QuantOptions, fit=None, importance=None) -> None:
    module = get_module(root, name)
    q, scales, zeros = rtn_quantize(linear_weight(module), options.bits, options.group_size,
                                    options.symmetric, get_mask(module), fit, importance)
    replace_linear(root, name, module, q, scales, zeros, options)


def compress_rtn(model: nn.Module, options: RTNOptions, context) -> nn.Module:
    selection = select(model, options, context.architecture(model))
    check_group_size(model, selection, options, "rtn")
    rule = grid_rule(context, options)
    fit = None if rule.name == "minmax" else rule.fit
    importance = linear_importance(model, selection.linears, context) if rule.uses_importance else {}
    quantize_embedding(model, selection, options, context.log, fit)
    prefix = context.architecture(model).layers + "."
    # Decoder layers one at a time through context.layers (a model streamed from disk holds
    # only the current one), then whatever lies outside them (an untied head).
    for index, layer in context.layers(model):
        inside = f"{prefix}{index}."
        for name in [n for n in selection.linears if n.startswith(inside)]:
            _round(layer, name[len(inside):], options, fit, importance.get(name))
    for name in [n for n in selection.linears if not n.startswith(prefix)]:
        _round(model, name, options, fit, importance.get(name))
    context.log(f"rtn: {len(selection.linears)} linears to {options.bits} bits, group {options.group_size}"
                + ("" if fit is None else f", grid {rule.name}")
                + (", weighted by calibration activations" if importance else
                   ", every input channel weighted alike (no calibration data)" if rule.uses_importance else ""))
    return model


def plan(budget=None) -> list[dict]:
    """Option sets the hybrid planner may try for ``rtn``, cheapest loss first: 8-bit per channel
    (near lossless), 4-bit g64, 3-bit g64, and the token embedding (with its tied head) at 8 or
    4 bits in groups of 32, which on small models with tied embeddings is where a fifth of the
    weights sit. Groups of 32 with symmetric grids are exactly GGUF's Q8_0 and Q4_0 blocks, the
    formats that pack an embedding. ``budget`` (a ``PlanBudget``) is not consulted: every set is
    sensible on any decoder model."""
    return [
        {"bits": 8, "group_size": -1},
        {"bits": 4, "group_size": 64},
        {"bits": 3, "group_size": 64},
        {"bits": 8, "group_size": 32, "targets": ["embed"], "ignore": [], "default": True},
        {"bits": 4, "group_size": 32, "targets": ["embed"], "ignore": []},
    ]
