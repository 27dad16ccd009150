"""The quantizer kit: everything a weight quantizer does besides its algorithm.

A weight-only quantizer is one chain: select the target linears, refuse layers already
quantized, check that the group size divides every input width, fit each matrix's grid, pin
masked (pruned) weights to the zero point, swap in a :class:`~pocketlm.weights.QuantizedLinear`,
carry the mask over and state the size effect. This module is that chain, once:

* :class:`QuantScheme`: the options every quantizer shares (bits, group size, symmetric,
  targets, ignore), a base for a method's own options model. ``"embed"`` and ``"lm_head"`` in
  ``targets``/``ignore`` name the architecture's token embedding and head on every family.
* :func:`select_targets` and :func:`check_group_size`: which modules a stage quantizes, and the
  one group-size policy (refused up front, with the group sizes that would work).
* :func:`group_grid`, :func:`round_to_grid`, :func:`fake_quantize_groups`,
  :func:`dequantize_grid`: pure tensor functions on ``[rows, cols]`` matrices.
* :func:`replace_with_grid`: pin the mask, swap the module, transfer the mask.
* :func:`quantize_linears`: walk, filter and swap, while the method supplies only
  ``fit(weight, mask) -> Grid`` (torchao's ``quantize_`` with a per-module handler is the model).
* :func:`size_effect`: the :class:`~pocketlm.SizeEffect` of a scheme, from the packed layout
  (:func:`~pocketlm.schemes.packed_bits_per_weight`); the scheme and its size effect live in
  :mod:`pocketlm.schemes`, which imports no torch.
* :func:`grid_rule`: the registered :class:`~pocketlm.GridRule` a recipe names.

Grid convention (``pocketlm.weights``): ``w = (q - zero) * scale``, ``q`` in ``[0, 2**bits - 1]``,
scales float16-representable, a last group shorter than ``group_size`` covering the remaining
columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple, get_args, get_origin

import torch
from torch import nn

from .errors import PocketError
from .modules import get_module, matches, select_linears, set_module
from .schemes import (EMBED_ALIAS, GROUP_SIZES, HEAD_ALIAS, QuantScheme, allowed_group_sizes,  # noqa: F401
                      covers, size_effect)
from .weights import (QuantizedEmbedding, QuantizedLinear, get_mask, group_grid, group_slices, is_quantized,
                      is_transposed, linear_bias, linear_shape, linear_weight, minmax_grid, n_groups,
                      quantize, transfer_mask)


# ------------------------------------------------------------------------------------ grid


class Grid(NamedTuple):
    """A fitted grid: integer ``q`` ``[rows, cols]``, ``scales`` and ``zeros`` ``[rows, groups]``."""

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor


# ------------------------------------------------------------------------------- selection


@dataclass
class Selection:
    """What a stage quantizes: linears by name, and whether the token embedding (with its tied
    head, if tied) is included."""

    linears: dict[str, nn.Module]
    embed: str | None          # the embedding's module name when it is quantized
    tied: bool                 # the head shares the embedding's weight
    head: str                  # the head's module name


def _resolve(patterns: list[str], embed: str) -> list[str]:
    return [embed if p == EMBED_ALIAS else p for p in patterns]


def _has_module(model: nn.Module, name: str) -> bool:
    if not name:
        return False
    try:
        get_module(model, name)
    except AttributeError:
        return False
    return True


def select_targets(model: nn.Module, scheme: QuantScheme, architecture, method: str = "quantize") -> Selection:
    """Resolve ``targets``/``ignore`` on ``model``. Tied embeddings are one weight: naming either
    the embedding or the head quantizes the shared grid, used by both. A selected layer that is
    already quantized is refused: one weight quantizer per layer."""
    embed, head = architecture.embed, architecture.lm_head
    targets = _resolve(scheme.targets, embed)
    ignore = _resolve(scheme.ignore, embed)
    # a bare encoder's config may say tied (BERT's default) while the model has no head at all
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False)) and _has_module(model, head)
    linears = select_linears(model, targets, ignore)
    # An exact name in targets beats the default ignore: targets = ["embed"] is enough.
    want_embed = embed in targets or (matches(embed, targets) and not matches(embed, ignore))
    if head in targets:
        try:
            linears[head] = get_module(model, head)
        except AttributeError:
            pass
    want_head = head in linears
    if tied and (want_embed or want_head):
        linears.pop(head, None)
        want_embed = True
    try:
        get_module(model, embed)
    except AttributeError:
        want_embed = False
    quantized = [n for n, m in linears.items() if is_quantized(m)]
    if quantized:
        raise PocketError(f"{method}: {', '.join(quantized[:4])} {'is' if len(quantized) == 1 else 'are'} "
                          "already quantized", field="targets",
                          fix="use one weight quantizer per layer: ignore those layers in one of the stages")
    return Selection(linears, embed if want_embed else None, tied, head)


def _may_be_partial(scheme: QuantScheme) -> bool:
    annotation = type(scheme).model_fields["allow_partial_group"].annotation
    return not (get_origin(annotation) is Literal and get_args(annotation) == (False,))


def check_group_size(model: nn.Module, selection: Selection, scheme: QuantScheme, method: str) -> None:
    """Refuse, before any work, a group size that does not divide a selected layer's input width,
    naming the group sizes that divide every width."""
    if scheme.group_size == -1 or scheme.allow_partial_group:
        return
    widths = {name: linear_shape(m)[1] for name, m in selection.linears.items()}
    if selection.embed is not None:
        widths[selection.embed] = get_module(model, selection.embed).weight.shape[1]
    bad = {name: w for name, w in widths.items() if w % scheme.group_size}
    if not bad:
        return
    working = [g for g in allowed_group_sizes(scheme) if g == -1 or all(w % g == 0 for w in widths.values())]
    shown = ", ".join(f"{n} (in={w})" for n, w in list(bad.items())[:4])
    more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
    partial = ("; or set allow_partial_group = true if your export format holds a short last group (vLLM "
               "kernels need whole groups)" if _may_be_partial(scheme) else "")
    raise PocketError(
        f"{method}: group_size {scheme.group_size} does not divide the input width of "
        f"{len(bad)} layer(s): {shown}{more}",
        field="group_size",
        fix=f"use a group size that divides every width: {', '.join(map(str, working))}; or ignore "
        f"those layers{partial}",
    )


# -------------------------------------------------------------------------- pure functions


def expand_groups(t: torch.Tensor, cols: int, group_size: int) -> torch.Tensor:
    """Per-group values ``[rows, groups]`` repeated over their columns: ``[rows, cols]``."""
    size = cols if group_size == -1 else group_size
    return t.repeat_interleave(size, dim=1)[:, :cols]


def round_to_grid(W: torch.Tensor, bits: int, group_size: int, symmetric: bool, mask: torch.Tensor | None = None,
                  fit=None, importance: torch.Tensor | None = None) -> Grid:
    """Round ``W`` (``[rows, cols]``) to the nearest point of its group grids. ``fit`` is a grid
    rule's ``fit`` (None: min-max, :func:`group_grid`) and ``importance`` its per-column weights.
    Where ``mask`` (True = kept) is False, ``q`` is the zero point, so the weight dequantizes to
    exactly 0."""
    W = W.float()
    if fit is None:
        scales, zeros = group_grid(W, bits, group_size, symmetric)
    else:
        scales, zeros = fit(W, bits, group_size, symmetric, importance)
    assert scales.shape[1] == n_groups(W.shape[1], group_size)
    q = quantize(W, expand_groups(scales, W.shape[1], group_size), expand_groups(zeros, W.shape[1], group_size), bits)
    return Grid(pin_masked(q, zeros, mask, group_size).to(torch.int32), scales, zeros)


def pin_masked(q: torch.Tensor, zeros: torch.Tensor, mask: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """``q`` with every masked-out weight (``mask`` False) set to its group's zero point: a weight
    an earlier stage pruned dequantizes to exactly 0, whatever the grid."""
    if mask is None:
        return q
    return torch.where(mask.to(q.device), q, expand_groups(zeros, q.shape[1], group_size).to(q.dtype))


def fake_quantize_groups(w: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    """``w`` (``[rows, cols]``) rounded onto its min-max group grids and mapped back to floats.
    Computed in place on a reshaped copy where the groups are whole (searches call it often)."""
    rows, cols = w.shape
    size = cols if group_size == -1 else group_size
    if cols % size:
        scales, zeros = group_grid(w, bits, group_size, symmetric)
        q = round_to_grid(w, bits, group_size, symmetric).q
        return dequantize_grid(q, scales, zeros, group_size)
    grouped = w.float().reshape(-1, size)
    scale, zero = minmax_grid(grouped, bits, symmetric)
    q = torch.div(grouped, scale).round_().add_(zero).clamp_(0, 2**bits - 1)
    return q.sub_(zero).mul_(scale).reshape(rows, cols)


def dequantize_grid(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(q - zero) * scale`` with per-group ``scales``/``zeros`` expanded over the columns."""
    cols = q.shape[1]
    return (q.float() - expand_groups(zeros, cols, group_size)) * expand_groups(scales, cols, group_size)


# --------------------------------------------------------------------------- module swaps


def replace_with_grid(root: nn.Module, name: str, grid: Grid, scheme: QuantScheme) -> QuantizedLinear:
    """Put a :class:`QuantizedLinear` holding ``grid`` in place of ``root``'s linear ``name``:
    masked weights pinned to the zero point, bias and ``Conv1D`` orientation kept, the mask
    carried over so later stages keep it."""
    module = get_module(root, name)
    q = pin_masked(grid.q, grid.zeros, get_mask(module), scheme.group_size)
    new = QuantizedLinear.from_grid(q, grid.scales, grid.zeros, bits=scheme.bits, group_size=scheme.group_size,
                                    symmetric=scheme.symmetric, bias=linear_bias(module),
                                    transposed=is_transposed(module))
    transfer_mask(module, new)
    set_module(root, name, new)
    return new


def quantize_embedding(model: nn.Module, selection: Selection, scheme: QuantScheme, fit=None) -> str | None:
    """Round the selected token embedding into a :class:`QuantizedEmbedding` (an embedding is a
    lookup table: no activations to weigh its error by); a tied head becomes its ``tied_head()``
    so both read one grid. Returns a line for the run log (None: no embedding selected)."""
    if selection.embed is None:
        return None
    embedding = get_module(model, selection.embed)
    q, scales, zeros = round_to_grid(embedding.weight.data, scheme.bits, scheme.group_size, scheme.symmetric, fit=fit)
    new = QuantizedEmbedding.from_grid(q, scales, zeros, bits=scheme.bits, group_size=scheme.group_size,
                                       symmetric=scheme.symmetric, padding_idx=embedding.padding_idx)
    set_module(model, selection.embed, new)
    if selection.tied:
        set_module(model, selection.head, new.tied_head())
        return f"quantized {selection.embed} and its tied {selection.head} (one shared {scheme.bits}-bit grid)"
    return f"quantized {selection.embed} to {scheme.bits} bits"


#: What a method supplies to :func:`quantize_linears`: the grid of one linear's ``[out, in]``
#: float32 weight, given its kept-weights mask (None: nothing pruned) and its full module name.
LinearFit = Callable[[torch.Tensor, "torch.Tensor | None", str], Grid]


def quantize_linears(model: nn.Module, scheme: QuantScheme, context, fit: LinearFit, *, method: str,
                     embedding_fit=None, selection: Selection | None = None) -> Selection:
    """Quantize every linear ``scheme`` selects with the grids ``fit(weight, mask, name)`` returns.

    Selects and checks up front (:func:`select_targets`, :func:`check_group_size`), rounds a
    selected token embedding (:func:`quantize_embedding`, its scales from ``embedding_fit``, a
    grid rule's ``fit``; None: min-max), then swaps the decoder layers' linears one layer at a
    time through ``context.layers`` (a model streamed from disk holds only the current one) and
    whatever lies outside them (an untied head). A method that looks at the selection first
    (to gather statistics) passes it, already checked. Returns the selection, for the log."""
    architecture = context.architecture(model)
    if selection is None:
        selection = select_targets(model, scheme, architecture, method)
        check_group_size(model, selection, scheme, method)
    line = quantize_embedding(model, selection, scheme, embedding_fit)
    if line:
        context.log(line)
    prefix = architecture.layers + "."
    for index, layer in context.layers(model):
        inside = f"{prefix}{index}."
        for name in [n for n in selection.linears if n.startswith(inside)]:
            _swap(layer, name[len(inside):], name, scheme, fit)
    for name in [n for n in selection.linears if not n.startswith(prefix)]:
        _swap(model, name, name, scheme, fit)
    return selection


def _swap(root: nn.Module, local: str, name: str, scheme: QuantScheme, fit: LinearFit) -> None:
    module = get_module(root, local)
    replace_with_grid(root, local, fit(linear_weight(module).float(), get_mask(module), name), scheme)


# ------------------------------------------------------------------------------ size effect


# ------------------------------------------------------------------------------- grid rules


def grid_rule(context, name: str, scheme: QuantScheme):
    """The registered :class:`~pocketlm.GridRule` called ``name`` (a method's ``grid`` option),
    refused with the installed names or the settings it needs when it cannot serve ``scheme``."""
    plugins = getattr(context, "plugins", None)
    if plugins is None:
        from .plugins import get_plugins

        plugins = get_plugins()
    rule = plugins.grid_rules.get(name)
    if rule is None:
        raise PocketError(f"unknown grid rule {name!r}", field="grid",
                          fix="installed grid rules: " + ", ".join(sorted(plugins.grid_rules)))
    problems = rule.problems(scheme.bits, scheme.group_size, scheme.symmetric)
    if problems:
        raise PocketError(f"grid rule {name!r} needs " + ", ".join(problems), field="grid",
                          fix="change those options or choose another grid")
    return rule


__all__ = ["EMBED_ALIAS", "GROUP_SIZES", "HEAD_ALIAS", "Grid", "LinearFit", "QuantScheme", "Selection",
           "allowed_group_sizes", "check_group_size", "covers", "dequantize_grid", "expand_groups", "fake_quantize_groups", "grid_rule",
           "group_grid", "group_slices", "pin_masked", "quantize_embedding", "quantize_linears", "replace_with_grid",
           "round_to_grid", "select_targets", "size_effect"]
