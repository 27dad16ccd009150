"""``pocketlm plan --evaluate K``: run candidates, then write the Pareto table, a plot and the
chosen recipe."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from . import atomic
from .planner import Candidate, PlanBudget, to_toml
from .errors import PocketError
from .recipe import parse_recipe


@dataclass(frozen=True)
class Quality:
    """What a plan measures candidates by: the recipe metric, the report key it writes, and its
    direction. Retention is always "share of the original kept" (1 = as good)."""

    metric: str
    key: str
    higher_is_better: bool
    name: str

    def retention(self, before: float, after: float) -> float:
        return after / before if self.higher_is_better else before / after

    def loss(self, value: float) -> float:
        return -value if self.higher_is_better else value


PERPLEXITY = Quality("perplexity", "perplexity", False, "perplexity")
RETRIEVAL = Quality("retrieval", "mrr_at_10", True, "retrieval MRR@10")


def quality_of(stats) -> Quality:
    """Perplexity for a causal LM; for a sentence encoder, which predicts no tokens, retrieval."""
    return RETRIEVAL if getattr(stats, "encoder", False) else PERPLEXITY


def pareto(points: list[dict], quality: Quality = PERPLEXITY) -> list[dict]:
    """Points not dominated by another (smaller or equal size and no worse quality, one strictly)."""
    def loss(p):
        return quality.loss(p[quality.key])

    front = []
    for p in points:
        dominated = any(q is not p and q["size_mb"] <= p["size_mb"] and loss(q) <= loss(p)
                        and (q["size_mb"] < p["size_mb"] or loss(q) < loss(p)) for q in points)
        if not dominated:
            front.append(p)
    return sorted(front, key=lambda p: p["size_mb"])


def short_label(recipe_text: str) -> str:
    """``a 8/32/[embed] → b 4/32``: each stage's method name and option values, for a chart."""
    from .recipe import tomllib

    stages = tomllib.loads(recipe_text).get("stages", [])
    parts = []
    for stage in stages:
        values = [("[" + ",".join(map(str, v)) + "]") if isinstance(v, list) else str(v)
                  for k, v in stage.items() if k != "method" and (not isinstance(v, list) or v)]
        parts.append(" ".join([stage["method"], "/".join(values)]).strip())
    return " → ".join(parts) or "baseline"


def plot(points: list[dict], path: Path, extra: list[dict] = (), quality: Quality = PERPLEXITY) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 6))
    key = quality.key
    front = pareto(points, quality)
    axis.scatter([p["size_mb"] for p in points], [p[key] for p in points], label="pocketlm candidates")
    axis.plot([p["size_mb"] for p in front], [p[key] for p in front], "--", label="pocketlm Pareto front")
    for p in points:
        label = short_label(p["recipe"]) if "recipe" in p else p["label"][:40]
        axis.annotate(label, (p["size_mb"], p[key]), fontsize=7, xytext=(5, 4), textcoords="offset points")
    markers = "xv^<>sPD*"
    for number, p in enumerate(extra):
        axis.scatter([p["size_mb"]], [p[key]], marker=markers[number % len(markers)], color="red",
                     label=f"{p['label']}: {p[key]:.3g}")
    axis.set_xlabel("export size on disk (MB, all files)")
    axis.set_ylabel(f"{quality.name} ({'higher' if quality.higher_is_better else 'lower'} is better)")
    axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    figure.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    figure.savefig(tmp, dpi=120)
    tmp.replace(path)
    plt.close(figure)


def evaluate_candidates(candidates: list[Candidate], model: str, plugins, out_dir: Path, budget: PlanBudget,
                        console, peers: list[dict] = (), quality: Quality = PERPLEXITY) -> list[dict]:
    """Run each candidate, measure its size and ``quality`` (perplexity, or retrieval for an
    encoder: :func:`quality_of`), and write the Pareto table, plot and chosen recipe."""
    from .pipeline import Run
    from .rundir import claim_plan_folder

    out_dir = Path(out_dir)
    claim_plan_folder(out_dir)
    points = []
    baseline = None
    for number, candidate in enumerate(candidates, 1):
        export_format = "auto"  # the pipeline picks the packing format whose check accepts the model
        recipe_data = candidate.recipe(model, export_format, quality.metric)
        recipe_data["evaluate"]["before"] = baseline is None  # the baseline is measured once
        text = to_toml(recipe_data)
        recipe = parse_recipe(text, plugins, file=f"<candidate {number}>")
        console.print(f"[{number}/{len(candidates)}] {candidate.label} → {export_format}")
        start = time.perf_counter()
        try:
            report = Run(recipe, out_dir / f"candidate-{number}", plugins, resume=True,
                         echo=lambda m: None).execute()
        except PocketError as exc:  # a format check the estimate could not foresee
            console.print(f"  skipped: {exc}")
            continue
        chosen_format = report.get("export_format") or export_format
        key = quality.key
        points.append({"label": candidate.label, "recipe": text, "export": chosen_format,
                       "size_mb": report["after"]["size_mb"], key: report["after"][key],
                       f"baseline_{key}": (report["before"] or {}).get(key, baseline),
                       "seconds": sum(s["seconds"] for s in report["stages"]),
                       "wall_seconds": time.perf_counter() - start})
        baseline = points[-1][f"baseline_{key}"]
    for point in points:
        if point[f"baseline_{quality.key}"]:
            point["retention"] = quality.retention(point[f"baseline_{quality.key}"], point[quality.key])
    eligible = [p for p in points if budget.min_retention is None or p.get("retention", 0) >= budget.min_retention]
    chosen = min(eligible, key=lambda p: (p["size_mb"], quality.loss(p[quality.key]))) if eligible else None
    front = pareto(points, quality)
    lines = [f"| candidate | export | size (MB) | {quality.name} | retention | seconds | Pareto |",
             "|---|---|---|---|---|---|---|"]
    for p in sorted(points, key=lambda p: p["size_mb"]):
        lines.append(f"| {p['label']} | {p['export']} | {p['size_mb']:.1f} | {p[quality.key]:.{2 if quality is PERPLEXITY else 3}f} | "
                     f"{p.get('retention', float('nan')):.3f} | {p['seconds']:.0f} | {'yes' if p in front else ''} |")
    atomic.write_text(out_dir / "pareto.md", "\n".join(lines) + "\n")
    atomic.write_json(out_dir / "pareto.json", points)
    plot(points, out_dir / "pareto.png", list(peers), quality)
    console.print("\n".join(lines))
    if chosen is None:
        (out_dir / "chosen.toml").unlink(missing_ok=True)  # an earlier plan's choice would mislead
        best = max(points, key=lambda p: p.get("retention", 0), default=None)
        console.print(f"warning: no candidate meets --min-retention {budget.min_retention}"
                      + (f" (best: {best['label']}, retention {best.get('retention', 0):.3f})" if best else "")
                      + f"; no recipe chosen. plot: {out_dir / 'pareto.png'}")
        return points
    atomic.write_text(out_dir / "chosen.toml", chosen["recipe"])
    console.print(f"chosen: {chosen['label']} → {out_dir / 'chosen.toml'}; plot: {out_dir / 'pareto.png'}")
    return points
