"""What the unstructured pruning methods share: options, mask selection, targets, OWL.

Pure tensor functions (no model, no hooks) come first: they take scores and return boolean
masks, ``True`` for kept weights (the convention of :func:`pocketlm.weights.set_mask`).
A score of ``-inf`` marks a weight an earlier stage already pruned: it is always pruned again,
so a new mask only ever adds zeros.
"""

from __future__ import annotations

import torch
from torch import nn

from pocketlm import PocketError
from pocketlm.calibration import LayerHandler, module_input
from pocketlm.modules import decoder_layers, get_module, matches
from pocketlm.weights import get_mask, is_linear, is_quantized, linear_weight

# the options, effect and plan live in the light module (registration reads them without torch)
from .options import PATTERNS, PruneOptions, prune_effect, sparsity_plan  # noqa: F401


# ---------------------------------------------------------------- mask selection (pure)


def protect(score: torch.Tensor, old_mask: torch.Tensor | None) -> torch.Tensor:
    """``score`` with weights an earlier mask pruned set to ``-inf`` (so they are pruned first)."""
    score = score.float().clone()
    if old_mask is not None:
        score[~old_mask.to(score.device)] = float("-inf")
    return score


def prune_lowest(score: torch.Tensor, count: int) -> torch.Tensor:
    """Keep-mask that prunes exactly the ``count`` lowest entries of ``score`` (any shape), or
    every ``-inf`` entry where there are more of those."""
    count = max(int(count), int(torch.isneginf(score).sum()))
    mask = torch.ones(score.numel(), dtype=torch.bool, device=score.device)
    if count > 0:
        mask[torch.topk(score.flatten(), count, largest=False).indices] = False
    return mask.view(score.shape)


def prune_lowest_per_row(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask that prunes the ``int(cols * sparsity)`` lowest entries of each row (more in a
    row that already holds more ``-inf`` entries)."""
    rows, cols = score.shape
    count = torch.full((rows, 1), int(cols * sparsity), device=score.device)
    count = torch.maximum(count, torch.isneginf(score).sum(dim=1, keepdim=True))
    rank = torch.argsort(torch.argsort(score, dim=1, stable=True), dim=1)  # 0 = lowest
    return rank >= count


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with the ``n`` highest of every ``m`` consecutive entries along the last
    dimension (N:M semi-structured sparsity). ``-inf`` entries are pruned first."""
    rows, cols = score.shape
    if cols % m:
        raise PocketError(f"an {n}:{m} pattern needs an input width divisible by {m}, not {cols}")
    groups = score.reshape(rows, cols // m, m)
    pruned = torch.topk(groups, m - n, dim=-1, largest=False).indices
    mask = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, pruned, False)
    return mask.reshape(rows, cols) & ~torch.isneginf(score)


def select_mask(score: torch.Tensor, sparsity: float, nm: tuple[int, int] | None,
                per_row: bool = False) -> torch.Tensor:
    """The keep-mask of one matrix from its importance ``score``: N:M when ``nm`` is given, else
    ``sparsity`` of each row (``per_row``) or of the whole matrix."""
    if nm is not None:
        return nm_mask(score, *nm)
    if per_row:
        return prune_lowest_per_row(score, sparsity)
    return prune_lowest(score, round(score.numel() * sparsity))


# -------------------------------------------------------------------- OWL (pure + pass)


def owl_sparsities(outlier_ratios: list[float], sparsity: float, lam: float) -> list[float]:
    """Outlier-weighted layer-wise sparsity (Yin et al., 2024): map each layer's outlier ratio
    linearly onto densities spanning ``2 * lam``, shift so the mean density is ``1 - sparsity``;
    layers with more outliers get more density (less sparsity)."""
    ratios = torch.tensor(outlier_ratios, dtype=torch.float64, device="cpu")  # a few numbers, one per layer
    spread = ratios.max() - ratios.min()
    density = (ratios - ratios.min()) / spread * 2 * lam if spread > 0 else torch.zeros_like(ratios)
    density = density - density.mean() + (1 - sparsity)
    return [float(1 - d) for d in density]


def outlier_ratio(scores: list[torch.Tensor], threshold: float) -> float:
    """Fraction of Wanda scores of a layer above ``threshold`` times their mean (OWL's LOD)."""
    flat = torch.cat([s.flatten() for s in scores])
    return float((flat > threshold * flat.mean()).float().mean())


class InputNorms:
    """Running sum of squared inputs per input channel of each observed linear (Wanda's
    ``‖X_j‖₂²``), keyed by relative name."""

    def __init__(self):
        self.sq: dict[str, torch.Tensor] = {}

    def add(self, name: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        total = (x * x).sum(dim=0)
        self.sq[name] = self.sq[name] + total if name in self.sq else total

    def norm(self, name: str, summed=lambda t: t) -> torch.Tensor:
        """``‖X_j‖₂`` over every token; ``summed`` adds the sums of squares of other processes."""
        return summed(self.sq[name]).sqrt()


class _OwlPass(LayerHandler):
    """A read-only walk that measures each layer's outlier ratio on the unpruned model."""

    def __init__(self, targeting: "Targeting", threshold: float):
        self.targeting, self.threshold = targeting, threshold
        self.norms = InputNorms()
        self.ratios: list[float] = []

    def select(self, index, layer, names):
        return self.targeting.names(index, names)

    def observe(self, name, module, args, kwargs, output):
        self.norms.add(name, module_input(args, kwargs))

    def solve(self, index, layer, names):
        scores = [linear_weight(get_module(layer, n)).abs().float() * self.norms.norm(n, self.targeting.summed)
                  for n in names]
        self.ratios.append(outlier_ratio(scores, self.threshold))
        self.norms = InputNorms()


def layer_sparsities(model: nn.Module, options: PruneOptions, context, targeting: "Targeting") -> list[float]:
    """Sparsity of each decoder layer: uniform, or OWL's from a calibration pass."""
    count = len(decoder_layers(model, targeting.arch))
    if options.layer_sparsity == "uniform":
        return [options.target_sparsity] * count
    owl = _OwlPass(targeting, options.owl_threshold)
    context.walk(model, owl, sequential=False, description="OWL outliers")
    result = owl_sparsities(owl.ratios, options.sparsity, options.owl_lambda)
    context.log("OWL layer sparsities: " + ", ".join(f"{s:.3f}" for s in result))
    return result


# ----------------------------------------------------------------------------- targets


class Targeting:
    """Which linears of which decoder layer a method prunes (``targets``/``ignore`` matched on
    full module names), and the checks every pruner makes on them."""

    def __init__(self, model: nn.Module, options: PruneOptions, context):
        self.arch = context.architecture(model)
        self.targets, self.ignore = list(options.targets), list(options.ignore)
        self.context = context

    def summed(self, tensor: torch.Tensor) -> torch.Tensor:
        """A statistic summed over the processes of a data-parallel run (itself in one process)."""
        if getattr(self.context, "processes", 1) == 1:
            return tensor
        return self.context.all_reduce(tensor.clone())

    def summed_count(self, count: int, device: torch.device) -> float:
        if getattr(self.context, "processes", 1) == 1:
            return count
        return self.context.all_reduce_count(count, device)

    def full_name(self, index: int, name: str) -> str:
        return f"{self.arch.layers}.{index}.{name}"

    def names(self, index: int, candidates) -> list[str]:
        return [n for n in candidates
                if matches(self.full_name(index, n), self.targets) and not matches(self.full_name(index, n), self.ignore)]

    def all(self, model: nn.Module) -> dict[str, nn.Module]:
        """Every targeted linear of every decoder layer, by full name."""
        candidates = [n for group in self.arch.sequential for n in group]
        found = {}
        for index, layer in enumerate(decoder_layers(model, self.arch)):
            for name in self.names(index, candidates):
                found[self.full_name(index, name)] = get_module(layer, name)
        return found


def check_prunable(name: str, module: nn.Module) -> None:
    if is_quantized(module):
        raise PocketError(f"{name} is already quantized; prune before quantizing",
                          fix="put the pruning stage before the quantization stage")
    if not is_linear(module):
        raise PocketError(f"{name} is not a linear layer")


def apply_mask(module: nn.Module, weight: torch.Tensor, mask: torch.Tensor) -> None:
    """Write ``weight`` (``[out, in]``) into ``module`` and record ``mask`` on it."""
    from pocketlm.weights import set_linear_weight, set_mask

    set_linear_weight(module, weight.to(linear_weight(module).dtype))
    set_mask(module, mask)


def old_mask(module: nn.Module) -> torch.Tensor | None:
    return get_mask(module)


class CalibratedPruner(LayerHandler):
    """The layer handler Wanda and SparseGPT share: observe the inputs of the targeted linears of
    each group, then prune them with ``prune(name, module, sparsity)`` (subclasses)."""

    changes_only_selected = True   # solve touches only the linears it is given (walker may replay)
    observes_outputs = False       # statistics of the inputs only: the walker may skip running them
    layers_independent = True      # per-layer statistics, freed in solve: a stage may resume mid-walk

    def __init__(self, targeting: Targeting, sparsities: list[float], options: PruneOptions, log):
        self.targeting, self.sparsities, self.options, self.log = targeting, sparsities, options, log

    def select(self, index, layer, names):
        chosen = self.targeting.names(index, names)
        for name in chosen:
            check_prunable(self.targeting.full_name(index, name), get_module(layer, name))
        return chosen

    def observe(self, name, module, args, kwargs, output):
        self.accumulate(name, module_input(args, kwargs).detach())

    def solve(self, index, layer, names):
        for name in names:
            module = get_module(layer, name)
            weight, mask = self.prune(name, module, self.sparsities[index])
            apply_mask(module, weight, mask)
        self.free()

    def accumulate(self, name: str, x: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def prune(self, name: str, module: nn.Module, sparsity: float):  # pragma: no cover - abstract
        raise NotImplementedError

    def free(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError
