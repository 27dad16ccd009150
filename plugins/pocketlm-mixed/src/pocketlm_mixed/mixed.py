"""Mixed precision by measured sensitivity: bits per matrix under a byte budget.

1. **Measure.** One pass of the layer walker over the calibration windows records, for every
   targeted linear, the mean squared activation of each input channel (``importance``). For each
   candidate bit width ``b``, the matrix is rounded onto its grid and its sensitivity is the
   diagonal-Hessian proxy of the output error, ``sum_ij importance_j (W - Q_b)_ij^2`` (the mean
   squared change of the layer's output per token if input channels were uncorrelated). The token
   embedding, when it takes part, is weighed by how often each token occurs in the windows.
2. **Allocate.** Choosing one width per matrix to minimise the summed error under a byte budget is
   a multiple-choice knapsack; :func:`allocate` solves it exactly by dynamic programming over the
   budget cut into ``resolution`` units (each cost rounded up, so the budget always holds).
3. **Run.** The allocation becomes ordinary stages, one per width, of an existing method (``rtn`` or
   ``gptq``) whose ``targets`` name their linears one by one; :func:`allocation_recipe` gives them
   as a recipe (``pocketlm run`` runs it as it stands) and the ``mixed`` stage runs them in turn.

Sizes (``size_model``): ``"gguf"`` counts the bytes the ``gguf`` exporter writes: with the k-quant
grids (``q2_k`` ... ``q6_k``) a row length that 256 divides costs 2.625, 3.4375, 4.5, 5.5 or
6.5625 bits per weight, other rows the 32-weight blocks that hold those grids (Q4_0 for 2 to 4
bits, Q5_0, Q8_0), and 8 bits Q8_0 (8.5). ``"grid"`` counts ``bits + 16 / group_size``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pocketlm import PocketError
from pocketlm.grids import input_importance
from pocketlm.modules import get_module, select_linears
from pocketlm.weights import (QuantizedEmbedding, get_mask, linear_shape, linear_weight, minmax_grid,
                              packed_bits_per_weight, quantize)

from .options import BITS, EMBEDDING_BITS, MixedOptions, effect, plan  # noqa: F401  (kept importable from here)

# bits -> (group size, grid rule) of the stage that quantizes at that width, per size model
GGUF_STAGES = {2: (16, "q2_k"), 3: (16, "q3_k"), 4: (32, "q4_k"), 5: (32, "q5_k"), 6: (16, "q6_k"), 8: (32, "minmax")}
GRID_STAGES = {b: (32, "weighted-mse") for b in BITS}
KQUANT_BPW = {2: 2.625, 3: 3.4375, 4: 4.5, 5: 5.5, 6: 6.5625}
BLOCK32_BPW = {2: 4.5, 3: 4.5, 4: 4.5, 5: 5.5, 6: 8.5, 8: 8.5}


# ----------------------------------------------------------------------- pure functions


def storage_bits(bits: int, cols: int, size_model: str) -> float:
    """Bits per weight a ``[rows, cols]`` matrix of ``bits``-bit grids costs on disk."""
    if size_model == "grid":
        return packed_bits_per_weight(bits, GRID_STAGES[bits][0], symmetric=True)   # the stages' grids
    if bits in KQUANT_BPW and cols % 256 == 0:
        return KQUANT_BPW[bits]
    return BLOCK32_BPW[bits]


def weighted_error(W: torch.Tensor, Q: torch.Tensor, importance: torch.Tensor) -> float:
    """``sum_ij importance_j (W - Q)_ij^2``: the output's squared error per token, diagonal proxy."""
    return float((((W - Q) ** 2) * importance).sum())


def round_to_grid(W: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """``W`` rounded onto per-group grids ``scales``/``zeros`` ``[rows, groups]`` and mapped back."""
    size = math.ceil(W.shape[1] / scales.shape[1])
    scale = scales.repeat_interleave(size, 1)[:, :W.shape[1]]
    zero = zeros.repeat_interleave(size, 1)[:, :W.shape[1]]
    return (quantize(W, scale, zero, bits) - zero) * scale


def allocate(costs: list[list[int]], errors: list[list[float]], budget: int, resolution: int = 4000) -> list[int]:
    """Exact multiple-choice knapsack: one choice per item, summed ``costs`` at most ``budget``,
    summed ``errors`` least. Returns the chosen index of every item.

    Dynamic programming over the budget in units of ``ceil(budget / resolution)``; each cost is
    rounded up to whole units, so the chosen set always fits ``budget`` (and is the exact optimum
    when every cost is a multiple of the unit, as with ``resolution >= budget``)."""
    unit = max(1, math.ceil(budget / resolution))
    capacity = budget // unit
    best = np.zeros(capacity + 1)                 # least error of the items so far within u units
    picks = []
    for item_costs, item_errors in zip(costs, errors):
        units = [math.ceil(c / unit) for c in item_costs]
        new = np.full(capacity + 1, np.inf)
        pick = np.full(capacity + 1, -1, dtype=np.int32)
        for index, (u, e) in enumerate(zip(units, item_errors)):
            if u > capacity:
                continue
            candidate = np.full(capacity + 1, np.inf)
            candidate[u:] = best[:capacity + 1 - u] + e
            better = candidate < new
            new[better], pick[better] = candidate[better], index
        best = new
        picks.append(pick)
    if not np.isfinite(best[capacity]):
        raise ValueError("no choice fits the budget")
    chosen, remaining = [], capacity
    for item_costs, pick in zip(reversed(costs), reversed(picks)):
        index = int(pick[remaining])
        chosen.append(index)
        remaining -= math.ceil(item_costs[index] / unit)
    return chosen[::-1]


# ----------------------------------------------------------------------- measuring


def measure_importance(model: nn.Module, names: list[str], context) -> dict[str, torch.Tensor]:
    """Mean squared input per channel of each linear in ``names``, from the calibration windows
    (linears outside the decoder layers, never walked, weigh every channel 1)."""
    measured = input_importance(model, names, context, description="mixed: importance")
    return {n: measured.get(n, torch.ones(linear_shape(get_module(model, n))[1])) for n in names}


@dataclass
class Item:
    """One matrix (or the embedding) of the knapsack: its choices of width, cost and error."""

    name: str
    params: int
    choices: list[int]           # bits (16: the embedding left in float16)
    costs: list[int]             # bytes
    errors: list[float]


def linear_item(name: str, W: torch.Tensor, importance: torch.Tensor, options: MixedOptions, grid_rules) -> Item:
    """The choices of one linear: each width's bytes and sensitivity (its grid rule, with importance)."""
    rows, cols = W.shape
    stages = GGUF_STAGES if options.size_model == "gguf" else GRID_STAGES
    costs, errors = [], []
    for bits in options.bits:
        group_size, grid = stages[bits]
        size = group_size if cols % group_size == 0 else -1
        scales, zeros = grid_rules[grid].fit(W, bits, size, True, importance)
        errors.append(weighted_error(W, round_to_grid(W, scales, zeros, bits), importance))
        costs.append(math.ceil(rows * cols * storage_bits(bits, cols, options.size_model) / 8))
    return Item(name, rows * cols, list(options.bits), costs, errors)


def embedding_item(name: str, E: torch.Tensor, windows: torch.Tensor, options: MixedOptions) -> Item:
    """The token embedding: float16, or a symmetric 32-group grid of 8 or 4 bits (Q8_0, Q4_0);
    each token's squared error weighted by its frequency in the calibration windows."""
    counts = torch.bincount(windows.reshape(-1), minlength=E.shape[0])[:E.shape[0]].float()
    frequency = (counts / counts.sum()).unsqueeze(1)
    rows, cols = E.shape
    choices, costs, errors = [16], [rows * cols * 2], [0.0]
    for bits in options.embedding_bits:
        flat = E.reshape(-1, 32)
        scale, zero = minmax_grid(flat, bits, True)
        Q = ((quantize(flat, scale, zero, bits) - zero) * scale).view(rows, cols)
        choices.append(bits)
        costs.append(math.ceil(rows * cols * (bits + 0.5) / 8))
        errors.append(float((((E - Q) ** 2) * frequency).sum()))
    return Item(name, rows * cols, choices, costs, errors)


def allocation_stages(items: list[Item], chosen: list[int], options: MixedOptions, embedding: str | None) -> list[dict]:
    """The stages that run an allocation: one per width, naming its linears; the embedding's own."""
    stages_of = GGUF_STAGES if options.size_model == "gguf" else GRID_STAGES
    by_bits: dict[int, list[str]] = {}
    embedding_bits = None
    for item, index in zip(items, chosen):
        bits = item.choices[index]
        if item.name == embedding:
            embedding_bits = None if bits == 16 else bits
        else:
            by_bits.setdefault(bits, []).append(item.name)
    stages = []
    for bits in sorted(by_bits):
        group_size, grid = stages_of[bits]
        stage = {"method": options.quantizer, "bits": bits, "group_size": group_size, "symmetric": True, "grid": grid,
                 "targets": by_bits[bits], "ignore": []}
        stages.append(stage)
    if embedding_bits is not None:
        stages.append({"method": "rtn", "bits": embedding_bits, "group_size": 32, "symmetric": True,
                       "targets": ["embed"], "ignore": []})
    return stages


def _plain(section: dict) -> dict:
    """A recipe section's scalar and list values (nested tables and unset values left out)."""
    return {k: v for k, v in section.items() if v is not None and not isinstance(v, dict) and not k.startswith("_")}


def allocation_recipe(stages: list[dict], recipe: dict | None) -> dict:
    """The recipe that runs ``stages`` in place of the ``mixed`` stage of ``recipe`` (its model,
    calibration, other stages, metrics and export format kept)."""
    recipe = recipe or {}
    out: dict = {}
    for section in ("model", "calibration"):
        if isinstance(recipe.get(section), dict):
            out[section] = _plain(recipe[section])
    before = [_plain(s) for s in recipe.get("stages", []) if s.get("method") != "mixed"]
    out["stages"] = before + stages
    if isinstance(recipe.get("evaluate"), dict) and recipe["evaluate"].get("metrics"):
        out["evaluate"] = {"metrics": recipe["evaluate"]["metrics"]}
    if isinstance(recipe.get("export"), dict):
        out["export"] = {k: v for k, v in _plain(recipe["export"]).items() if k in ("format", "path")}
    return out


# ----------------------------------------------------------------------------- the stage


def plan_allocation(model: nn.Module, options: MixedOptions, context) -> tuple[list[Item], list[int], str | None]:
    """Measure every targeted matrix and solve the knapsack: ``(items, chosen, embedding name)``."""
    architecture = context.architecture(model)
    linears = select_linears(model, options.targets, options.ignore)
    linears = {n: m for n, m in linears.items() if not isinstance(m, QuantizedEmbedding)}
    if not linears:
        raise PocketError("mixed: no linear matches targets/ignore", field="targets",
                          fix="name linears to allocate bits to, such as targets = ['*']")
    bad = [n for n, m in linears.items() if get_mask(m) is not None]
    if bad:
        raise PocketError(f"mixed: {bad[0]} carries a pruning mask; allocate bits before pruning is not supported",
                          fix="run mixed on a dense model")
    importance = measure_importance(model, list(linears), context)
    rules = context.plugins.grid_rules
    missing = sorted({g for b in options.bits for g in [(GGUF_STAGES if options.size_model == "gguf"
                                                         else GRID_STAGES)[b][1]] if g not in rules})
    if missing:
        raise PocketError(f"mixed: grid rule {missing[0]!r} is not installed", field="size_model",
                          fix="install pocketlm-gguf for the k-quant grids, or set size_model = 'grid'")
    items = []
    with context.progress.task("mixed: sensitivity", len(linears)) as advance:
        for name, module in linears.items():
            items.append(linear_item(name, linear_weight(module).float(), importance[name], options, rules))
            advance(1)
    embedding = None
    if options.embedding_bits:
        embedding = architecture.embed
        E = get_module(model, embedding).weight.data.float()
        items.append(embedding_item(embedding, E, context.calibration_windows(), options))
    budget = int(sum(item.params for item in items) * options.bits_per_weight / 8)
    smallest = sum(min(item.costs) for item in items)
    if smallest > budget:
        raise PocketError(f"mixed: bits_per_weight {options.bits_per_weight} is below the smallest allocation "
                          f"({8 * smallest / sum(i.params for i in items):.3f} bits per weight with these widths)",
                          field="bits_per_weight", fix="raise bits_per_weight or allow narrower bits")
    chosen = allocate([i.costs for i in items], [i.errors for i in items], budget, options.resolution)
    return items, chosen, embedding


def compress_mixed(model: nn.Module, options: MixedOptions, context) -> nn.Module:
    items, chosen, embedding = plan_allocation(model, options, context)
    stages = allocation_stages(items, chosen, options, embedding)
    total = sum(i.costs[c] for i, c in zip(items, chosen))
    params = sum(i.params for i in items)
    context.log(f"mixed: {len(items)} matrices, {8 * total / params:.3f} bits per weight "
                f"({total / 1e6:.2f} MB of {params * options.bits_per_weight / 8e6:.2f} MB budget); "
                + ", ".join(f"{len(s['targets']) if s['targets'] != ['embed'] else 'embedding'} at {s['bits']} bits"
                            for s in stages))
    if context.stage_dir is not None:
        from pocketlm.planner import to_toml

        recipe = allocation_recipe(stages, getattr(context, "recipe", None))
        path = Path(context.stage_dir) / "mixed-recipe.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(to_toml(recipe))
        context.log(f"mixed: the allocation as a recipe of {options.quantizer}/rtn stages: {path}")
    plugins = context.plugins
    for stage in stages:
        method = plugins.methods[stage["method"]]
        stage_options = method.options.model_validate({k: v for k, v in stage.items() if k != "method"})
        method.compress(model, stage_options, context)
    return model
