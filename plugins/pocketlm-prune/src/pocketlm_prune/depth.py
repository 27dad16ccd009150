"""Depth pruning: remove whole layers (of a decoder or of an encoder).

The layers to remove are either chosen by hand (``drop = [1, 3, 5]``, or ``keep = "every-other"``
for a DistilBERT-style student) or ranked on calibration data by

* ``metric="block-influence"`` (ShortGPT, Men et al., 2024): ``1 − cos(x_in, x_out)`` of the
  layer's input and output hidden state, averaged over calibration tokens; a layer that barely
  turns the residual stream does little. The calibration windows are full (no padding), so every
  token counts, in a decoder and in an encoder alike;
* ``metric="perplexity"`` (causal LMs): the increase of the calibration loss when the layer alone
  is left out;
* ``metric="embedding"`` (encoders): ``1 − cos`` of the final sentence embedding (the model's own
  pooling) with and without the layer, averaged over calibration windows framed as sentences.

The ``layers`` lowest-ranked layers are removed at once. The config's layer count (and
``layer_types`` where present) is updated and every ``layer_idx`` attribute is renumbered, so
key/value caching keeps working and the result loads with plain transformers.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pocketlm import PocketError, require_whole_model
from pocketlm.calibration import LayerHandler, module_input
from pocketlm.modules import decoder_layers, get_module, set_module
from pocketlm.sentence import last_hidden, pool, pooling

# the options, effect and plan live in the light module (registration reads them without torch)
from .options import REFERENCE_DEPTH, SCORED_FIELDS, DepthOptions  # noqa: F401
from .options import depth_effect as effect, depth_plan as plan  # noqa: F401


# ------------------------------------------------------------------------- pure tensors


def block_influence(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of ``1 − cos(x_in, x_out)`` for hidden states ``[..., hidden]``."""
    a = x_in.detach().reshape(-1, x_in.shape[-1]).float()
    b = x_out.detach().reshape(-1, x_out.shape[-1]).float()
    return (1 - F.cosine_similarity(a, b, dim=-1)).sum()


def lowest(scores: list[float], count: int) -> list[int]:
    """Indices of the ``count`` lowest scores, ascending by index."""
    return sorted(sorted(range(len(scores)), key=lambda i: scores[i])[:count])


def every_other(count: int) -> list[int]:
    """The layers ``keep = "every-other"`` removes: the odd ones (1, 3, 5, ...)."""
    return list(range(1, count, 2))


def hand_chosen(options: DepthOptions, count: int) -> list[int]:
    """The layers ``drop`` / ``keep`` name, checked against the model's ``count`` layers."""
    if options.keep == "every-other":
        return every_other(count)
    outside = [i for i in options.drop if i >= count]
    if outside:
        raise PocketError(f"drop names layers {outside}, but the model has {count} layers (0 to {count - 1})",
                          field="drop", fix=f"name layers between 0 and {count - 1}")
    if len(options.drop) >= count:
        raise PocketError(f"drop names all {count} layers of the model; at least one must stay", field="drop")
    return sorted(options.drop)


def frame_as_sentences(windows: torch.Tensor, tokenizer) -> torch.Tensor:
    """``windows`` with their first and last token replaced by the tokenizer's ``[CLS]`` and
    ``[SEP]``, so an encoder sees each window as it sees a sentence (CLS pooling reads the first
    token). Unchanged when the tokenizer has no such tokens."""
    cls, sep = getattr(tokenizer, "cls_token_id", None), getattr(tokenizer, "sep_token_id", None)
    if cls is None or sep is None or windows.shape[1] < 3:
        return windows
    framed = windows.clone()
    framed[:, 0], framed[:, -1] = cls, sep
    return framed


# ---------------------------------------------------------------------------- the model


class _Influence(LayerHandler):
    def __init__(self):
        self.scores: list[float] = []
        self._sum, self._tokens = 0.0, 0

    def select(self, index, layer, names):
        return [""]

    def observe(self, name, module, args, kwargs, output):
        x_in = module_input(args, kwargs)
        x_out = output[0] if isinstance(output, (tuple, list)) else output
        self._sum += float(block_influence(x_in, x_out))
        self._tokens += x_in.reshape(-1, x_in.shape[-1]).shape[0]

    def solve(self, index, layer, names):
        self.scores.append(self._sum / max(self._tokens, 1))
        self._sum, self._tokens = 0.0, 0


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _loss(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> float:
    total, count = 0.0, 0
    windows = windows.to(_device(model))
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start:start + batch_size]
        logits = model(input_ids=batch, use_cache=False).logits.float()
        total += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += batch[:, 1:].numel()
    return total / count


@torch.no_grad()
def _embeddings(model: nn.Module, windows: torch.Tensor, mode: str, batch_size: int = 8) -> torch.Tensor:
    """Pooled final hidden states ``[windows, width]`` of an encoder (no padding: every token counts)."""
    windows = windows.to(_device(model))
    out = []
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start:start + batch_size]
        mask = torch.ones_like(batch)
        out.append(pool(last_hidden(model, input_ids=batch, attention_mask=mask).float(), mask, mode))
    return torch.cat(out)


def _without_each_layer(model: nn.Module, arch, measure: Callable[[], float]) -> list[float]:
    """``measure()`` with each layer alone left out, in order; the model is whole again afterwards."""
    layers = decoder_layers(model, arch)
    scores = []
    try:
        for index in range(len(layers)):
            set_module(model, arch.layers, nn.ModuleList([l for i, l in enumerate(layers) if i != index]))
            scores.append(measure())
    finally:
        set_module(model, arch.layers, layers)
    return scores


def perplexity_scores(model: nn.Module, arch, windows: torch.Tensor) -> list[float]:
    """Calibration loss increase when each layer alone is left out."""
    base = _loss(model, windows)
    return [loss - base for loss in _without_each_layer(model, arch, lambda: _loss(model, windows))]


def embedding_scores(model: nn.Module, arch, windows: torch.Tensor) -> list[float]:
    """``1 − cos`` of each window's sentence embedding with and without each layer, averaged."""
    mode = pooling(model)["mode"]
    base = _embeddings(model, windows, mode)

    def change() -> float:
        return float(1 - F.cosine_similarity(_embeddings(model, windows, mode), base, dim=-1).mean())

    return _without_each_layer(model, arch, change)


def remove_layers(model: nn.Module, arch, remove: list[int]) -> None:
    """Drop layers ``remove`` and renumber what is left (config and ``layer_idx``)."""
    layers = decoder_layers(model, arch)
    count = len(layers)
    kept = nn.ModuleList([layer for i, layer in enumerate(layers) if i not in set(remove)])
    set_module(model, arch.layers, kept)
    for new_index, layer in enumerate(kept):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    container = get_module(model, arch.layers.rpartition(".")[0])
    if isinstance(getattr(container, arch.layer_count_key, None), int):  # DistilBERT's Transformer.n_layers
        setattr(container, arch.layer_count_key, len(kept))
    config = model.config
    setattr(config, arch.layer_count_key, len(kept))
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and len(layer_types) == count:
        config.layer_types = [t for i, t in enumerate(layer_types) if i not in set(remove)]


def check_metric(metric: str, arch) -> None:
    """Refuse a metric the model cannot be scored by: perplexity needs next-token logits, the
    sentence embedding needs an encoder."""
    if metric == "perplexity" and arch.encoder:
        raise PocketError(f'metric = "perplexity" needs next-token predictions, but the model is an encoder '
                          f"(architecture {arch.name!r})", field="metric",
                          fix='use metric = "embedding" (the sentence embedding\'s change without the layer) '
                          'or "block-influence" for an encoder')
    if metric == "embedding" and not arch.encoder:
        raise PocketError(f'metric = "embedding" scores the sentence embedding of an encoder, but the model is '
                          f"architecture {arch.name!r}", field="metric",
                          fix='use metric = "perplexity" or "block-influence" for a causal LM')


class DepthPruner:
    def __init__(self, options: DepthOptions, context):
        self.options, self.context = options, context
        self.removed: list[int] = []
        self.scores: list[float] | None = None

    def score(self, model: nn.Module, arch) -> list[float]:
        """One score per layer by ``metric``: the lowest are removed."""
        metric = self.options.metric
        check_metric(metric, arch)
        if metric == "block-influence":
            handler = _Influence()
            self.context.walk(model, handler, sequential=False, description="block influence")
            return handler.scores
        windows = self.context.calibration_windows()[: self.options.samples]
        if metric == "embedding":
            return embedding_scores(model, arch, frame_as_sentences(windows, self.context.tokenizer))
        use_cache = getattr(model.config, "use_cache", None)
        try:
            return perplexity_scores(model, arch, windows)
        finally:
            model.config.use_cache = use_cache

    def choose(self, model: nn.Module, arch, count: int) -> list[int]:
        if self.options.chosen_by_hand:
            return hand_chosen(self.options, count)
        if self.options.layers >= count:
            raise PocketError(f"cannot remove {self.options.layers} of {count} layers", field="layers",
                              fix=f"remove at most {count - 1}")
        self.scores = self.score(model, arch)
        return lowest(self.scores, self.options.layers)

    def __call__(self, model: nn.Module) -> nn.Module:
        arch = self.context.architecture(model)
        count = len(decoder_layers(model, arch))
        if getattr(model.config, "scale_attn_by_inverse_layer_idx", False):
            raise PocketError("this model scales attention by its layer index; removing layers would change "
                              "the scaling of every later layer")
        self.removed = self.choose(model, arch, count)
        remove_layers(model, arch, self.removed)
        self.context.log(f"prune-depth ({self.describe()}): removed layers {self.removed}; "
                         f"{count} -> {count - len(self.removed)} layers")
        return model

    def describe(self) -> str:
        if self.scores is None:
            return f"keep = {self.options.keep}" if self.options.keep else "drop chosen by hand"
        return f"{self.options.metric} scores " + ", ".join(
            f"{s:.4f}" if math.isfinite(s) else str(s) for s in self.scores)


def compress(model: nn.Module, options: DepthOptions, context) -> nn.Module:
    require_whole_model(model, "prune-depth (it removes layers from the model)", fix='set offload = "none" in [model]')
    return DepthPruner(options, context)(model)
