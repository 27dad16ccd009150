"""The size/perplexity front of the reference model's GGUF exports, from the benchmarks' raw rows:
pocketlm's post-training grids and its `qat` recovery against the first wave's planner front,
llama.cpp's own quantizer (with and without an importance matrix) and llm-compressor.

    python benchmarks/chart_recovery.py

Reads ``docs/bench/raw/bench_recovery.jsonl`` (bench_recovery.py), ``docs/bench/raw/recipe_runs.jsonl``
(recipes run with ``pocketlm run``, scored by score_run.py), ``docs/bench/raw/kquants.jsonl``
(bench_kquants.py), ``docs/bench/raw/plan/pareto.json`` (bench_plan.py) and
``docs/bench/gptq-results.jsonl`` (bench_gptq.py's llm-compressor rows); writes
``docs/bench/recovery-front.md`` and ``docs/bench/recovery-front.png``. Measures nothing itself:
every point is a row one of those benchmarks measured (quick protocol: WikiText-2 test, 32 x 512
windows, perplexity computed by the same code on the same tokens for every runtime's weights).
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RAW = ROOT / "docs" / "bench" / "raw"
OUT_MD = ROOT / "docs" / "bench" / "recovery-front.md"
OUT_PNG = ROOT / "docs" / "bench" / "recovery-front.png"
FLOAT32_PERPLEXITY = 28.142
FLOAT16_MB = 134_515_008 * 2 / 1e6
TARGET_MB, TARGET_RETENTION = 80.0, 0.95
STYLE = {"first wave (planner)": ("tab:gray", "s"), "pocketlm post-training": ("tab:blue", "o"),
         "pocketlm + qat": ("tab:green", "D"), "pocketlm recipe (pocketlm run)": ("tab:purple", "*"),
         "llama.cpp": ("tab:orange", "^"), "llm-compressor": ("tab:red", "v")}


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def latest(points: list[dict]) -> list[dict]:
    """One point per label, the last measured (a row measured again replaces the earlier one)."""
    return list({point["label"]: point for point in points}.values())


def recovery_points() -> list[dict]:
    points = []
    for row in rows(RAW / "bench_recovery.jsonl"):
        if "export_bytes" not in row:
            continue
        trained = any(stage["method"] in ("qat", "distill") for stage in row["stages"])
        points.append({"family": "pocketlm + qat" if trained else "pocketlm post-training",
                       "label": row["row"] + _qat_settings(row), "size_mb": row["export_bytes"] / 1e6,
                       "perplexity": row["wikitext2"], "second_domain": row.get("retention_python_reference"),
                       "types": row.get("tensor_types", {})})
    return latest(points)


def recipe_points() -> list[dict]:
    return latest([{"family": "pocketlm recipe (pocketlm run)", "label": row["row"], "size_mb": row["export_bytes"] / 1e6,
                    "perplexity": row["wikitext2"], "second_domain": row.get("retention_python_reference"),
                    "types": row.get("tensor_types", {})} for row in rows(RAW / "recipe_runs.jsonl")])


def _qat_settings(row: dict) -> str:
    """The training stages of a row, their options' defaults filled in (qat's block phase: 2 epochs at
    lr 1e-4; its end-to-end phase: e2e_lr 2e-5; distill: lr 1e-4), e.g. " (block 2 ep @ 5e-4; e2e 64 @ 1e-4)"."""
    phases = []
    for stage in row["stages"]:
        if stage["method"] == "distill":
            phases.append(f"ste {stage['steps']} @ {stage.get('lr', 1e-4):g}")
        if stage["method"] != "qat":
            continue
        if stage.get("epochs", 2):
            phases.append(f"block {stage.get('epochs', 2)} ep @ {stage.get('lr', 1e-4):g}")
        if stage.get("e2e_steps"):
            phases.append(f"e2e {stage['e2e_steps']} @ {stage.get('e2e_lr', 2e-5):g}")
    return f" ({'; '.join(phases)})" if phases else ""


def kquant_points() -> list[dict]:
    points = []
    for row in rows(RAW / "kquants.jsonl"):
        part = row.get("part", "")
        if part.startswith("llamacpp-") and "perplexity" in row:
            name = part.removeprefix("llamacpp-")   # llama.cpp's type name, e.g. "q4_k_m-imatrix"
            label = name.removesuffix("-imatrix").upper() + (" + imatrix" if name.endswith("-imatrix") else "")
            points.append({"family": "llama.cpp", "label": label,
                           "size_mb": row["file_bytes"] / 1e6, "perplexity": row["perplexity"],
                           "types": row.get("tensor_types", {})})
        elif part.startswith("gptq-") and "in_memory_perplexity" in row:
            points.append({"family": "pocketlm post-training", "label": part, "size_mb": row["file_bytes"] / 1e6,
                           "perplexity": row["in_memory_perplexity"], "types": row.get("tensor_types", {})})
    return latest(points)


def planner_points() -> list[dict]:
    path = RAW / "plan" / "pareto.json"
    front = json.loads(path.read_text()) if path.exists() else []
    return [{"family": "first wave (planner)", "label": point["label"], "size_mb": point["size_mb"],
             "perplexity": point["perplexity"]} for point in front]


def llmcompressor_points() -> list[dict]:
    points = [{"family": "llm-compressor", "label": row["row"].removeprefix("llmcompressor-"),
               "size_mb": row["checkpoint_mb"], "perplexity": row["perplexity"]}
              for row in rows(ROOT / "docs" / "bench" / "gptq-results.jsonl")
              if row.get("row", "").startswith("llmcompressor") and "perplexity" in row]
    return latest(points)


def front(points: list[dict]) -> list[dict]:
    """The points no other point of the list beats on both size and perplexity, smallest first."""
    def size(point: dict) -> float:   # files a few bytes of metadata apart are the same size
        return round(point["size_mb"], 1)

    kept = [p for p in points if not any(size(q) <= size(p) and q["perplexity"] < p["perplexity"]
                                         or size(q) < size(p) and q["perplexity"] <= p["perplexity"]
                                         for q in points)]
    return sorted(kept, key=lambda p: p["size_mb"])


def table(points: list[dict]) -> str:
    lines = ["| family | point | GGUF MB | WikiText-2 ppl | retention | second domain retention |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for p in sorted(points, key=lambda p: (p["family"], p["size_mb"])):
        second = f"{p['second_domain']:.4f}" if p.get("second_domain") is not None else "-"
        lines.append(f"| {p['family']} | {p['label']} | {p['size_mb']:.1f} | {p['perplexity']:.3f} | "
                     f"{FLOAT32_PERPLEXITY / p['perplexity']:.3f} | {second} |")
    return "\n".join(lines)


def chart(families: dict[str, list[dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(10, 5.5))
    for family, points in families.items():
        if not points:
            continue
        color, marker = STYLE[family]
        axis.scatter([p["size_mb"] for p in points], [p["perplexity"] for p in points], color=color, marker=marker,
                     label=family, zorder=3)
        line = front(points)
        axis.plot([p["size_mb"] for p in line], [p["perplexity"] for p in line], color=color, alpha=0.5, zorder=2)
    axis.axhline(FLOAT32_PERPLEXITY, color="black", linewidth=0.8, linestyle=":", label="float32 (28.14)")
    axis.axhline(FLOAT32_PERPLEXITY / TARGET_RETENTION, color="tab:green", linewidth=0.8, linestyle="--",
                 label=f"retention {TARGET_RETENTION}")
    axis.axvline(TARGET_MB, color="tab:green", linewidth=0.8, linestyle="--", label=f"{TARGET_MB:.0f} MB")
    axis.set_xlabel("export size (MB, every file)")
    axis.set_ylabel("WikiText-2 test perplexity (quick protocol)")
    axis.set_ylim(27, 40)   # the 10x points (53 MB, perplexity 86 and more) are listed under the chart
    axis.set_xlim(70, 185)
    axis.set_title("SmolLM2-135M: size against perplexity (lower left is better)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    figure.savefig(OUT_PNG, dpi=110)


def main() -> None:
    every = planner_points() + latest(recovery_points() + kquant_points()) + recipe_points() + llmcompressor_points()
    families = {family: [p for p in every if p["family"] == family] for family in STYLE}
    chart(families)
    new_front = front([p for p in every if p["family"].startswith("pocketlm")])
    off_chart = [p for p in every if p["perplexity"] > 40 or p["size_mb"] < 70]
    lines = ["# The size/perplexity front (issue: hybrid recovery)", "",
             "Generated by `python benchmarks/chart_recovery.py` from the raw rows of `bench_recovery.py`, "
             "`score_run.py` (recipes run with `pocketlm run`), `bench_kquants.py`, `bench_plan.py` and "
             "`bench_gptq.py` (quick protocol; WikiText-2 test perplexity "
             "over 32 x 512 windows, the same code and tokens for every point; sizes are the bytes of every file of "
             "the export: GGUF for pocketlm, the planner and llama.cpp, compressed-tensors safetensors for "
             "llm-compressor). Retention = 28.142 / perplexity; the second domain (the Python Language Reference "
             "extract) is measured by `bench_recovery.py` and `score_run.py` only.", "",
             "Point names are the benchmarks' rows: `gptq` is GPTQ W4 g32 `weighted-mse` with the tied embedding "
             "4-bit (every matrix Q4_0), rounded; `gptq-wB-embedE` GPTQ at B bits with the embedding `rtn` E-bit "
             "(Q8_0 at 8); `gptq-solved-head...` the same with the embedding solved as the head by `gptq` "
             "(pocketlm-gptq 0.6.0); "
             "`qat...` rows start from `gptq`, `X-qat...` from X; `width-704-` removes MLP channels first; "
             "`mixed-B` is pocketlm-mixed's allocation at B bits per weight; `distill-ste` trains the weights "
             "through a straight-through estimator on their fixed grids; the training in brackets "
             "(ste: `distill` steps @ lr; block: `qat` epochs @ lr; e2e: `qat` steps @ e2e_lr). `gptq-q4k*`, `gptq-minmax` and `gptq-weighted` are "
             "`bench_kquants.py` parts (the last two keep the embedding float16).", "",
             "![front](recovery-front.png)", "",
             "pocketlm's new front (post-training grids and `qat`, no point beaten on both size and perplexity):", "",
             table(new_front), "", "Every point:", "", table(every), ""]
    if off_chart:
        lines += ["Off the chart (perplexity above 40 or under 70 MB): " + "; ".join(
            f"{p['label']} {p['perplexity']:.1f} at {p['size_mb']:.1f} MB" for p in off_chart) + ".", ""]
    OUT_MD.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
