"""The reference benchmark protocol (benchmarks/PROTOCOL.md), shared by every benchmark script.

* reference model: ``demo:smollm2-135m`` through pocketlm's own loader (PyPI wheel, cached);
* ``quick``: first 32 evaluation windows of WikiText-2 test, 32 calibration windows of
  WikiText-2 validation picked by ``random.Random(0).sample``, 512 tokens each;
* ``full``: 128 and 128.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

from pocketlm import data

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
import _protocol  # noqa: E402
from pocketlm.builtins.loaders import demo_folder

ROOT = Path(__file__).resolve().parent.parent
PROTOCOLS = {"quick": (32, 32), "full": (128, 128)}
SEQ_LEN = 512
#: llm-compressor's own environment (``bash benchmarks/peers/setup_llmcompressor.sh`` makes it).
#: The benchmarks name it the way a user does, through the variable the shipped workers of
#: pocketlm-gptq and pocketlm-awq read; a value already set wins.
LLMCOMPRESSOR_VARIABLE = "POCKETLM_LLMCOMPRESSOR_PYTHON"
os.environ.setdefault(LLMCOMPRESSOR_VARIABLE, str(ROOT / "benchmarks" / ".venvs" / "llmcompressor" / "bin" / "python"))


def llmcompressor_python() -> str:
    """The Python of llm-compressor's environment, checked through ``pocketlm.external`` (a clear
    error naming ``POCKETLM_LLMCOMPRESSOR_PYTHON`` when it is missing)."""
    from pocketlm.external import find_python

    return find_python(LLMCOMPRESSOR_VARIABLE, needs="llmcompressor", install="llmcompressor==0.14.*",
                       what="the llm-compressor peer")


def run_llmcompressor_gptq(request: dict) -> dict:
    """pocketlm-gptq's shipped llm-compressor worker (what ``backend = "llmcompressor"`` runs),
    started through the bridge ``pocketlm.external``; returns its reply."""
    from pocketlm.external import run_worker
    from pocketlm_gptq.backend_llmcompressor import WORKER

    return run_worker(llmcompressor_python(), WORKER, request, what="llm-compressor's GPTQ (pocketlm-gptq's worker)")


def text_path(name: str) -> Path:
    """The core's bundled copy of a protocol text (``wikitext-2-raw-test.txt`` is
    ``builtin:wikitext-2-test``, ``wikitext-2-valid.txt`` is ``builtin:wikitext-2-valid``)."""
    return data.resolve_text("builtin:" + name.replace("-raw", "").replace(".txt", ""))


EVAL_TEXT = "wikitext-2-raw-test.txt"
CALIB_TEXT = "wikitext-2-valid.txt"


def setup_torch() -> None:
    """Seed 0 and 2 threads (the protocol's machine has 2 cores); ``POCKETLM_BENCH_THREADS=1``
    lets two quality-only benchmarks share the cores without oversubscribing them."""
    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("POCKETLM_BENCH_THREADS", "2")))


def reference_folder() -> Path:
    return demo_folder("smollm2-135m")


def load_reference():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = reference_folder()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def windows(tokenizer, protocol: str = "quick") -> tuple[torch.Tensor, torch.Tensor]:
    """(evaluation windows, calibration windows) for ``protocol``."""
    n_eval, n_calib = PROTOCOLS[protocol]
    evaluation = data.evaluation_windows(tokenizer, text_path(EVAL_TEXT), n_eval, SEQ_LEN)
    calibration = data.calibration_windows(tokenizer, text_path(CALIB_TEXT), n_calib, SEQ_LEN, 0)
    return evaluation, calibration


perplexity = _protocol.perplexity  # one implementation for pocketlm and the peers


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def folder_mb(path: Path) -> float:
    path = Path(path)
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def unique_parameters(model) -> int:
    """Parameters counted once per storage (a tied embedding and head count once)."""
    seen, count = set(), 0
    for parameter in model.parameters():
        if parameter.data_ptr() not in seen:
            seen.add(parameter.data_ptr())
            count += parameter.numel()
    return count


def fp16_reference_mb(model) -> float:
    """Float16 size of the original weights: 2 bytes a parameter, tied embedding once."""
    return 2 * unique_parameters(model) / 1e6


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def append_result(path: Path, row: dict) -> None:
    """Append one JSON row to a results file (jsonl), so partial runs keep what they measured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(row) + "\n")


def run_parts(parts: str, known, run, results: Path, log) -> None:
    """Run each comma-separated part with ``run(part) -> row`` in order, logging and appending
    every row (with its wall seconds) to ``results`` as it finishes."""
    for part in parts.split(","):
        if part not in known:
            raise SystemExit(f"unknown part {part!r}; choose from {', '.join(known)}")
        log(f"part {part}")
        with Timer() as timer:
            row = run(part)
        row["wall_seconds"] = round(timer.seconds, 1)
        log(json.dumps(row))
        append_result(results, row)
