"""``pocketlm plan --evaluate K``: run candidates, then write the Pareto table, a plot and the
chosen recipe."""

from __future__ import annotations

import json
import time
from pathlib import Path

from . import atomic
from .planner import Candidate, PlanBudget, to_toml
from .errors import PocketError
from .recipe import parse_recipe


def pareto(points: list[dict]) -> list[dict]:
    """Points not dominated by another (smaller or equal size and perplexity, one strictly)."""
    front = []
    for p in points:
        dominated = any(q is not p and q["size_mb"] <= p["size_mb"] and q["perplexity"] <= p["perplexity"]
                        and (q["size_mb"] < p["size_mb"] or q["perplexity"] < p["perplexity"]) for q in points)
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


def plot(points: list[dict], path: Path, extra: list[dict] = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 6))
    front = pareto(points)
    axis.scatter([p["size_mb"] for p in points], [p["perplexity"] for p in points], label="pocketlm candidates")
    axis.plot([p["size_mb"] for p in front], [p["perplexity"] for p in front], "--", label="pocketlm Pareto front")
    for p in points:
        label = short_label(p["recipe"]) if "recipe" in p else p["label"][:40]
        axis.annotate(label, (p["size_mb"], p["perplexity"]), fontsize=7, xytext=(5, 4), textcoords="offset points")
    markers = "xv^<>sPD*"
    for number, p in enumerate(extra):
        axis.scatter([p["size_mb"]], [p["perplexity"]], marker=markers[number % len(markers)], color="red",
                     label=f"{p['label']}: {p['perplexity']:.2f}")
    axis.set_xlabel("export size on disk (MB, all files)")
    axis.set_ylabel("perplexity (lower is better)")
    axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    figure.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    figure.savefig(tmp, dpi=120)
    tmp.replace(path)
    plt.close(figure)


def evaluate_candidates(candidates: list[Candidate], model: str, plugins, out_dir: Path, budget: PlanBudget,
                        console, peers: list[dict] = ()) -> list[dict]:
    from .pipeline import Run

    out_dir = Path(out_dir)
    points = []
    baseline = None
    for number, candidate in enumerate(candidates, 1):
        export_format = "auto"  # the pipeline picks the packing format whose check accepts the model
        recipe_data = candidate.recipe(model, export_format)
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
        points.append({"label": candidate.label, "recipe": text, "export": chosen_format,
                       "size_mb": report["after"]["size_mb"], "perplexity": report["after"]["perplexity"],
                       "baseline_perplexity": (report["before"] or {}).get("perplexity", baseline),
                       "seconds": sum(s["seconds"] for s in report["stages"]),
                       "wall_seconds": time.perf_counter() - start})
        baseline = points[-1]["baseline_perplexity"]
    for point in points:
        if point["baseline_perplexity"]:
            point["retention"] = point["baseline_perplexity"] / point["perplexity"]
    eligible = [p for p in points if budget.min_retention is None or p.get("retention", 0) >= budget.min_retention]
    chosen = min(eligible, key=lambda p: (p["size_mb"], p["perplexity"])) if eligible else None
    front = pareto(points)
    lines = ["| candidate | export | size (MB) | perplexity | retention | seconds | Pareto |", "|---|---|---|---|---|---|---|"]
    for p in sorted(points, key=lambda p: p["size_mb"]):
        lines.append(f"| {p['label']} | {p['export']} | {p['size_mb']:.1f} | {p['perplexity']:.2f} | "
                     f"{p.get('retention', float('nan')):.3f} | {p['seconds']:.0f} | {'yes' if p in front else ''} |")
    atomic.write_text(out_dir / "pareto.md", "\n".join(lines) + "\n")
    atomic.write_json(out_dir / "pareto.json", points)
    plot(points, out_dir / "pareto.png", list(peers))
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
