"""all-MiniLM-L6-v2 as int8 ONNX (pocketlm-onnx) against its float32 ONNX export.

Usage:
  .venv/bin/python benchmarks/bench_onnx_int8.py [--model FOLDER] [--sentences 200] [--speed-sentences 50]
      [--out DIR]

* model: the reference encoder, ``demo:all-minilm-l6-v2`` (a sentence-transformers folder: mean
  pooling, normalized), or ``--model`` a folder of the same layout;
* int8: pocketlm-gptq's ``rtn`` with ``bits = 8, group_size = -1`` (symmetric, one scale per
  output channel), targets every linear and the token embedding, run through ``pocketlm.compress``;
* both exports by the ``onnx`` exporter (``dtype = "float32"``); sizes are ``model.onnx``'s bytes;
* quality: cosine of the sentence embeddings (ONNX Runtime's ``sentence_embedding`` output, and
  the int8 model in memory) against the float32 model in torch, on the first ``--sentences``
  lines of WikiText-2 test with at least 40 characters (headings skipped), max length 256;
* speed: ONNX Runtime (CPU provider) sentences/s at batch 1 over the first ``--speed-sentences``
  (50) of them, on one
  thread (by wall clock and by the process's CPU time, which a busy machine disturbs less) and
  on ONNX Runtime's default threads, and at batch 32 (default threads); best of 3 passes after a
  warm-up pass.

Prints one JSON object and appends it to ``benchmarks/results/onnx_int8.jsonl``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch

import pocketlm
from pocketlm import data, sentence
from pocketlm.testing import make_context
from pocketlm_onnx import OnnxOptions, export_onnx, runtime

ROOT = Path(__file__).resolve().parent.parent
INT8 = {"method": "rtn", "bits": 8, "group_size": -1, "symmetric": True, "targets": ["*"], "ignore": []}
MAX_LENGTH = 256


def load(folder: Path):
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    sentence.read_pooling(model, folder)
    return model, AutoTokenizer.from_pretrained(folder)


def reference_folder() -> Path:
    from pocketlm.builtins.loaders import demo_folder

    return demo_folder("all-minilm-l6-v2")


def sentences(count: int) -> list[str]:
    text = data.read_text(data.resolve_text("builtin:wikitext-2-test"))
    lines = [line.strip() for line in text.splitlines()]
    return [line for line in lines if len(line) >= 40 and not line.startswith("=")][:count]


def export(model, tokenizer, folder: Path) -> Path:
    folder.mkdir(parents=True)
    export_onnx(model, folder, OnnxOptions(), make_context(tokenizer=tokenizer))
    return folder


def cosine(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    values = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return {"mean": round(float(values.mean()), 6), "min": round(float(values.min()), 6)}


def sentences_per_second(folder: Path, tokenizer, texts: list[str], threads: int | None, batch_size: int,
                         clock=time.perf_counter) -> float:
    ort_session = runtime.inference_session(folder, threads=threads)
    runtime.embed(ort_session, tokenizer, texts, batch_size=batch_size, max_length=MAX_LENGTH)   # warm-up
    best = float("inf")
    for _ in range(3):
        start = clock()
        runtime.embed(ort_session, tokenizer, texts, batch_size=batch_size, max_length=MAX_LENGTH)
        best = min(best, clock() - start)
    return round(len(texts) / best, 1)


def speeds(folder: Path, tokenizer, texts: list[str]) -> dict[str, float]:
    # On one thread ONNX Runtime computes in the calling thread, so its CPU time (tokenizer
    # included) is the cost of the work itself, whatever else the machine is running.
    return {"batch1_threads1_cpu_time": sentences_per_second(folder, tokenizer, texts, 1, 1, time.process_time),
            "batch1_threads1": sentences_per_second(folder, tokenizer, texts, 1, 1),
            "batch1_default_threads": sentences_per_second(folder, tokenizer, texts, None, 1),
            "batch32_default_threads": sentences_per_second(folder, tokenizer, texts, None, 32)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="sentence-transformers folder (default: the demo)")
    parser.add_argument("--sentences", type=int, default=200)
    parser.add_argument("--speed-sentences", type=int, default=50, help="the first N sentences time the runtime")
    parser.add_argument("--out", type=Path, default=None, help="keep the exports here (default: a temporary folder)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model, tokenizer = load(args.model or reference_folder())
    texts = sentences(args.sentences)
    int8 = pocketlm.compress(copy.deepcopy(model), tokenizer, [INT8]).model
    with tempfile.TemporaryDirectory(prefix="pocketlm-onnx-bench-") as temporary:
        base = args.out or Path(temporary)
        dense_folder, int8_folder = export(model, tokenizer, base / "float32"), export(int8, tokenizer, base / "int8")
        reference = sentence.embed(model, tokenizer, texts, max_length=MAX_LENGTH).numpy()
        dense_size, int8_size = (dense_folder / "model.onnx").stat().st_size, (int8_folder / "model.onnx").stat().st_size
        row = {
            "benchmark": "onnx_int8", "model": "all-MiniLM-L6-v2", "sentences": len(texts), "stage": INT8,
            "bytes": {"float32_onnx": dense_size, "int8_onnx": int8_size, "ratio": round(dense_size / int8_size, 2)},
            "cosine_vs_float32_torch": {
                "float32_onnx": cosine(reference, runtime.embed(dense_folder, tokenizer, texts, max_length=MAX_LENGTH)),
                "int8_onnx": cosine(reference, runtime.embed(int8_folder, tokenizer, texts, max_length=MAX_LENGTH)),
                "int8_in_memory": cosine(reference, sentence.embed(int8, tokenizer, texts, max_length=MAX_LENGTH).numpy()),
            },
            "speed_sentences": len(texts[:args.speed_sentences]),
            "sentences_per_second": {"float32_onnx": speeds(dense_folder, tokenizer, texts[:args.speed_sentences]),
                                     "int8_onnx": speeds(int8_folder, tokenizer, texts[:args.speed_sentences])},
            "onnxruntime": onnxruntime.__version__, "cpu": platform.processor() or platform.machine(),
        }
    print(json.dumps(row, indent=2))
    results = ROOT / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    with open(results / "onnx_int8.jsonl", "a") as handle:
        handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
