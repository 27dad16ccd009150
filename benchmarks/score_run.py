"""Score a ``pocketlm run`` folder of the reference model on the recovery benchmark's two texts
(benchmarks/PROTOCOL.md, ``quick`` protocol), so that a recipe run with the CLI is measured as
``bench_recovery.py`` measures its rows:

* the last stage's checkpoint, on the 32 x 512 evaluation windows of WikiText-2 test and of the
  Python reference (the second domain: the Python Language Reference extract bundled with
  pocketlm-dynamic's tests, which no stage trains or calibrates on), perplexity and retention
  against the float model's row in ``docs/bench/raw/bench_recovery.jsonl``;
* the export folder: the bytes of every file, the GGUF file's tensor types, and whether each
  decoder matrix and the token embedding it holds equal the scored model bit for bit;
* each training stage (``qat``, ``distill``): the seconds of its optimizer steps alone (the sum of
  its ``loss.csv``), of the windows the original model wrote for it, and of the whole stage, and
  the tokens it trained on.

One row per call, appended to ``docs/bench/raw/recipe_runs.jsonl`` (``chart_recovery.py`` draws
it):

    pocketlm run docs/examples/recipes/smollm2-135m-80mb.toml --run-dir runs/smollm2-80mb
    python benchmarks/score_run.py runs/smollm2-80mb --name smollm2-135m-80mb.toml
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path

import bench_gguf
import bench_recovery
import common
from pocketlm.pipeline import stage_name

RESULTS = common.ROOT / "docs" / "bench" / "raw" / "recipe_runs.jsonl"
WROTE = re.compile(r"the teacher wrote (\d+) windows of \d+ tokens in (\d+) s")


def last_stage(run: Path, stages: list[dict]) -> Path:
    """The folder of the recipe's last stage, which the pipeline writes only when the stage is done."""
    folder = run / "stages" / stage_name(len(stages) - 1, stages[-1]["method"])
    if not (folder / "stage.json").is_file():
        raise SystemExit(f"{folder}: the recipe's last stage has not finished; run (or resume) the recipe first")
    return folder


def training(run: Path, stages: list[dict]) -> list[dict]:
    """Seconds and tokens of every training stage, from its work folder and the run's log."""
    log = (run / "run.log").read_text() if (run / "run.log").exists() else ""
    generated = [(int(count), int(seconds)) for count, seconds in WROTE.findall(log)]
    rows = []
    for index, stage in enumerate(stages):
        work = run / "stages" / (stage_name(index, stage["method"]) + ".work")
        if stage["method"] not in ("qat", "distill") or not work.is_dir():
            continue
        row = {"stage": index + 1, "method": stage["method"]}
        loss = work / "loss.csv"
        if loss.exists():
            with open(loss) as handle:
                steps = list(csv.DictReader(handle))
            row["steps"] = len(steps)
            row["step_seconds"] = round(sum(float(step["seconds"]) for step in steps), 1)
            row["tokens"] = int(steps[-1]["tokens"]) if steps else 0
        summary = work / f"{stage['method']}.json"
        if summary.exists():
            row["stage_seconds"] = round(json.loads(summary.read_text())["seconds"], 1)
        wanted = stage.get("e2e_generated_windows") or stage.get("generated_windows")
        wrote = [seconds for count, seconds in generated if count == wanted]
        if wanted and wrote:
            row["generated_windows"], row["generate_seconds"] = wanted, wrote[-1]
        rows.append(row)
    return rows


def open_run(description: str) -> tuple[argparse.Namespace, dict, Path]:
    """The command line (a run folder and ``--name``), the run's resolved recipe and its last
    stage's folder; one clear message for a folder that is not a finished run."""
    parser = argparse.ArgumentParser(description=description.split("\n\n")[0])
    parser.add_argument("run", help="the run folder (pocketlm run ... --run-dir RUN)")
    parser.add_argument("--name", required=True, help="the row's name, e.g. the recipe's file name")
    args = parser.parse_args()
    run = Path(args.run)
    if not (run / "recipe.resolved.json").is_file():
        raise SystemExit(f"{run}: not a pocketlm run folder (no recipe.resolved.json); give pocketlm run's --run-dir")
    common.setup_torch()
    resolved = json.loads((run / "recipe.resolved.json").read_text())
    return args, resolved, last_stage(run, resolved["recipe"]["stages"])


def main() -> None:
    from pocketlm import data
    from pocketlm.checkpoint import load_checkpoint

    args, resolved, stage = open_run(__doc__)
    run, recipe = Path(args.run), resolved["recipe"]
    model = load_checkpoint(stage).model
    model.eval()
    _, tokenizer = common.load_reference()
    texts = {"wikitext2": common.windows(tokenizer, "quick")[0],
             "python_reference": data.evaluation_windows(tokenizer, bench_recovery.SECOND_DOMAIN, 32, common.SEQ_LEN)}
    float32 = [row for row in map(json.loads, bench_recovery.RESULTS.read_text().splitlines())
               if row.get("row") == "float32"][-1]

    row: dict = {"row": args.name, "protocol": "quick", "eval_windows": 32, "seq_len": common.SEQ_LEN,
                 "calibration": recipe["calibration"], "stages": recipe["stages"], "scored": stage.name,
                 "core": resolved["provenance"]["core"], "plugins": resolved["provenance"]["plugins"]}
    for text, windows in texts.items():
        row[text] = round(common.perplexity(model, windows), 3)
        row[f"retention_{text}"] = round(float32[text] / row[text], 4)
    export = run / recipe["export"]["path"]
    gguf = sorted(export.glob("*.gguf"))
    if gguf:
        row.update(bench_gguf.compare_tensors(model, gguf[0]))
        row["embedding_bit_identical"] = bench_recovery.embedding_identical(model, gguf[0])
        row["tensor_types"] = bench_recovery.tensor_types(gguf[0])
    row["files"] = {p.name: p.stat().st_size for p in sorted(export.iterdir()) if p.is_file()}
    row["export_bytes"] = sum(row["files"].values())
    row["export_mb"] = round(row["export_bytes"] / 1e6, 2)
    row["training"] = training(run, recipe["stages"])
    bench_recovery.log(row)
    common.append_result(RESULTS, row)


if __name__ == "__main__":
    main()
