"""Wanda (Sun et al., 2023): prune by weight magnitude times input activation norm.

The score of weight ``W[i, j]`` is ``|W[i, j]| * ‖X_j‖₂`` where ``X_j`` is input channel ``j``
over every calibration token; weights compete only within their output row (each row keeps the
same number of weights), or within each group of M inputs for N:M. No weight update.
"""

from __future__ import annotations

import torch
from torch import nn

from pocketlm.weights import linear_weight

from .common import CalibratedPruner, InputNorms, Targeting, layer_sparsities, old_mask, protect, select_mask
from .options import WandaOptions, sparsity_plan


# ------------------------------------------------------------------------- pure tensors


def wanda_score(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """``|W| * ‖X_j‖₂`` for an ``[out, in]`` weight and the ``[in]`` norms of its inputs."""
    return weight.abs().float() * input_norm.float().view(1, -1)


def wanda_mask(weight: torch.Tensor, input_norm: torch.Tensor, sparsity: float = 0.5,
               nm: tuple[int, int] | None = None, previous: torch.Tensor | None = None) -> torch.Tensor:
    """Keep-mask: prune the lowest-scoring ``sparsity`` of each output row (or N:M)."""
    return select_mask(protect(wanda_score(weight, input_norm), previous), sparsity, nm, per_row=True)


# ------------------------------------------------------------------------------ handler


class WandaPruner(CalibratedPruner):
    def __init__(self, *args):
        super().__init__(*args)
        self.norms = InputNorms()

    def accumulate(self, name, x):
        self.norms.add(name, x)

    def prune(self, name, module, sparsity):
        weight = linear_weight(module)
        norm = self.norms.norm(name, self.targeting.summed)
        return weight, wanda_mask(weight, norm, sparsity, self.options.nm, old_mask(module))

    def free(self):
        self.norms = InputNorms()


def compress(model: nn.Module, options: WandaOptions, context) -> nn.Module:
    targeting = Targeting(model, options, context)
    sparsities = layer_sparsities(model, options, context, targeting)
    context.walk(model, WandaPruner(targeting, sparsities, options, context.log), sequential=True,
                 description="wanda")
    context.log(f"wanda: pruned to {options.pattern or f'{options.target_sparsity:.0%}'}")
    return model


plan = sparsity_plan
