"""Magnitude pruning: zero the weights of smallest absolute value.

``scope="layer"`` ranks each weight matrix on its own; ``scope="global"`` ranks every targeted
weight of the model together (one threshold), so layers with small weights lose more.
No calibration data is needed (except for ``layer_sparsity="owl"``, which measures outliers).
"""

from __future__ import annotations

import torch
from torch import nn

from pocketlm import PocketError, require_whole_model

from .common import (Targeting, apply_mask, check_prunable, layer_sparsities, nm_mask, old_mask,
                     prune_lowest, protect, select_mask)
from .options import MagnitudeOptions, sparsity_plan
from pocketlm.modules import get_module
from pocketlm.weights import linear_weight


# ------------------------------------------------------------------------- pure tensors


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    return weight.abs().float()


def magnitude_mask(weight: torch.Tensor, sparsity: float = 0.5, nm: tuple[int, int] | None = None,
                   previous: torch.Tensor | None = None) -> torch.Tensor:
    """Keep-mask of one ``[out, in]`` matrix: prune its smallest-magnitude ``sparsity`` fraction
    (or all but N of every M along the input dimension)."""
    return select_mask(protect(magnitude_score(weight), previous), sparsity, nm)


def global_magnitude_masks(weights: dict[str, torch.Tensor], sparsity: float,
                           previous: dict[str, torch.Tensor | None] | None = None) -> dict[str, torch.Tensor]:
    """Keep-masks for several matrices from one threshold over all of them."""
    previous = previous or {}
    scores = {n: protect(magnitude_score(w), previous.get(n)) for n, w in weights.items()}
    flat = torch.cat([s.flatten() for s in scores.values()])
    keep = prune_lowest(flat, round(flat.numel() * sparsity))
    masks, start = {}, 0
    for name, score in scores.items():
        masks[name] = keep[start:start + score.numel()].view(score.shape)
        start += score.numel()
    return masks


# ------------------------------------------------------------------------------ handler


class MagnitudePruner:
    """Prunes every targeted linear of a model by magnitude (no calibration walk)."""

    def __init__(self, options: MagnitudeOptions, context):
        self.options, self.context = options, context

    def __call__(self, model: nn.Module) -> nn.Module:
        options = self.options
        targeting = Targeting(model, options, self.context)
        modules = targeting.all(model)
        if not modules:
            raise PocketError("magnitude: no linear matches targets/ignore", field="targets")
        for name, module in modules.items():
            check_prunable(name, module)
        if options.scope == "global":
            require_whole_model(model, "magnitude with scope = \"global\" (one threshold over every weight)",
                                fix='use scope = "layer", or set offload = "none" in [model]')
            if options.nm is not None or options.layer_sparsity != "uniform":
                raise PocketError("magnitude scope='global' takes one unstructured sparsity",
                                  fix="use scope='layer' with a pattern or with layer_sparsity='owl'")
            weights = {n: linear_weight(m) for n, m in modules.items()}
            masks = global_magnitude_masks(weights, options.sparsity, {n: old_mask(m) for n, m in modules.items()})
            for name, module in modules.items():
                apply_mask(module, weights[name], masks[name])
        else:
            sparsities = layer_sparsities(model, options, self.context, targeting)
            candidates = [n for group in targeting.arch.sequential for n in group]
            for index, layer in self.context.layers(model):  # one layer in memory when it streams
                for name in targeting.names(index, candidates):
                    module = get_module(layer, name)
                    weight = linear_weight(module)
                    apply_mask(module, weight, magnitude_mask(weight, sparsities[index], options.nm, old_mask(module)))
        self.context.log(f"magnitude: pruned {len(modules)} linears ({options.scope}, "
                         f"{options.pattern or f'{options.target_sparsity:.0%}'})")
        return model


def compress(model: nn.Module, options: MagnitudeOptions, context) -> nn.Module:
    return MagnitudePruner(options, context)(model)


plan = sparsity_plan
