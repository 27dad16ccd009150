"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning with an optimal-brain-surgeon update.

For a linear layer with calibration inputs ``X`` the Hessian of ``‖WX − ŴX‖²`` is
``H = 2 X Xᵀ``. Columns are processed left to right in blocks of ``block_size``. At the start
of each block the mask of that block is chosen by the OBS saliency ``w² / [H⁻¹]ⱼⱼ²`` (the
``sparsity`` fraction of the block's weights with the lowest saliency; for N:M, the M−N lowest of
every M columns, chosen when the walk reaches them). Each pruned weight's error is then spread
over the not-yet-processed columns through the Cholesky factor of ``H⁻¹``, so the remaining
weights compensate for it.
"""

from __future__ import annotations

import torch
from torch import nn

from pocketlm.weights import linear_weight

from .common import CalibratedPruner, Targeting, layer_sparsities, old_mask
from .options import SparseGPTOptions, sparsity_plan


# ------------------------------------------------------------------------- pure tensors


def hessian(x: torch.Tensor) -> torch.Tensor:
    """``2 XᵀX / n`` of inputs ``x`` (``[..., in]``)."""
    x = x.reshape(-1, x.shape[-1]).float()
    return 2 * x.t() @ x / x.shape[0]


def inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹``, with ``λ = damp · mean(diag H)``."""
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    mean = torch.mean(torch.diag(h))
    for attempt in range(4):  # raise the damping tenfold if H is numerically not positive definite
        try:
            damped = h + damp * 10**attempt * mean * eye
            hinv = torch.cholesky_inverse(torch.linalg.cholesky(damped))
            return torch.linalg.cholesky(hinv, upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise torch.linalg.LinAlgError("the Hessian stays singular even with 1000x the damping")


def _block_counts(rows: int, cols: int, block_size: int, sparsity: float) -> list[int]:
    """How many weights each column block prunes so the matrix total is exactly
    ``round(rows * cols * sparsity)``."""
    counts, done = [], 0
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        target = round(rows * end * sparsity)
        counts.append(target - done)
        done = target
    return counts


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, h: torch.Tensor, sparsity: float = 0.5,
                    nm: tuple[int, int] | None = None, block_size: int = 128, damp: float = 0.01,
                    previous: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` (``[out, in]``) given the Hessian ``h`` (``[in, in]``) of its inputs.

    Returns ``(updated weight, keep-mask)``; the updated weight is exactly zero where the mask is
    False. ``previous`` is a keep-mask an earlier stage set: those weights stay pruned."""
    w = weight.detach().clone().float()
    h = h.detach().clone().float()
    rows, cols = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    hinv = inverse_hessian_factor(h, damp)
    forced = torch.zeros_like(w, dtype=torch.bool) if previous is None else ~previous.to(w.device)
    pruned = torch.zeros_like(w, dtype=torch.bool)
    if nm is not None:
        n, m = nm
        if cols % m or block_size % m:
            raise ValueError(f"{n}:{m} needs the input width ({cols}) and block_size ({block_size}) divisible by {m}")
    counts = _block_counts(rows, cols, block_size, sparsity)

    for block, start in enumerate(range(0, cols, block_size)):
        end = min(start + block_size, cols)
        w1 = w[:, start:end].clone()
        hinv1 = hinv[start:end, start:end]
        d = torch.diag(hinv1)
        errors = torch.zeros_like(w1)
        forced1 = forced[:, start:end]
        if nm is None:
            saliency = w1**2 / d.view(1, -1) ** 2
            saliency[forced1] = float("-inf")
            count = max(counts[block], int(forced1.sum()))
            mask1 = torch.zeros_like(w1, dtype=torch.bool).flatten()
            if count:
                mask1[torch.topk(saliency.flatten(), count, largest=False).indices] = True
            mask1 = mask1.view_as(w1)
        else:
            mask1 = forced1.clone()
        for i in range(end - start):
            if nm is not None and i % nm[1] == 0:
                saliency = w1[:, i:i + nm[1]] ** 2 / d[i:i + nm[1]].view(1, -1) ** 2
                saliency[forced1[:, i:i + nm[1]]] = float("-inf")
                low = torch.topk(saliency, nm[1] - nm[0], dim=1, largest=False).indices
                mask1[:, i:i + nm[1]].scatter_(1, low, True)
            column = w1[:, i]
            q = column.clone()
            q[mask1[:, i]] = 0
            err = (column - q) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            w1[:, i] = q
            errors[:, i] = err
        w[:, start:end] = w1
        pruned[:, start:end] = mask1
        w[:, end:] -= errors @ hinv[start:end, end:]
    w[pruned] = 0
    return w, ~pruned


# ------------------------------------------------------------------------------ handler


class SparseGPTPruner(CalibratedPruner):
    def __init__(self, *args):
        super().__init__(*args)
        self.h: dict[str, torch.Tensor] = {}
        self.n: dict[str, int] = {}

    def accumulate(self, name, x):
        x = x.reshape(-1, x.shape[-1]).float()
        xtx = 2 * x.t() @ x
        self.h[name] = self.h[name] + xtx if name in self.h else xtx
        self.n[name] = self.n.get(name, 0) + x.shape[0]

    def prune(self, name, module, sparsity):
        weight = linear_weight(module)
        h = self.h.pop(name)
        h = self.targeting.summed(h) / self.targeting.summed_count(self.n.pop(name), h.device)
        new, mask = sparsegpt_prune(weight, h, sparsity, self.options.nm, self.options.block_size,
                                    self.options.damp, old_mask(module))
        return new, mask

    def free(self):
        self.h.clear()
        self.n.clear()


def compress(model: nn.Module, options: SparseGPTOptions, context) -> nn.Module:
    targeting = Targeting(model, options, context)
    sparsities = layer_sparsities(model, options, context, targeting)
    context.walk(model, SparseGPTPruner(targeting, sparsities, options, context.log), sequential=True,
                 description="sparsegpt")
    context.log(f"sparsegpt: pruned to {options.pattern or f'{options.target_sparsity:.0%}'}")
    return model


plan = sparsity_plan
