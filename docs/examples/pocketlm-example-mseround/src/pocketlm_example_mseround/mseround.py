"""The ``mse`` grid rule: each group's scale chosen by the smallest squared rounding error.

Min-max stretches a group's grid to its largest weight, so one outlier makes every other weight
of the group round coarsely. ``mse`` tries ``CANDIDATES`` scales ``s * f``, ``f`` evenly spaced
from 1 down to ``1 - MAX_SHRINK`` (``s``: the min-max scale), and keeps per row of each group
the one with the smallest squared error; ``f = 1`` is among them, so it is never worse than
min-max. The grid is symmetric: a pruned (zero) weight stays exactly zero.
"""

from __future__ import annotations

import torch

from pocketlm.quant import group_slices
from pocketlm.weights import fake_quantize, to_scale_dtype

CANDIDATES = 20
MAX_SHRINK = 0.2


def mse_grid(W: torch.Tensor, bits: int, group_size: int, symmetric: bool = True,
             importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scales, zeros)``, both ``[rows, groups]``, of the symmetric grid of least squared error."""
    maxq, zero = 2**bits - 1, 2 ** (bits - 1)
    scales = []
    for cols in group_slices(W.shape[1], group_size):
        w = W[:, cols].float()
        base = 2 * w.abs().amax(dim=1, keepdim=True) / maxq            # the min-max scale
        best, best_error = base, torch.full_like(base, float("inf"))
        # plain numbers, made on the CPU whatever the default device (the kit checks that)
        for factor in torch.linspace(1.0, 1.0 - MAX_SHRINK, CANDIDATES, device="cpu").tolist():
            scale = to_scale_dtype(base * factor)                       # the float16 value stored
            error = (fake_quantize(w, scale, zero, bits) - w).pow(2).sum(dim=1, keepdim=True)
            best = torch.where(error < best_error, scale, best)
            best_error = torch.minimum(error, best_error)
        scales.append(best)
    scales = torch.cat(scales, 1)
    return scales, torch.full_like(scales, zero)
