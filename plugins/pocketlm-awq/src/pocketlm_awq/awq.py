"""AWQ: activation-aware weight quantization (Lin et al., 2023), as AutoAWQ runs it.

For every decoder layer, on calibration activations:

1. **Scale search.** For each scale-folding pair of the architecture table
   (``Architecture.smooth``: norm → q/k/v, v → o, norm → gate/up, up → down), the per-input
   channel scale ``s = mean|x|^α / mean|w|^(1-α)`` (``duo_scaling``; ``mean|x|^α`` without it),
   normalised by ``sqrt(max(s) * min(s))``, is tried for ``α`` on a grid of ``n_grid`` points in
   ``[0, 1)`` (plus the identity). The chosen ``α`` gives the lowest mean squared error of the
   pair's ``block`` output (``self_attn``, ``mlp``; the linears themselves when the table has no
   block) when the linears' weights are ``Q(W·diag(s))·diag(1/s)``, measured on the first
   ``search_tokens`` calibration tokens (the channel means use all of them).
2. **Folding.** ``s`` is divided out of the preceding op's output channels (norm weight and
   bias, or the previous linear's output rows and bias) and multiplied into the linears' input
   columns, which leaves the model unchanged before rounding. A pair whose widths disagree
   (v → o under grouped-query attention) is skipped and said once in the run log.
3. **Clipping.** Each group's clipping range ``max|w|`` is shrunk on a grid (down to
   ``1 - max_shrink``) and the value with the lowest error of the group's partial outputs on a
   subsample of calibration tokens is kept (q and k projections are not clipped, as in AutoAWQ).
4. **Rounding** to each group's grid, stored as pocketlm's ``QuantizedLinear``. The grid is the
   registered grid rule the ``grid`` option names: ``minmax`` (default, AutoAWQ's) or another
   (``weighted-mse``: each input channel weighted by its mean squared input, measured after the
   folding on the clip search's token subsample).

:meth:`AWQHandler.solve` runs these steps in order; each is a function of its own
(:func:`scale_search`, :func:`fold_scales`, :func:`clip_weight`, :func:`quantize_weight`).

Selection, the group-size policy, the grids, the module swap and the size effect are the core's
quantizer kit (``pocketlm.quant``); this file is the search, the folding and the clipping.

Everything model-specific comes from the architecture table: a new family registered through
the ``register_architectures`` hook works without changing this file.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from pocketlm import PocketError, Smooth
from pocketlm import weights as W
from pocketlm.calibration import LayerHandler, batch_rows, module_input
from pocketlm.modules import get_module
from pocketlm.quant import (Grid, check_group_size, fake_quantize_groups, grid_rule, replace_with_grid, round_to_grid,
                            select_targets)

from .options import AWQOptions, effect  # noqa: F401  (effect: kept importable from here)

# ---------------------------------------------------------------- pure tensor functions


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[out, in]`` viewed as ``[out, groups, group]``."""
    rows, cols = w.shape
    size = cols if group_size == -1 else group_size
    return w.reshape(rows, cols // size, size)


def weight_mean(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """Per input channel mean of ``|w|`` normalised by each group's ``max|w|``, over the rows of
    every linear in ``weights`` (all ``[out_i, in]``), as AutoAWQ computes it."""
    w = torch.cat([x.float() for x in weights], dim=0)
    grouped = _grouped(w, group_size).abs()
    grouped = grouped / (grouped.amax(dim=-1, keepdim=True) + 1e-6)
    return grouped.reshape(w.shape).mean(0)


def awq_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """AWQ's per input channel scale for exponent ``alpha``: ``x_mean^α / w_mean^(1-α)``
    (``x_mean^α`` when ``w_mean`` is None), normalised so ``max * min == 1``."""
    if w_mean is None:
        scales = x_mean.float().pow(alpha).clamp(min=1e-4)
    else:
        scales = (x_mean.float().pow(alpha) / (w_mean.float().pow(1 - alpha) + 1e-4)).clamp(min=1e-4)
    scales = scales / (scales.max() * scales.min()).sqrt()
    return torch.where(torch.isfinite(scales), scales, torch.ones_like(scales))


@dataclass
class ScaleChoice:
    scales: torch.Tensor
    alpha: float | None  # None: the identity won
    errors: dict[float | None, float] = field(default_factory=dict)


def search_scale(x_mean: torch.Tensor, w_mean: torch.Tensor | None, loss: Callable[[torch.Tensor], float],
                 n_grid: int = 20) -> ScaleChoice:
    """Try ``α = i / n_grid`` for ``i < n_grid`` (and the identity) and keep the scales with the
    lowest ``loss(scales)``."""
    identity = torch.ones_like(x_mean, dtype=torch.float32)
    best = ScaleChoice(identity, None, {None: loss(identity)})
    best_error = best.errors[None]
    for i in range(n_grid):
        alpha = i / n_grid
        scales = awq_scales(x_mean, w_mean, alpha)
        error = loss(scales)
        best.errors[alpha] = error
        if error < best_error:
            best_error, best.scales, best.alpha = error, scales, alpha
    return best


def scale_search(x_mean: torch.Tensor, weights: list[torch.Tensor], loss: Callable[[torch.Tensor], float],
                 group_size: int, duo_scaling: bool = True, n_grid: int = 20) -> ScaleChoice:
    """Step 1 for one pair: the scales of the α grid (:func:`search_scale`) with the lowest
    ``loss``, the weight means taken over ``weights`` (the pair's linears, ``[out_i, in]``) when
    ``duo_scaling``."""
    w_mean = weight_mean(weights, group_size) if duo_scaling else None
    return search_scale(x_mean, w_mean, loss, n_grid)


def linear_scale_loss(x: torch.Tensor, weights: list[torch.Tensor], bits: int, group_size: int,
                      symmetric: bool) -> Callable[[torch.Tensor], float]:
    """The loss of a pair without a block: MSE of each linear's output ``x @ W^T`` when ``W`` is
    replaced by ``Q(W·diag(s))·diag(1/s)``; ``x`` is ``[tokens, in]``."""
    x = x.float()
    references = [x @ w.float().t() for w in weights]

    def loss(scales: torch.Tensor) -> float:
        total = 0.0
        for w, reference in zip(weights, references):
            quantized = fake_quantize_groups(w.float() * scales, bits, group_size, symmetric) / scales
            total += (x @ quantized.t() - reference).pow(2).mean().item()
        return total
    return loss


def search_clip(w: torch.Tensor, x: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                n_grid: int = 20, max_shrink: float = 0.5, rows_per_chunk: int = 1024,
                summed: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> torch.Tensor:
    """Per group clipping bound of ``w`` ``[out, in]`` on inputs ``x`` ``[tokens, in]``.

    For each group the bound ``max|w| * (1 - i / n_grid)``, ``i < max_shrink * n_grid``, whose
    clamped, rounded weights give the lowest mean squared error of the group's partial outputs
    ``x_g @ w_g^T`` is kept. Returns ``[out, groups]``. ``summed`` adds the errors other
    processes of a data-parallel run measured on their tokens."""
    out_features, in_features = w.shape
    size = in_features if group_size == -1 else group_size
    groups = in_features // size
    xg = x.float().reshape(-1, groups, size).transpose(0, 1)  # [groups, tokens, size]
    steps = max(1, int(max_shrink * n_grid))
    bounds = []
    for start in range(0, out_features, rows_per_chunk):
        chunk = w[start:start + rows_per_chunk].float()
        grouped = _grouped(chunk, group_size)  # [rows, groups, size]
        weight_g = grouped.permute(1, 2, 0)  # [groups, size, rows]
        reference = torch.bmm(xg, weight_g)  # [groups, tokens, rows]
        original = grouped.abs().amax(dim=-1)  # [rows, groups]
        best = original.clone()
        best_error = torch.full_like(original, float("inf"))
        for i in range(steps):
            bound = original * (1 - i / n_grid)
            clipped = torch.maximum(torch.minimum(grouped, bound[..., None]), -bound[..., None])
            quantized = fake_quantize_groups(clipped.reshape(chunk.shape), bits, group_size, symmetric)
            output = torch.bmm(xg, _grouped(quantized, group_size).permute(1, 2, 0))
            error = summed((output - reference).pow(2).mean(dim=1).t())  # [rows, groups]
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best = torch.where(better, bound, best)
        bounds.append(best)
    return torch.cat(bounds)


def apply_clip(w: torch.Tensor, bounds: torch.Tensor, group_size: int) -> torch.Tensor:
    """``w`` with each group clamped to ``[-bound, bound]``."""
    grouped = _grouped(w.float(), group_size)
    clipped = torch.maximum(torch.minimum(grouped, bounds[..., None]), -bounds[..., None])
    return clipped.reshape(w.shape).to(w.dtype)


def clip_weight(weight: torch.Tensor, x: torch.Tensor, options: AWQOptions,
                summed: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> torch.Tensor:
    """Step 3 for one linear: ``weight`` (float32 ``[out, in]``) clamped to the per-group bounds
    :func:`search_clip` finds on its inputs ``x`` (``[tokens, in]``, already divided by the
    folded scales)."""
    bounds = search_clip(weight, x, options.bits, options.group_size, options.symmetric,
                         options.clip_grid, options.max_shrink, summed=summed)
    return apply_clip(weight, bounds, options.group_size)


def quantize_weight(weight: torch.Tensor, options: AWQOptions, fit=None,
                    importance: torch.Tensor | None = None) -> Grid:
    """Step 4 for one linear: ``weight`` rounded onto the grid rule's grid (``fit`` None: min-max,
    AutoAWQ's), ``importance`` the rule's per input channel weights."""
    return round_to_grid(weight, options.bits, options.group_size, options.symmetric, fit=fit, importance=importance)


def input_importance(x: torch.Tensor, summed: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> torch.Tensor:
    """Mean squared input per channel of ``x`` (``[tokens, in]``), over every process's tokens."""
    x = x.float()
    squares = summed(torch.cat([x.pow(2).sum(0), x.new_tensor([x.shape[0]])]))
    return squares[:-1] / squares[-1].clamp(min=1)


# ---------------------------------------------------------------------------- folding


def _prev_rows(width: int, prev_rows: str) -> slice:
    return slice(width // 2, width) if prev_rows == "second_half" else slice(0, width)


def fold_width(prev: nn.Module, prev_rows: str = "all") -> int:
    """How many channels ``prev`` hands to the pair's linears."""
    if W.is_linear(prev):
        rows = _prev_rows(W.linear_shape(prev)[0], prev_rows)
        return rows.stop - rows.start
    weight = getattr(prev, "weight", None)
    if weight is None or weight.dim() != 1:
        raise PocketError(f"cannot fold a scale into {type(prev).__name__}: it has no per-channel weight")
    return weight.shape[0]


@torch.no_grad()
def fold_scales(prev: nn.Module, linears: list[nn.Module], scales: torch.Tensor, prev_rows: str = "all") -> None:
    """Divide ``prev``'s output channels by ``scales`` and multiply the ``linears``' input
    columns by them: the composed map is unchanged (up to float rounding).

    ``prev`` is a norm (its ``weight`` and ``bias`` are divided) or a linear (its output rows
    and bias; only the second half of the rows with ``prev_rows="second_half"``)."""
    scales = scales.float()
    if W.is_linear(prev):
        weight = W.linear_weight(prev).float().clone()
        rows = _prev_rows(weight.shape[0], prev_rows)
        weight[rows] = weight[rows] / scales[:, None]
        W.set_linear_weight(prev, weight.to(W.linear_weight(prev).dtype))
        bias = W.linear_bias(prev)
        if bias is not None:
            bias[rows] = (bias[rows].float() / scales).to(bias.dtype)
    else:
        prev.weight.data.copy_((prev.weight.data.float() / scales).to(prev.weight.dtype))
        bias = getattr(prev, "bias", None)
        if bias is not None:
            bias.data.copy_((bias.data.float() / scales).to(bias.dtype))
    for linear in linears:
        weight = W.linear_weight(linear)
        W.set_linear_weight(linear, (weight.float() * scales).to(weight.dtype))


# ---------------------------------------------------------------------------- the handler


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _first_rows(value: Any, rows: int, keep: int) -> Any:
    """``value`` (a call's args or kwargs over ``rows`` sequences) cut to its first ``keep``."""
    return value if keep == rows else batch_rows(value, slice(0, keep), rows)


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@dataclass
class _Pair:
    smooth: Smooth
    targeted: list[str]  # the pair's linears that are quantized


@dataclass
class _Stats:
    abs_sum: torch.Tensor | None = None
    count: int = 0
    rows: int = 0  # sequences kept for the scale search so far
    search_x: list[torch.Tensor] = field(default_factory=list)  # inputs of the search sequences
    clip_x: list[torch.Tensor] = field(default_factory=list)  # a strided token subsample
    block: list[tuple[tuple, dict, torch.Tensor]] = field(default_factory=list)


class AWQHandler(LayerHandler):
    """The layer handler: observes the linears' inputs and the blocks' calls, then searches,
    folds, clips and rounds one decoder layer."""

    def __init__(self, targets, architecture, options: AWQOptions, context, total_tokens: int):
        self.options, self.context, self.architecture = options, context, architecture
        self.prefix = architecture.layers + "."
        self.targets = set(targets)               # full names of the linears to quantize
        self.total_tokens = total_tokens
        self.skipped_logged: set[tuple[str, tuple[str, ...]]] = set()
        attention = architecture.attention
        self.no_clip = set() if options.clip_qk else {attention[k] for k in ("q", "k", "qkv") if k in attention}
        self.stats: dict[str, _Stats] = {}
        self.pairs: list[_Pair] = []
        self.report: list[dict] = []
        rule = grid_rule(context, options.grid, options)
        self.fit = None if rule.name == "minmax" else rule.fit   # None: min-max, exactly as before
        self.uses_importance = rule.uses_importance

    # -- walker protocol

    def select(self, index: int, layer: nn.Module, names: tuple[str, ...]) -> list[str]:
        full = f"{self.prefix}{index}."
        targeted = [n for n in names if full + n in self.targets]
        self.pairs = []
        for smooth in self.architecture.smooth:
            chosen = [n for n in smooth.linears if full + n in self.targets]
            if chosen:
                self.pairs.append(_Pair(smooth, chosen))
        wanted = list(targeted)
        for pair in self.pairs:
            for name in (pair.smooth.linears[0], pair.smooth.block):
                if name is not None and name not in wanted:
                    wanted.append(name)
        self.stats = {name: _Stats() for name in wanted}
        self.block_names = {p.smooth.block for p in self.pairs if p.smooth.block is not None}
        self.search_names = {p.smooth.linears[0] for p in self.pairs if p.smooth.block is None}
        return wanted

    def observe(self, name: str, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        stats = self.stats[name]
        if name in self.block_names:
            hidden = module_input(args, kwargs)
            keep = self._search_rows(stats, hidden)
            if keep:
                rows = hidden.shape[0]
                stats.block.append((_first_rows(args, rows, keep), _first_rows(kwargs, rows, keep),
                                    _first(output).detach()[:keep]))
            return
        x = module_input(args, kwargs).detach()
        flat = x.reshape(-1, x.shape[-1])
        absolute = flat.abs().float().sum(0)
        stats.abs_sum = absolute if stats.abs_sum is None else stats.abs_sum + absolute
        stats.count += flat.shape[0]
        if name in self.search_names:
            keep = self._search_rows(stats, x)
            if keep:
                stats.search_x.append(x[:keep])
        stride = max(1, self.total_tokens // self.options.max_clip_tokens)
        stats.clip_x.append(flat[::stride].float().clone())

    def _search_rows(self, stats: _Stats, x: torch.Tensor) -> int:
        """How many leading sequences of this batch the scale search keeps (``search_tokens``
        in whole sequences, from the first batches)."""
        limit = self.options.search_tokens
        rows = x.shape[0]  # sequences, or tokens where a model flattens them (OPT's MLP)
        if limit is None:
            return rows
        seq_len = x.shape[-2] if x.dim() > 2 else 1
        wanted = max(1, math.ceil(limit / seq_len))
        keep = max(0, min(rows, wanted - stats.rows))
        stats.rows += keep
        return keep

    def solve(self, index: int, layer: nn.Module, names: list[str]) -> None:
        """Search and fold each pair's scales, then clip and round each targeted linear."""
        started = time.perf_counter()
        alphas, input_scale = self._fold_pairs(layer)
        for name in names:
            if name in self.block_names or self.prefix + f"{index}." + name not in self.targets:
                continue
            self._quantize(layer, name, input_scale.get(name))
        self.report.append({"layer": index, "alphas": alphas})
        self.stats, self.pairs = {}, []
        described = ", ".join(f"{k}={'identity' if a is None else format(a, 'g')}" for k, a in alphas.items())
        self.context.log(f"awq: layer {index}: alpha {described} ({time.perf_counter() - started:.1f} s)")

    def _fold_pairs(self, layer: nn.Module) -> tuple[dict[str, float | None], dict[str, torch.Tensor]]:
        """Steps 1 and 2 for every foldable pair: the chosen α by the pair's ``prev`` (None: the
        identity), and the scale now folded into each linear's input columns."""
        alphas: dict[str, float | None] = {}
        input_scale: dict[str, torch.Tensor] = {}
        for pair in self.pairs:
            smooth = pair.smooth
            if not self._foldable(layer, pair):
                continue
            choice = self._search_pair(layer, pair)
            alphas[smooth.prev] = choice.alpha
            if choice.alpha is None:
                continue
            fold_scales(get_module(layer, smooth.prev), [get_module(layer, n) for n in smooth.linears],
                        choice.scales, smooth.prev_rows)
            for n in smooth.linears:
                input_scale[n] = input_scale.get(n, 1.0) * choice.scales
        return alphas, input_scale

    def _foldable(self, layer: nn.Module, pair: _Pair) -> bool:
        """Whether a scale can go between the pair's ``prev`` and its linears; a pair that cannot
        take one is said once in the run log and quantized without a scale."""
        smooth = pair.smooth
        width = fold_width(get_module(layer, smooth.prev), smooth.prev_rows)
        in_widths = {W.linear_shape(get_module(layer, n))[1] for n in smooth.linears}
        if in_widths != {width}:
            self._log_once((smooth.prev, smooth.linears),
                           f"awq: not folding {smooth.prev} -> {', '.join(smooth.linears)}: {smooth.prev} "
                           f"writes {width} channels but they read {sorted(in_widths)} (grouped-query "
                           "attention or another width change); these linears are quantized without a scale")
            return False
        if len(pair.targeted) != len(smooth.linears):
            # Folding rescales every linear of the pair; an ignored one must stay untouched.
            self._log_once((smooth.prev, smooth.linears, "ignored"),
                           f"awq: not folding {smooth.prev} -> {', '.join(smooth.linears)}: some of "
                           "them are ignored; the targeted ones are quantized without a scale")
            return False
        return True

    def _log_once(self, key: tuple, message: str) -> None:
        if key not in self.skipped_logged:
            self.skipped_logged.add(key)
            self.context.log(message)

    def _search_pair(self, layer: nn.Module, pair: _Pair) -> ScaleChoice:
        """Step 1 for one pair, on this layer's statistics (summed over the processes)."""
        options, smooth = self.options, pair.smooth
        stats = self.stats[smooth.linears[0]]
        x_mean = self._summed(stats.abs_sum) / self._summed_count(stats.count, stats.abs_sum.device)
        targeted = [get_module(layer, n) for n in pair.targeted]
        weights = [W.linear_weight(m) for m in targeted]
        if smooth.block is None:
            x = torch.cat([t.reshape(-1, t.shape[-1]) for t in stats.search_x])
            loss = linear_scale_loss(x, weights, options.bits, options.group_size, options.symmetric)
        else:
            loss = self._block_loss(get_module(layer, smooth.block), self.stats[smooth.block].block, targeted)
        return scale_search(x_mean, weights, self._shared_loss(loss, x_mean.device), options.group_size,
                            options.duo_scaling, options.n_grid)

    def _quantize(self, layer: nn.Module, name: str, input_scale: torch.Tensor | None) -> None:
        """Steps 3 and 4 for one linear: clip (unless it is not clipped) and round onto the grid
        rule's grid; ``input_scale`` is what was folded into its input columns (None: nothing)."""
        options = self.options
        weight = W.linear_weight(get_module(layer, name)).float()
        x = None
        if (options.clip and name not in self.no_clip) or self.uses_importance:
            x = torch.cat(self.stats[name].clip_x)
            if input_scale is not None:
                x = x / input_scale   # the folded linear's inputs
        if options.clip and name not in self.no_clip:
            weight = clip_weight(weight, x, options, self._summed)
        importance = input_importance(x, self._summed) if self.uses_importance else None
        replace_with_grid(layer, name, quantize_weight(weight, options, self.fit, importance), options)

    # -- data-parallel runs: every process must choose the same scales and clipping bounds

    def _processes(self) -> int:
        return getattr(self.context, "processes", 1)

    def _summed(self, tensor: torch.Tensor) -> torch.Tensor:
        """A statistic summed over the processes of a data-parallel run (itself in one)."""
        return tensor if self._processes() == 1 else self.context.all_reduce(tensor.clone())

    def _summed_count(self, count: int, device) -> float:
        return count if self._processes() == 1 else self.context.all_reduce_count(count, device)

    def _shared_loss(self, loss: Callable[[torch.Tensor], float], device) -> Callable[[torch.Tensor], float]:
        """``loss`` averaged over the processes (each measures it on its own shard of the
        windows, the same number of tokens each up to one window)."""
        if self._processes() == 1:
            return loss
        processes = self._processes()

        def shared(scales: torch.Tensor) -> float:
            value = torch.tensor([loss(scales)], dtype=torch.float64, device=device)
            return self.context.all_reduce(value).item() / processes
        return shared

    def _block_loss(self, block: nn.Module, calls: list, targeted: list[nn.Module]) -> Callable[[torch.Tensor], float]:
        options = self.options
        originals = [W.linear_weight(m).clone() for m in targeted]

        def loss(scales: torch.Tensor) -> float:
            try:
                for module, weight in zip(targeted, originals):
                    quantized = fake_quantize_groups(weight.float() * scales, options.bits, options.group_size,
                                                     options.symmetric) / scales
                    W.set_linear_weight(module, quantized.to(weight.dtype))
                total, count = 0.0, 0
                with torch.no_grad():
                    for args, kwargs, reference in calls:
                        output = _first(block(*args, **kwargs))
                        total += (output.float() - reference.float()).pow(2).sum().item()
                        count += reference.numel()
                return total / max(count, 1)
            finally:
                for module, weight in zip(targeted, originals):
                    W.set_linear_weight(module, weight)
        return loss


# ---------------------------------------------------------------------------- compress


def check_model(model: nn.Module, architecture, options: AWQOptions, log=None) -> dict[str, nn.Module]:
    """The linears AWQ will quantize, after refusing what it cannot do with a clear message.

    With the default ``targets = ["*"]``, linears outside the layers (an encoder's pooler or
    masked-LM transform) are left in float and logged: the user asked for "everything AWQ can
    do", not for those. Named any other way, they are an error."""
    if not architecture.smooth:
        raise PocketError(
            f"architecture {architecture.name!r} has no scale-folding pairs (Architecture.smooth is empty), "
            "so AWQ has nothing to search",
            fix="register an Architecture with smooth pairs through the register_architectures hook, "
            "or use a method that needs no folding (rtn, gptq)")
    selection = select_targets(model, options, architecture, "awq")
    if selection.embed is not None:   # named outright: refused; reached by a pattern: left in float
        if "embed" in options.targets or architecture.embed in options.targets:
            raise PocketError("awq quantizes linears only, not the token embedding", field="targets",
                              fix="quantize the embedding with rtn in a stage of its own")
        selection.embed = None
    targets = selection.linears
    if not targets:
        raise PocketError("awq: no linear layer matches targets/ignore", field="targets")
    outside = [n for n in targets if not n.startswith(architecture.layers + ".")]
    if outside and options.targets == ["*"]:
        if log is not None:
            log(f"awq: {', '.join(outside[:5])} {'is' if len(outside) == 1 else 'are'} outside the layers; left in float")
        targets = {n: m for n, m in targets.items() if n not in outside}
    elif outside:
        raise PocketError(f"awq quantizes the linears of the decoder layers only; these are outside them: "
                          f"{', '.join(outside[:5])}", field="ignore", fix=f"add {outside[0]!r} to ignore")
    selection.linears = targets
    check_group_size(model, selection, options, "awq")
    return targets


def compress(model: nn.Module, options: AWQOptions, context) -> nn.Module:
    architecture = context.architecture(model)  # raises a PocketError naming register_architectures
    rule = grid_rule(context, options.grid, options)  # an unknown or unfit rule is refused before any work
    targets = check_model(model, architecture, options, context.log)
    if options.backend == "llmcompressor":
        if rule.name != "minmax":
            raise PocketError(f"backend 'llmcompressor' fits min-max grids only, not grid {options.grid!r}",
                              field="grid", fix="use backend = 'pocketlm', or grid = 'minmax'")
        from .backend_llmcompressor import compress_with_llmcompressor

        return compress_with_llmcompressor(model, options, context, targets)
    windows = context.calibration_windows()
    handler = AWQHandler(targets, architecture, options, context, total_tokens=int(windows.numel()))
    context.walk(model, handler, sequential=False, windows=windows, description="awq")
    alphas = [a for r in handler.report for a in r["alphas"].values()]
    chosen = [a for a in alphas if a is not None]
    context.log(f"awq: {len(handler.report)} layers, W{options.bits} g{options.group_size} "
                f"{'sym' if options.symmetric else 'asym'}; scales folded for {len(chosen)} of {len(alphas)} searched "
                f"pairs (mean alpha {sum(chosen) / max(len(chosen), 1):.2f}), clip={options.clip}"
                + ("" if rule.name == "minmax" else f", grid {rule.name}"))
    return model
