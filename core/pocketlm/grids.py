"""Grid rules the core provides: how a group of weights gets its scale and zero point.

* ``minmax`` (the default): the grid spans each group's minimum and maximum (``weights.minmax_grid``).
* ``weighted-mse``: the idea behind llama.cpp's importance matrix. Each group tries ``n_grid``
  shrunken ranges (an activation-aware clip search) and keeps the one with the lowest squared error
  weighted by the importance of each input channel (the mean squared activation that reaches
  it). Without an importance vector every channel weighs the same (plain MSE). The first
  candidate is min-max itself, so its weighted error is never higher than min-max's.

Both are pure functions of a ``[rows, cols]`` matrix: ``fit(W, bits, group_size, symmetric,
importance=None) -> (scales, zeros)``, each ``[rows, groups]``.
"""

from __future__ import annotations

import torch

from .calibration import LayerHandler, module_input
from .weights import group_grid, group_slices, to_scale_dtype  # noqa: F401  (group_slices: imported from here before)

N_GRID = 20          # candidates per group (the usual clip-search grid)
MAX_SHRINK = 0.5     # the narrowest candidate keeps half the min-max range


def minmax_group_grid(W: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                      importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max ``scales`` and ``zeros`` (``[rows, groups]``) of ``W``; ``importance`` is ignored."""
    return group_grid(W, bits, group_size, symmetric)


def shrunk_grid(w: torch.Tensor, bits: int, symmetric: bool, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The min-max grid of ``w`` (``[rows, cols]``) with its range scaled by ``ratio``: ``([rows, 1], [rows, 1])``."""
    maxq = 2**bits - 1
    if symmetric:
        scale = 2 * w.abs().amax(dim=1, keepdim=True) * ratio / maxq
        scale = to_scale_dtype(torch.where(scale == 0, torch.ones_like(scale), scale))
        return scale, torch.full_like(scale, 2 ** (bits - 1))
    lo = w.amin(dim=1, keepdim=True).clamp(max=0) * ratio
    hi = w.amax(dim=1, keepdim=True).clamp(min=0) * ratio
    scale = (hi - lo) / maxq
    scale = to_scale_dtype(torch.where(scale == 0, torch.ones_like(scale), scale))
    return scale, torch.round(-lo / scale).clamp(0, maxq)


def weighted_error(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                   importance: torch.Tensor) -> torch.Tensor:
    """Per row of ``w``: ``sum_j importance_j (w_j - fake_quantize(w_j))^2``."""
    q = torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)
    return (((q - zero) * scale - w) ** 2 * importance).sum(dim=1)


def weighted_group_grid(W: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                        importance: torch.Tensor | None = None, n_grid: int = N_GRID,
                        max_shrink: float = MAX_SHRINK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the shrink of the min-max range (``1 - i * max_shrink / n_grid``, ``i < n_grid``)
    with the lowest importance-weighted squared error. Returns ``(scales, zeros)`` ``[rows, groups]``."""
    W = W.float()
    weight = (torch.ones(W.shape[1], device=W.device) if importance is None
              else importance.to(W.device, torch.float32).clamp_min(0))
    scales, zeros = [], []
    for cols in group_slices(W.shape[1], group_size):
        w, imp = W[:, cols], weight[cols]
        best_scale, best_zero = shrunk_grid(w, bits, symmetric, 1.0)
        best = weighted_error(w, best_scale, best_zero, bits, imp)
        for i in range(1, n_grid):
            scale, zero = shrunk_grid(w, bits, symmetric, 1 - i * max_shrink / n_grid)
            error = weighted_error(w, scale, zero, bits, imp)
            better = (error < best).unsqueeze(1)
            best = torch.minimum(error, best)
            best_scale, best_zero = torch.where(better, scale, best_scale), torch.where(better, zero, best_zero)
        scales.append(best_scale)
        zeros.append(best_zero)
    return torch.cat(scales, 1), torch.cat(zeros, 1)


# ------------------------------------------------------------------ importance from calibration


class InputImportanceHandler(LayerHandler):
    """Layer-walker handler that only observes: each selected linear's mean squared input per
    channel (summed over the processes of a data-parallel run), the importance an
    importance-weighted grid rule or a sensitivity measure weighs errors by."""

    changes_only_selected = True
    observes_outputs = False

    def __init__(self, layers_path: str, selected, context=None):
        self.layers_path, self.selected, self.context = layers_path, set(selected), context
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.importance: dict[str, torch.Tensor] = {}

    def select(self, index, layer, names):
        return [n for n in names if f"{self.layers_path}.{index}.{n}" in self.selected]

    def observe(self, name, module, args, kwargs, output):
        x = module_input(args, kwargs)
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.sums[name] = self.sums.get(name, 0) + (x * x).sum(0)
        self.counts[name] = self.counts.get(name, 0) + x.shape[0]

    def solve(self, index, layer, names):
        for name in names:
            if name not in self.sums:
                continue
            total, count = self.sums.pop(name), self.counts.pop(name)
            if self.context is not None and self.context.processes > 1:
                total = self.context.all_reduce(total)
                count = self.context.all_reduce_count(count, total.device)
            self.importance[f"{self.layers_path}.{index}.{name}"] = total / count


def input_importance(model, names, context, description: str = "importance") -> dict[str, torch.Tensor]:
    """Mean squared input per channel of the linears ``names`` that sit in the decoder layers, on
    the calibration windows (one walk, observing only); empty where the context has no
    calibration data. Linears outside the decoder layers (an untied head) are not walked."""
    if context.calibration is None and getattr(context, "_windows", None) is None:
        return {}
    handler = InputImportanceHandler(context.architecture(model).layers, names, context)
    context.walk(model, handler, sequential=False, description=description)
    return handler.importance
