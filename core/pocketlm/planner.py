"""The hybrid planner: compose recipes from whatever methods the installed plugins declare.

The planner knows no method. It reads each method's declarations — ``kind``, ``phase`` (the
canonical order: structured pruning, distillation, unstructured pruning, quantization),
``not_after``, ``exclusive``, its size ``effect`` and the option sets its ``plan`` proposes —
and builds every ordered combination that :func:`pocketlm.recipe.combination_problems`
accepts, with an estimated size. Installing or removing a plugin changes the candidates; the
core does not change.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field

from .components import Method, SizeEffect, unrepresented
from .recipe import combination_problems, rank_exporters

DEFAULT_MODEL = "demo:smollm2-135m"


@dataclass(frozen=True)
class PlanBudget:
    """What the user asked for; handed to each method's ``plan`` callable."""

    target_size_mb: float | None = None
    target_bits: float | None = None
    min_retention: float | None = None


@dataclass(frozen=True)
class ModelStats:
    """Parameter counts the size estimate needs: decoder linears, token embedding (and a tied
    head, counted once), everything else (norms, biases, an untied head)."""

    decoder: int
    embedding: int
    other: int
    encoder: bool = False  # a sentence encoder: measured by retrieval, not perplexity

    @property
    def total(self) -> int:
        return self.decoder + self.embedding + self.other


# SmolLM2-135M, the demo model: lets `pocketlm plan` list candidates without loading it.
DEMO_STATS = ModelStats(decoder=106_168_320, embedding=28_311_552, other=35_136)


def model_stats(model, architecture) -> ModelStats:
    from .modules import decoder_layers, get_module
    from .weights import is_linear

    decoder = sum(p.numel() for layer in decoder_layers(model, architecture) for m in layer.modules()
                  if is_linear(m) for p in m.parameters(recurse=False) if p.dim() == 2)
    embedding = get_module(model, architecture.embed).weight.numel()
    seen, total = set(), 0
    for parameter in model.parameters():
        if parameter.data_ptr() not in seen:
            seen.add(parameter.data_ptr())
            total += parameter.numel()
    return ModelStats(decoder, embedding, total - decoder - embedding, bool(getattr(architecture, "encoder", False)))


@dataclass
class Candidate:
    stages: list[tuple[Method, dict]]
    effects: list[SizeEffect]
    size_mb: float
    bits: float
    measured: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        if not self.stages:
            return "baseline"
        return " → ".join(_stage_label(m, o) for m, o in self.stages)

    def features(self) -> set[str]:
        return {f for effect in self.effects for f in effect.features}

    def recipe(self, model: str, export_format: str = "hf", metric: str = "perplexity") -> dict:
        return {"model": {"source": model},
                "stages": [{"method": m.name, **o} for m, o in self.stages],
                "evaluate": {"metrics": [metric, "size"]},
                "export": {"format": export_format, "path": "export"}}


def choose_exporter(plugins, candidate: "Candidate") -> str:
    """The format a candidate would be exported in, before its model exists to check."""
    return rank_exporters(plugins.exporters, candidate.features())[0].name


def _packs(plugins, effects: list[SizeEffect]) -> frozenset[str] | None:
    """What the format ``format = "auto"`` would choose for these effects stores compactly."""
    # Run-time thresholds add no weight bytes: the exporter that keeps them writes the weights in
    # the format that would be chosen without them.
    ranked = rank_exporters(plugins.exporters, {f for e in effects for f in e.features} - {"thresholds"})
    return frozenset(ranked[0].packs) if ranked else None


def damage(stats: ModelStats, effects: list[SizeEffect]) -> float:
    """A prior on how much quality a candidate gives up, from its declared effects alone (the
    planner knows no method, so no method-specific knowledge goes in): rounding error grows about
    4x per bit removed (a 4-bit grid scores 1 per weight it covers, 8-bit 1/16), zeroing weights
    costs in proportion to sparsity, removing parameters twice that. Weighted by the fraction of
    the model each effect covers; a stage that ``recovers`` wins back that share of what came
    before it. Only the order matters; ``--evaluate`` measures the truth."""
    total = stats.decoder + stats.embedding
    share = {"decoder": stats.decoder / total, "embedding": stats.embedding / total, "all": 1.0}
    score = 0.0
    for effect in effects:
        weight = share[effect.covers]
        if effect.bits is not None:
            score += weight * 4.0 ** (4 - min(effect.bits, 16))
        if effect.sparsity:
            score += weight * 4 * effect.sparsity
        score += 8 * effect.params_removed * share["decoder"]
        score *= 1 - min(max(effect.recovers, 0.0), 1.0)
    return score


def _stage_label(method: Method, options: dict) -> str:
    shown = ", ".join(f"{k}={v}" for k, v in options.items())
    return f"{method.name}({shown})"


def estimate(stats: ModelStats, effects: list[SizeEffect], packs: frozenset[str] | None = None) -> tuple[float, float]:
    """(size in MB, mean bits per weight) after the effects, dense weights in float16. ``packs``
    is what the export format stores compactly (None: everything); a quantized embedding that
    the format cannot pack is counted at float16, as it will be written."""
    decoder_bits, embedding_bits, kept = 16.0, 16.0, 1.0
    embedding_packed = packs is None or "quantized-embedding" in packs
    for effect in effects:
        kept *= 1 - effect.params_removed
        if effect.bits is not None:
            if effect.covers in ("decoder", "all"):
                decoder_bits = min(decoder_bits, effect.bits)
            if effect.covers in ("embedding", "all") and embedding_packed:
                embedding_bits = min(embedding_bits, effect.bits)
    bits = stats.decoder * kept * decoder_bits + stats.embedding * embedding_bits + stats.other * 16
    params = stats.decoder * kept + stats.embedding + stats.other
    return bits / 8 / 1e6, bits / params


def candidates(plugins, stats: ModelStats = DEMO_STATS, budget: PlanBudget = PlanBudget(),
               exporter: str = "hf", max_stages: int = 3) -> list[Candidate]:
    """Every valid ordered combination of the installed methods' proposals, smallest first,
    filtered by the size or bits target."""
    proposals: list[tuple[Method, dict]] = []
    for method in sorted(plugins.methods.values(), key=lambda m: (m.phase, m.name)):
        if method.plan is None:
            continue
        for options in method.plan(budget):
            proposals.append((method, {k: v for k, v in options.items() if k != "default"}))
    export = plugins.exporters.get(exporter)
    found: list[Candidate] = []
    for count in range(1, max_stages + 1):
        for combo in itertools.combinations(proposals, count):
            ordered = sorted(combo, key=lambda pair: pair[0].phase)
            if not _one_per_phase(ordered):
                continue
            try:
                pairs = [(m, m.options.model_validate(o)) for m, o in ordered]
            except Exception:  # noqa: BLE001 - a proposal that does not validate is not a candidate
                continue
            effects = [m.effect(o) for m, o in pairs]
            if combination_problems(pairs, _fitting(plugins, export, effects)):
                continue
            size_mb, bits = estimate(stats, effects, _packs(plugins, effects))
            found.append(Candidate(list(ordered), effects, size_mb, bits))
    if budget.target_size_mb is not None:
        found = [c for c in found if c.size_mb <= budget.target_size_mb]
    if budget.target_bits is not None:
        found = [c for c in found if c.bits <= budget.target_bits]
    if budget.target_size_mb is not None or budget.target_bits is not None:
        # Under a budget the best candidates are those that fit and give up the least quality
        # by the effects' prior; then the largest (least compressed), then fewer stages.
        return sorted(found, key=lambda c: (round(damage(stats, c.effects), 3), -c.size_mb, len(c.stages), c.label))
    return sorted(found, key=lambda c: (c.size_mb, len(c.stages), c.label))


def _fitting(plugins, export, effects: list[SizeEffect]):
    """``export``, or where it cannot represent the effects' features (run-time thresholds) the
    installed format that ``format = "auto"`` would choose; None when none can."""
    features = {f for e in effects for f in e.features}
    if export is not None and not unrepresented(features, export.represents):
        return export
    ranked = rank_exporters(plugins.exporters, features)
    return ranked[0] if ranked else export


def _one_per_phase(stages: list[tuple[Method, dict]]) -> bool:
    """A hybrid takes at most one step per phase and part of the model: two pruners in a row
    or two proposals of one quantizer add nothing a single stronger option would not. Steps of
    one phase that cover different parts (decoder linears, embedding) may combine."""
    seen = set()
    for method, options in stages:
        try:
            covers = method.effect(method.options.model_validate(options)).covers
        except Exception:  # noqa: BLE001 - invalid proposals are dropped later
            covers = "decoder"
        parts = {"decoder", "embedding"} if covers == "all" else {covers}
        keys = {(method.phase, part) for part in parts}
        if keys & seen:
            return False
        seen |= keys
    return True


def default_candidate(plugins, stats: ModelStats = DEMO_STATS) -> Candidate | None:
    """The default hybrid: among candidates whose stages every plugin marks as safe defaults
    (a proposal with ``"default": True`` is stripped of that key and preferred), the
    smallest; with no such marks, the smallest candidate with at most two stages."""
    pool = []
    for method in plugins.methods.values():
        if method.plan is None:
            continue
        for options in method.plan(PlanBudget()):
            if options.get("default"):
                pool.append((method, {k: v for k, v in options.items() if k != "default"}))
    if pool:
        pairs = sorted(pool, key=lambda p: p[0].phase)
        validated = [(m, m.options.model_validate(o)) for m, o in pairs]
        if not combination_problems(validated, plugins.exporters.get("hf")):
            effects = [m.effect(o) for m, o in validated]
            size_mb, bits = estimate(stats, effects, _packs(plugins, effects))
            return Candidate(pairs, effects, size_mb, bits)
    options = [c for c in candidates(plugins, stats) if len(c.stages) <= 2]
    return options[-1] if options else None  # the gentlest: the largest of the short candidates


def to_toml(recipe: dict) -> str:
    lines: list[str] = []

    def value(v):
        return json.dumps(v) if not isinstance(v, bool) else ("true" if v else "false")

    for section in ("model", "calibration"):
        if section in recipe:
            lines.append(f"[{section}]")
            lines += [f"{k} = {value(v)}" for k, v in recipe[section].items()]
            lines.append("")
    for stage in recipe.get("stages", []):
        lines.append("[[stages]]")
        lines += [f"{k} = {value(v)}" for k, v in stage.items()]
        lines.append("")
    for section in ("evaluate", "export"):
        if section in recipe:
            lines.append(f"[{section}]")
            lines += [f"{k} = {value(v)}" for k, v in recipe[section].items()]
            lines.append("")
    return "\n".join(lines)


def stats_of(model: str, plugins) -> ModelStats:
    """The parameter counts of the model ``model`` names (loaded once)."""
    from .context import Context

    context = Context(plugins=plugins)
    loaded = plugins.hook.load_model(source=model, options=None, context=context)
    return model_stats(loaded.model, context.architecture(loaded.model))


def default_recipe_text(plugins, model: str = DEFAULT_MODEL) -> str:
    candidate = default_candidate(plugins)
    recipe = candidate.recipe(model, "auto") if candidate else {
        "model": {"source": model}, "evaluate": {"metrics": ["perplexity", "size"]},
        "export": {"format": "hf", "path": "export"}}
    return to_toml(recipe)
