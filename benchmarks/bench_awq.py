"""AWQ on the reference model (benchmarks/PROTOCOL.md, ``quick`` protocol), side by side with
pocketlm's RTN and GPTQ (when the pocketlm-gptq plugin is installed) and llm-compressor's AWQ.

Usage (heavy: run under the shared lock):
  flock /tmp/pocketlm-bench.lock nice -n 5 .venv/bin/python benchmarks/bench_awq.py \
      --parts baseline,awq,compare [--peer] [--peer-unpatched]

Each measurement runs in its own subprocess (so peak RSS is that run's own) and appends one JSON
row to benchmarks/results/awq.jsonl. Settings: W4 g64 and W3 g64, asymmetric, lm_head not
quantized, 32 calibration windows of 512 tokens (WikiText-2 valid, seed 0), 32 evaluation windows
(WikiText-2 test), torch 2 threads, seed 0.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

RESULTS = HERE / "results" / "awq.jsonl"
WINDOWS = HERE / "results" / "awq_windows.safetensors"
PEER_VENV = Path(os.environ[common.LLMCOMPRESSOR_VARIABLE])  # llm-compressor's environment (common.py)
CONFIGS = ((4, 64), (3, 64))


def one(kind: str, bits: int, group: int) -> dict:
    """One measurement in this process: ``kind`` is baseline, awq, rtn or gptq."""
    import torch

    from pocketlm.plugins import get_plugins
    from pocketlm.testing import make_context

    common.setup_torch()
    model, tokenizer = common.load_reference()
    evaluation, calibration = common.windows(tokenizer, "quick")
    row: dict = {"method": kind, "bits": bits, "group_size": group, "symmetric": False, "protocol": "quick"}
    if kind != "baseline":
        plugins = get_plugins()
        method = plugins.methods[kind]
        options = method.options(bits=bits, group_size=group, symmetric=False)
        logs: list[str] = []
        context = make_context(calibration, tokenizer=tokenizer, plugins=plugins)
        context.logger = lambda message: (logs.append(message), print(message, flush=True))
        with common.Timer() as timer:
            with torch.no_grad():
                method.compress(model, options, context)
        row["seconds"] = round(timer.seconds, 1)
        row["log"] = logs[-1] if logs else ""
        exporter = "awq" if kind == "awq" and bits == 4 else ("compressed-tensors" if "compressed-tensors" in plugins.exporters else None)
        if exporter is not None:
            component = plugins.exporters[exporter]
            export_options = component.options()
            problems = component.check(model, export_options) if component.check else []
            if not problems:
                with tempfile.TemporaryDirectory() as folder:
                    component.export(model, Path(folder), export_options, context)
                    row["export"], row["export_mb"] = exporter, round(common.folder_mb(folder), 1)
            else:
                row["export_problems"] = problems[:3]
    row["perplexity"] = round(common.perplexity(model, evaluation), 3)
    row["fp16_mb"] = round(common.fp16_reference_mb(model), 1) if kind == "baseline" else None
    row["peak_rss_mb"] = round(common.peak_rss_mb(), 0)
    return row


def spawn(kind: str, bits: int, group: int) -> dict | None:
    command = [sys.executable, __file__, "--one", f"{kind}:{bits}:{group}"]
    print("running", " ".join(command), flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            row = json.loads(line[7:])
            common.append_result(RESULTS, row)
            print(row, flush=True)
            return row
    print(done.stdout[-2000:], done.stderr[-4000:], flush=True)
    common.append_result(RESULTS, {"method": kind, "bits": bits, "group_size": group,
                                   "error": done.stderr.strip().splitlines()[-1:] if done.stderr else "no result"})
    return None


def save_windows() -> None:
    from safetensors.torch import save_file

    _, tokenizer = common.load_reference()
    evaluation, calibration = common.windows(tokenizer, "quick")
    WINDOWS.parent.mkdir(parents=True, exist_ok=True)
    save_file({"evaluation": evaluation.contiguous(), "calibration": calibration.contiguous()}, str(WINDOWS))


def peer(bits: int, group: int, patched: bool, timeout: float | None) -> None:
    if not PEER_VENV.exists():
        common.append_result(RESULTS, {"method": "llmc-awq", "error": f"peer venv missing: {PEER_VENV}"})
        return
    save_windows()
    command = [str(PEER_VENV), str(HERE / "peers" / "llmc_awq.py"), str(common.reference_folder()), str(WINDOWS),
               str(bits), str(group)] + (["--patch"] if patched else [])
    print("running", " ".join(command), flush=True)
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "TQDM_DISABLE": "1"})
    except subprocess.TimeoutExpired as expired:
        row = {"method": "llmc-awq", "patched": patched, "bits": bits, "group_size": group,
               "error": f"no result within {timeout:.0f} s", "tail": str(expired.stderr or "")[-500:]}
        common.append_result(RESULTS, row)
        print(row, flush=True)
        return
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            row = json.loads(line[7:])
            row["wall_s"] = round(time.perf_counter() - start, 1)
            common.append_result(RESULTS, row)
            print(row, flush=True)
            return
    errors = [line for line in done.stderr.splitlines() if "Error" in line or "error" in line]
    row = {"method": "llmc-awq", "patched": patched, "bits": bits, "group_size": group, "returncode": done.returncode,
           "error": errors[-1] if errors else done.stderr[-500:]}
    common.append_result(RESULTS, row)
    print(row, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", default="baseline,awq,compare")
    parser.add_argument("--one")
    parser.add_argument("--peer", action="store_true", help="llm-compressor AWQ W4 g64 (patched pin_memory)")
    parser.add_argument("--peer-unpatched", action="store_true", help="try the unpatched peer first (short timeout)")
    parser.add_argument("--configs", default=",".join(f"{b}:{g}" for b, g in CONFIGS))
    args = parser.parse_args()
    if args.one:
        kind, bits, group = args.one.split(":")
        print("RESULT " + json.dumps(one(kind, int(bits), int(group))), flush=True)
        return
    configs = [tuple(int(v) for v in c.split(":")) for c in args.configs.split(",")]
    parts = args.parts.split(",")
    if "baseline" in parts:
        spawn("baseline", 16, -1)
    if "awq" in parts:
        for bits, group in configs:
            spawn("awq", bits, group)
    if "compare" in parts:
        from pocketlm.plugins import get_plugins

        methods = get_plugins().methods
        for kind in ("rtn", "gptq"):
            if kind not in methods:
                common.append_result(RESULTS, {"method": kind, "error": "pocketlm-gptq plugin not installed"})
                continue
            for bits, group in configs:
                spawn(kind, bits, group)
    if args.peer_unpatched:
        peer(4, 64, patched=False, timeout=300)
    if args.peer:
        peer(4, 64, patched=True, timeout=3600)


if __name__ == "__main__":
    main()
