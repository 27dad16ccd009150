"""The planner's Pareto table on the reference model (issue: hybrid recipes).

Runs the planner's default hybrid plus the K best candidates under a size target through
`pocketlm plan --evaluate`'s machinery (quick protocol: 32 evaluation windows of 512 tokens,
32 calibration windows, seed 0), plots them with the peers' single-method results, and writes
docs/bench/plan.md and docs/bench/plan.png.

    python benchmarks/bench_plan.py --target-size-mb 100 --evaluate 3
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from rich.console import Console

from pocketlm.plan_eval import evaluate_candidates
from pocketlm.planner import DEFAULT_MODEL, PlanBudget, candidates, default_candidate
from pocketlm.plugins import get_plugins

ROOT = Path(__file__).resolve().parent.parent
# llm-compressor 0.14 on a machine of this kind, quick protocol (issue figures; see docs/benchmarks.md
# for the ones re-measured in this project's own side-by-side runs).
PEERS = [
    {"label": "llm-compressor RTN W4 g64", "size_mb": 173.0, "perplexity": 39.93},
    {"label": "llm-compressor GPTQ W4 g64", "size_mb": 173.0, "perplexity": 36.74},
    {"label": "llm-compressor AWQ W4 g64 asym", "size_mb": 173.0, "perplexity": 33.80},
]
GPTQ_RESULTS = ROOT / "docs" / "bench" / "gptq-results.jsonl"


def measured_peers() -> list[dict]:
    """llm-compressor rows this project measured itself (benchmarks/bench_gptq.py), latest per row."""
    latest = {}
    if GPTQ_RESULTS.exists():
        for line in GPTQ_RESULTS.read_text().splitlines():
            row = json.loads(line)
            if row.get("row", "").startswith("llmcompressor") and "perplexity" in row:
                latest[row["row"]] = row
    return [{"label": f"{name} (measured here)", "size_mb": row["checkpoint_mb"], "perplexity": row["perplexity"]}
            for name, row in latest.items()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target-size-mb", type=float, default=None)
    parser.add_argument("--evaluate", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "plan")
    args = parser.parse_args()
    console = Console()
    plugins = get_plugins()
    budget = PlanBudget(target_size_mb=args.target_size_mb)
    chosen = [default_candidate(plugins)]
    for candidate in candidates(plugins, budget=budget):
        if len(chosen) > args.evaluate:
            break
        if candidate.label not in {c.label for c in chosen}:
            chosen.append(candidate)
    peers = PEERS + measured_peers()
    points = evaluate_candidates(chosen, DEFAULT_MODEL, plugins, args.out, budget, console, peers)
    default = points[0]
    dominates = all(default["size_mb"] < p["size_mb"] and default["perplexity"] < p["perplexity"] for p in peers)
    docs = ROOT / "docs" / "bench"
    docs.mkdir(parents=True, exist_ok=True)
    shutil.copy(args.out / "pareto.png", docs / "plan.png")
    fp16_mb = 134_515_008 * 2 / 1e6
    lines = ["## Hybrid planner (pocketlm plan --evaluate)", "",
             f"Command: `python benchmarks/bench_plan.py --evaluate {args.evaluate}"
             + (f" --target-size-mb {args.target_size_mb:g}" if args.target_size_mb else "") + "`",
             "Settings: reference model SmolLM2-135M, quick protocol (32 eval windows x 512 tokens of WikiText-2 "
             "test; 32 calibration windows x 512 of WikiText-2 valid, random.Random(0)), seed 0, 2 CPU threads.", "",
             (args.out / "pareto.md").read_text(), "",
             f"Default hybrid: **{default['label']}**, {default['size_mb']:.1f} MB "
             f"({fp16_mb / default['size_mb']:.2f}x smaller than float16's {fp16_mb:.0f} MB), perplexity "
             f"{default['perplexity']:.2f}, retention {default.get('retention', float('nan')):.3f}. "
             f"Dominates every peer point (smaller and lower perplexity): {'yes' if dominates else 'no'}.", "",
             closest(points, fp16_mb), "",
             "Peers on the chart (red): " + "; ".join(f"{p['label']} {p['perplexity']:.2f} at {p['size_mb']:.0f} MB"
                                                       for p in peers)
             + " (the first three are the issue's figures, measured on a machine of this kind).", "",
             "![pareto](plan.png)", ""]
    (docs / "plan.md").write_text("\n".join(lines))
    (args.out / "summary.json").write_text(json.dumps({"points": points, "peers": peers}, indent=2))


def closest(points: list[dict], fp16_mb: float) -> str:
    """Where the measured points stand against the aim: 4x smaller than float16 at retention 0.9."""
    kept = [p for p in points if p.get("retention", 0) >= 0.9]
    small = min(kept, key=lambda p: p["size_mb"]) if kept else None
    best = max(points, key=lambda p: fp16_mb / p["size_mb"] * min(p.get("retention", 0) / 0.9, 1))
    text = "Aim: 4x smaller than float16 with retention >= 0.9. "
    if small:
        text += (f"Smallest point with retention >= 0.9: {small['label']}, {fp16_mb / small['size_mb']:.2f}x, "
                 f"retention {small['retention']:.3f}. ")
    return text + (f"Most compressed point weighed by retention: {best['label']}, {fp16_mb / best['size_mb']:.2f}x, "
                   f"retention {best.get('retention', float('nan')):.3f}.")


if __name__ == "__main__":
    main()
