"""Depth pruning: remove whole decoder layers.

Layers are ranked on calibration data by

* ``metric="block-influence"`` (ShortGPT, Men et al., 2024): ``1 − cos(x_in, x_out)`` of the
  layer's input and output hidden state, averaged over calibration tokens; a layer that barely
  turns the residual stream does little;
* ``metric="perplexity"``: the increase of the calibration loss when the layer alone is left out.

The ``layers`` lowest-ranked layers are removed at once. The config's layer count (and
``layer_types`` where present) is updated and every ``layer_idx`` attribute is renumbered, so
key/value caching keeps working and the result loads with plain transformers.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from pocketlm import Options, PocketError, SizeEffect, require_whole_model
from pocketlm.modules import decoder_layers, set_module


class DepthOptions(Options):
    layers: int = Field(1, ge=1)
    metric: Literal["block-influence", "perplexity"] = "block-influence"
    samples: int = Field(8, ge=1)  # calibration windows per evaluation for metric="perplexity"


REFERENCE_DEPTH = 30  # used only to estimate the size effect before a model is known


def effect(options: DepthOptions) -> SizeEffect:
    return SizeEffect(params_removed=min(1.0, options.layers / REFERENCE_DEPTH), features=frozenset({"restructured"}))


def plan(budget=None) -> list[dict]:
    return [{"layers": 2}, {"layers": 4}, {"layers": 6}]


# ------------------------------------------------------------------------- pure tensors


def block_influence(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of ``1 − cos(x_in, x_out)`` for hidden states ``[..., hidden]``."""
    a = x_in.detach().reshape(-1, x_in.shape[-1]).float()
    b = x_out.detach().reshape(-1, x_out.shape[-1]).float()
    return (1 - F.cosine_similarity(a, b, dim=-1)).sum()


def lowest(scores: list[float], count: int) -> list[int]:
    """Indices of the ``count`` lowest scores, ascending by index."""
    return sorted(sorted(range(len(scores)), key=lambda i: scores[i])[:count])


# ---------------------------------------------------------------------------- the model


class _Influence:
    def __init__(self):
        self.scores: list[float] = []
        self._sum, self._tokens = 0.0, 0

    def select(self, index, layer, names):
        return [""]

    def observe(self, name, module, args, kwargs, output):
        x_in = args[0] if args else kwargs["hidden_states"]
        x_out = output[0] if isinstance(output, (tuple, list)) else output
        self._sum += float(block_influence(x_in, x_out))
        self._tokens += x_in.reshape(-1, x_in.shape[-1]).shape[0]

    def solve(self, index, layer, names):
        self.scores.append(self._sum / max(self._tokens, 1))
        self._sum, self._tokens = 0.0, 0


@torch.no_grad()
def _loss(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> float:
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start:start + batch_size]
        logits = model(input_ids=batch, use_cache=False).logits.float()
        total += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += batch[:, 1:].numel()
    return total / count


def perplexity_scores(model: nn.Module, arch, windows: torch.Tensor) -> list[float]:
    """Calibration loss increase when each layer alone is left out."""
    layers = decoder_layers(model, arch)
    base = _loss(model, windows)
    scores = []
    try:
        for index in range(len(layers)):
            set_module(model, arch.layers, nn.ModuleList([l for i, l in enumerate(layers) if i != index]))
            scores.append(_loss(model, windows) - base)
    finally:
        set_module(model, arch.layers, layers)
    return scores


def remove_layers(model: nn.Module, arch, remove: list[int]) -> None:
    """Drop decoder layers ``remove`` and renumber what is left (config and ``layer_idx``)."""
    layers = decoder_layers(model, arch)
    count = len(layers)
    kept = nn.ModuleList([layer for i, layer in enumerate(layers) if i not in set(remove)])
    set_module(model, arch.layers, kept)
    for new_index, layer in enumerate(kept):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    config = model.config
    setattr(config, arch.layer_count_key, len(kept))
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and len(layer_types) == count:
        config.layer_types = [t for i, t in enumerate(layer_types) if i not in set(remove)]


class DepthPruner:
    def __init__(self, options: DepthOptions, context):
        self.options, self.context = options, context

    def __call__(self, model: nn.Module) -> nn.Module:
        arch = self.context.architecture(model)
        count = len(decoder_layers(model, arch))
        if self.options.layers >= count:
            raise PocketError(f"cannot remove {self.options.layers} of {count} layers", field="layers")
        if getattr(model.config, "scale_attn_by_inverse_layer_idx", False):
            raise PocketError("this model scales attention by its layer index; removing layers would change "
                              "the scaling of every later layer")
        if self.options.metric == "block-influence":
            handler = _Influence()
            self.context.walk(model, handler, sequential=False, description="block influence")
            scores = handler.scores
        else:
            windows = self.context.calibration_windows()[: self.options.samples]
            use_cache = getattr(model.config, "use_cache", None)
            scores = perplexity_scores(model, arch, windows)
            model.config.use_cache = use_cache
        remove = lowest(scores, self.options.layers)
        remove_layers(model, arch, remove)
        self.context.log(f"prune-depth ({self.options.metric}): scores "
                         + ", ".join(f"{s:.4f}" if math.isfinite(s) else str(s) for s in scores)
                         + f"; removed layers {remove}")
        self.removed, self.scores = remove, scores
        return model


def compress(model: nn.Module, options: DepthOptions, context) -> nn.Module:
    require_whole_model(model, "prune-depth (it removes layers from the model)", fix='set offload = "none" in [model]')
    return DepthPruner(options, context)(model)
