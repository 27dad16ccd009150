"""GPTQ W4 g128 end to end on the larger real model, ``demo:qwen2.5-coder-1.5b``
(Qwen2.5-Coder-1.5B-Instruct: a Q4_K_M GGUF expanded to float32, 1.78B parameters, about
7.1 GB; 28 layers, hidden 1536, intermediate 8960, untied head).

Steps, each appended to ``--results`` as soon as it finishes (so a run stopped part-way keeps
what it measured): building the demo cache (first use only), loading, perplexity before (the
quick protocol of benchmarks/PROTOCOL.md: the first 32 x 512 WikiText-2 test windows), GPTQ
(W4, group 128, act-order, true-sequential, damp 0.01) on **8** x 512 WikiText-2 validation
windows (not the protocol's 32: the 1.5B model on 2 CPU cores), with the time of every
decoder layer, then perplexity after. Peak RSS is the process's (``ru_maxrss``).

With ``--peer``, llm-compressor's GPTQ runs next in the same invocation on the same model folder
and the same calibration windows (W4 g128 symmetric, act-order static, damp 0.01, block 128; its
own venv, ``benchmarks/peers/setup_llmcompressor.sh``), and its compressed-tensors export is
evaluated here on the same evaluation windows (decompressed on load). Its peak RSS is its own
process's.

    flock /tmp/pocketlm-bench.lock nice -n 5 .venv/bin/python benchmarks/bench_large_model.py \\
        [--calibration 8] [--peer] [--results docs/bench/large-model-results.jsonl]

``POCKETLM_DEMO_WHEELS=DIR`` points the demo loader at wheels already downloaded.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SOURCE = "qwen2.5-coder-1.5b"


class LayerTimes:
    """A ``Progress`` that records the wall time of every walked layer."""

    def __init__(self, on_layer):
        self.on_layer = on_layer

    @contextlib.contextmanager
    def task(self, description, total):
        last = [time.perf_counter()]

        def advance(steps=1, **fields):
            now = time.perf_counter()
            self.on_layer(description, now - last[0])
            last[0] = now

        yield advance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calibration", type=int, default=8, help="calibration windows of 512 tokens")
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--peer", action="store_true", help="then llm-compressor on the same model and windows")
    parser.add_argument("--results", default=str(common.ROOT / "docs" / "bench" / "large-model-results.jsonl"))
    args = parser.parse_args()
    results = Path(args.results)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pocketlm import data
    from pocketlm.builtins.loaders import demo_folder
    from pocketlm.plugins import get_plugins
    from pocketlm.testing import make_context

    def record(step: str, **fields) -> None:
        row = {"model": "demo:" + SOURCE, "step": step, "peak_rss_mb": round(common.peak_rss_mb()), **fields}
        common.append_result(results, row)
        print(row, flush=True)

    common.setup_torch()
    with common.Timer() as timer:
        folder = demo_folder(SOURCE)
    record("cache", seconds=round(timer.seconds, 1))
    with common.Timer() as timer:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
    record("load", seconds=round(timer.seconds, 1), parameters=common.unique_parameters(model))
    evaluation = data.evaluation_windows(tokenizer, common.text_path(common.EVAL_TEXT), args.eval_windows,
                                         common.SEQ_LEN)
    calibration = data.calibration_windows(tokenizer, common.text_path(common.CALIB_TEXT), args.calibration,
                                           common.SEQ_LEN, 0)
    with common.Timer() as timer:
        before = common.perplexity(model, evaluation)
    record("perplexity-before", perplexity=before, seconds=round(timer.seconds, 1), windows=list(evaluation.shape))

    plugins = get_plugins()
    method = plugins.methods["gptq"]
    options = method.options(bits=4, group_size=128, act_order=True)
    context = make_context(calibration, tokenizer=tokenizer, plugins=plugins)
    layer = [0]

    def on_layer(description, seconds):
        layer[0] += 1
        record("gptq-layer", layer=layer[0], seconds=round(seconds, 1))

    context.progress = LayerTimes(on_layer)
    with common.Timer() as timer:
        model = method.compress(model, options, context) or model
    record("gptq", seconds=round(timer.seconds, 1), bits=4, group_size=128, act_order=True,
           calibration=list(calibration.shape))
    with common.Timer() as timer:
        after = common.perplexity(model, evaluation)
    record("perplexity-after", perplexity=after, seconds=round(timer.seconds, 1), retention=before / after)
    if args.peer:
        del model
        run_peer(folder, calibration, evaluation, before, record)


def run_peer(folder: Path, calibration, evaluation, before: float, record) -> None:
    """llm-compressor's GPTQ on ``folder`` with the same windows, then its export's perplexity."""
    import os
    import subprocess
    import tempfile

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    venv = subprocess.run(["bash", str(common.ROOT / "benchmarks" / "peers" / "setup_llmcompressor.sh")], check=True,
                          capture_output=True, text=True).stdout.strip().splitlines()[-1]
    os.environ[common.LLMCOMPRESSOR_VARIABLE] = f"{venv}/bin/python"
    with tempfile.TemporaryDirectory(prefix="bench-large-peer-") as work:
        work = Path(work)
        save_file({"input_ids": calibration.contiguous()}, str(work / "calibration.safetensors"))
        request = {"model": str(folder), "windows": str(work / "calibration.safetensors"), "out": str(work / "out"),
                   "bits": 4, "group_size": 128, "actorder": "static"}
        with common.Timer() as wall:
            result = common.run_llmcompressor_gptq(request)
        record("peer-gptq", peer=f"llmcompressor {result['llmcompressor']}", seconds=round(result["seconds"], 1),
               wall_seconds=round(wall.seconds, 1), peer_peak_rss_mb=round(result["peak_rss_mb"]), bits=4,
               group_size=128, actorder="static", calibration=list(calibration.shape))
        model = AutoModelForCausalLM.from_pretrained(work / "out", dtype=torch.float32,
                                                     quantization_config=CompressedTensorsConfig(run_compressed=False))
        with common.Timer() as timer:
            after = common.perplexity(model.eval(), evaluation)
        record("peer-perplexity-after", perplexity=after, seconds=round(timer.seconds, 1), retention=before / after)


if __name__ == "__main__":
    main()
