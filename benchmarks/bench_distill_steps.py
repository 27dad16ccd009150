"""Seconds per `distill` step of the 3-layer MiniLM student, by length grouping and precision.

Runs the first two stages of docs/examples/recipes/minilm-hybrid-3layers.toml (prune-depth, then
distill on WikiText-2 validation pairs, every sentence a query, 32 texts a step) for a few steps
in each setting and prints the median seconds of a step after the first three. Settings: the
micro-batch as one forward pass padded to its longest (`--groups 1`, as pocketlm-distill 0.11.0
ran it) or as up to four passes of texts of similar length (pocketlm-distill 0.12.0's default);
float32 or bf16 autocast; texts of at most 128 or 256 tokens.

    flock /tmp/pocketlm-bench.lock .venv/bin/python benchmarks/bench_distill_steps.py
    .venv/bin/python benchmarks/bench_distill_steps.py --steps 25 --groups 1,4 --precision no,bf16 --seq-len 128
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import shutil
import statistics
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "docs" / "examples" / "recipes" / "minilm-hybrid-3layers.toml"


def step_seconds(groups: int, precision: str, seq_len: int, steps: int) -> list[float]:
    """Seconds of each step of a short run of the recipe's prune-depth and distill stages."""
    from pocketlm import api

    trainer_module = importlib.import_module("pocketlm_distill.distill")  # the package's `distill` is the function
    trainer_module.LENGTH_GROUPS = groups
    recipe = tomllib.loads(RECIPE.read_text(encoding="utf-8"))
    recipe["stages"] = recipe["stages"][:2]
    recipe["stages"][1].update(steps=steps, seq_len=seq_len, checkpoint_every=0, mixed_precision=precision)
    recipe.pop("export")
    recipe["evaluate"] = {"metrics": ["size"], "before": False}
    seconds = []
    step = trainer_module.Trainer.step

    def timed(self, index):
        row = step(self, index)
        seconds.append(row["seconds"])
        return row

    trainer_module.Trainer.step = timed
    run_dir = Path(tempfile.mkdtemp(prefix="distill-steps-"))
    try:
        api.run(recipe, run_dir=run_dir / "run")
    finally:
        trainer_module.Trainer.step = step
        shutil.rmtree(run_dir, ignore_errors=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--groups", default="1,4", help="comma-separated LENGTH_GROUPS values")
    parser.add_argument("--precision", default="no,bf16", help="comma-separated mixed_precision values")
    parser.add_argument("--seq-len", default="128,256", help="comma-separated maximum text lengths")
    args = parser.parse_args()
    print("| texts of at most | precision | forward passes a micro-batch | median s/step |")
    print("| --- | --- | --- | --- |")
    for seq_len, precision, groups in itertools.product(
            [int(v) for v in args.seq_len.split(",")], args.precision.split(","),
            [int(v) for v in args.groups.split(",")]):
        seconds = step_seconds(groups, precision, seq_len, args.steps)[3:]
        passes = "one, padded to the longest" if groups == 1 else f"up to {groups}, by length"
        print(f"| {seq_len} tokens | {'float32' if precision == 'no' else precision} | {passes} | "
              f"{statistics.median(seconds):.2f} |", flush=True)


if __name__ == "__main__":
    main()
