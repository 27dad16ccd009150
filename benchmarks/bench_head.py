"""The tied token embedding of the reference model quantized by pocketlm-gptq's ``gptq`` stage,
rounded (``head = "round"``) against solved as the output head (``head = "solve"``), with every
decoder matrix left in float (benchmarks/PROTOCOL.md, ``quick`` protocol).

The stage is the one a recipe runs: ``gptq`` with ``targets = ["embed"]``, 4 bits, group 32,
``grid = "weighted-mse"``, on the 32 calibration windows. Each result is one matrix used twice
(the lookup table and the head); to see which use costs what, the quantized matrix is also put
in one place only, the other keeping the float weights:

* ``tied``: both uses quantized (what the model and its GGUF file hold);
* ``lookup only``: the embedding quantized, the head float;
* ``head only``: the head quantized, the embedding float.

Perplexity on the first 32 x 512 windows of WikiText-2 test and of the Python reference extract
(which no stage calibrates on); retention = float perplexity / perplexity.

Usage (about 10 minutes on 2 cores):
  flock /tmp/pocketlm-bench.lock nice -n 5 .venv/bin/python benchmarks/bench_head.py [--damp 0.01]
Rows are appended to docs/bench/raw/bench_head.jsonl.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_recovery  # noqa: E402
import common  # noqa: E402

RESULTS = common.ROOT / "docs" / "bench" / "raw" / "bench_head.jsonl"


def with_matrices(model, lookup: torch.Tensor, head: torch.Tensor):
    """A float copy of ``model`` whose embedding reads ``lookup`` and whose head reads ``head``."""
    copied = copy.deepcopy(model)
    copied.model.embed_tokens.weight = torch.nn.Parameter(lookup.clone(), requires_grad=False)
    copied.lm_head.weight = torch.nn.Parameter(head.clone(), requires_grad=False)
    return copied


def main() -> None:
    from pocketlm import data
    from pocketlm.plugins import get_plugins
    from pocketlm.testing import make_context

    parser = argparse.ArgumentParser()
    parser.add_argument("--damp", type=float, default=0.01)
    args = parser.parse_args()
    common.setup_torch()
    model, tokenizer = common.load_reference()
    evaluation, calibration = common.windows(tokenizer, "quick")
    texts = {"wikitext2": evaluation,
             "python_reference": data.evaluation_windows(tokenizer, bench_recovery.SECOND_DOMAIN, 32, common.SEQ_LEN)}
    reference = {name: common.perplexity(model, windows) for name, windows in texts.items()}
    bench_recovery.log({"row": "float32", **{k: round(v, 3) for k, v in reference.items()}})
    E = model.model.embed_tokens.weight.detach().clone()
    plugins = get_plugins()
    gptq = plugins.methods["gptq"]
    for head in ("round", "solve"):
        options = gptq.options(bits=4, group_size=32, grid="weighted-mse", targets=["embed"], ignore=[], head=head,
                               damp=args.damp)
        quantized = copy.deepcopy(model)
        with common.Timer() as timer, torch.no_grad():
            gptq.compress(quantized, options, make_context(calibration, tokenizer=tokenizer, plugins=plugins))
        Q = quantized.model.embed_tokens.dequantize()
        for use, (lookup, output) in {"tied": (Q, Q), "lookup only": (Q, E), "head only": (E, Q)}.items():
            measured = with_matrices(model, lookup, output) if use != "tied" else quantized
            row = {"row": f"embedding 4-bit g32, {head}, {use}", "head": head, "quantized": use, "damp": args.damp,
                   "protocol": "quick", "eval_windows": 32, "calib_windows": 32, "seq_len": common.SEQ_LEN,
                   "seed": 0, "stage_seconds": round(timer.seconds, 1)}
            for name, windows in texts.items():
                row[name] = round(common.perplexity(measured, windows), 3)
                row[f"retention_{name}"] = round(reference[name] / row[name], 4)
            bench_recovery.log(row)
            common.append_result(RESULTS, row)


if __name__ == "__main__":
    main()
