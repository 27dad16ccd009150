"""Benchmark pocketlm-gptq on the reference model (SmolLM2-135M), side by side with llm-compressor.

Rows (``ROWS``): baseline; GPTQ W4 g64 with and without act-order, each next to llm-compressor's
GPTQModifier with the same act-order (its own venv, same model folder, same calibration windows;
its default is static act-order); GPTQ W4 g64 with one calibration pass per layer
(true_sequential = false, what llm-compressor's sequential pipeline does); RTN W4 g64; GPTQ W3
g64; GPTQ W8 per channel. Each row runs in its own process so its peak RSS is its own. All grids
symmetric (llm-compressor's W4A16 default), damp 0.01, block 128, true-sequential unless the row
says onepass.

    flock /tmp/pocketlm-bench.lock nice -n 5 .venv/bin/python benchmarks/bench_gptq.py \
        --protocol quick --lock '' [--only NAME ...] [--results docs/bench/gptq-results.jsonl]

With ``--lock PATH`` (default /tmp/pocketlm-bench.lock) and no outer flock, each row instead runs
as ``flock PATH nice -n 5 python bench_gptq.py --one ROW``, holding the shared lock per row.

Writes one JSON line per row to --results and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ROWS = {  # most important first, so a partial run keeps what matters
    "baseline": None,
    "gptq-w4-g64-actorder": ("gptq", dict(bits=4, group_size=64, act_order=True)),
    "llmcompressor-gptq-w4-g64": ("peer", dict(actorder="static")),   # its default
    "gptq-w4-g64": ("gptq", dict(bits=4, group_size=64, act_order=False)),
    "llmcompressor-gptq-w4-g64-no-actorder": ("peer", dict(actorder="none")),
    "gptq-w4-g64-actorder-onepass": ("gptq", dict(bits=4, group_size=64, act_order=True, true_sequential=False)),
    "rtn-w4-g64": ("rtn", dict(bits=4, group_size=64)),
    "gptq-w3-g64-actorder": ("gptq", dict(bits=3, group_size=64, act_order=True)),
    "gptq-w8-perchannel": ("gptq", dict(bits=8, group_size=-1, act_order=True)),
    "gptq-w4-g64-onepass": ("gptq", dict(bits=4, group_size=64, act_order=False, true_sequential=False)),
}


def run_one(name: str, protocol: str) -> dict:
    import torch

    from pocketlm.testing import make_context

    common.setup_torch()
    model, tokenizer = common.load_reference()
    evaluation, calibration = common.windows(tokenizer, protocol)
    row = {"row": name, "protocol": protocol, "calib_windows": list(calibration.shape),
           "eval_windows": list(evaluation.shape), "seed": 0, "threads": torch.get_num_threads()}
    spec = ROWS[name]
    if spec is None:
        with common.Timer() as floor, torch.no_grad():  # one forward over the calibration set
            for start in range(0, calibration.shape[0], 8):
                model(input_ids=calibration[start:start + 8], use_cache=False)
        row.update(calibration_forward_s=floor.seconds, checkpoint_mb=common.fp16_reference_mb(model),
                   compress_s=0.0)
    elif spec[0] == "peer":
        row.update(run_peer(calibration, **spec[1]))
        from transformers import AutoModelForCausalLM, CompressedTensorsConfig

        model = AutoModelForCausalLM.from_pretrained(
            row.pop("out"), dtype=torch.float32,
            quantization_config=CompressedTensorsConfig(run_compressed=False)).eval()
    else:
        method, options = spec
        plugins = __import__("pocketlm.plugins", fromlist=["get_plugins"]).get_plugins()
        component = plugins.methods[method]
        context = make_context(calibration, tokenizer=tokenizer, plugins=plugins)
        with common.Timer() as timer:
            model = component.compress(model, component.options(**options), context) or model
        row.update(compress_s=timer.seconds, options=options)
        from pocketlm_gptq.export_gptq import GPTQExportOptions, export_gptq

        with tempfile.TemporaryDirectory() as folder:
            export_gptq(model, Path(folder), GPTQExportOptions(), context)
            row["checkpoint_mb"] = common.folder_mb(folder)
    with common.Timer() as timer:
        row["perplexity"] = common.perplexity(model, evaluation)
    row["eval_s"] = timer.seconds
    row["peak_rss_mb"] = max(row.get("peak_rss_mb", 0), common.peak_rss_mb())
    return row


def run_peer(calibration, actorder: str) -> dict:
    from safetensors.torch import save_file

    work = Path(tempfile.mkdtemp(prefix="bench-gptq-peer-"))
    save_file({"input_ids": calibration.contiguous()}, str(work / "calib.safetensors"))
    request = {"model": str(common.reference_folder()), "windows": str(work / "calib.safetensors"),
               "out": str(work / "out"), "bits": 4, "group_size": 64, "actorder": actorder}
    with common.Timer() as wall:
        result = common.run_llmcompressor_gptq(request)
    return {"compress_s": result["seconds"], "peer_wall_s": wall.seconds, "peak_rss_mb": result["peak_rss_mb"],
            "checkpoint_mb": common.folder_mb(work / "out"), "out": str(work / "out"),
            "peer": f"llmcompressor {result['llmcompressor']} actorder={result['actorder']}"}


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["row"] == "baseline"), None)
    lines = ["| row | perplexity | retention | compress s | x calibration forward | peak RSS MB | checkpoint MB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        retention = f"{base['perplexity'] / r['perplexity']:.3f}" if base else "-"
        ratio = f"{r['compress_s'] / base['calibration_forward_s']:.2f}" if base and r["compress_s"] else "-"
        lines.append(f"| {r['row']} | {r['perplexity']:.2f} | {retention} | {r['compress_s']:.1f} | {ratio} | "
                     f"{r['peak_rss_mb']:.0f} | {r['checkpoint_mb']:.1f} |")
    if base:
        lines.append(f"\nOne forward pass over the calibration set: {base['calibration_forward_s']:.1f} s")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--protocol", default="quick", choices=list(common.PROTOCOLS))
    parser.add_argument("--only", nargs="*", default=list(ROWS))
    parser.add_argument("--results", default=str(common.ROOT / "docs" / "bench" / "gptq-results.jsonl"))
    parser.add_argument("--lock", default="/tmp/pocketlm-bench.lock", help="'' for no lock")
    parser.add_argument("--render", action="store_true", help="print the table of --results and exit")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.protocol)))
        return
    if args.render:  # the table of the rows already in --results (latest run of each row)
        latest = {}
        for line in Path(args.results).read_text().splitlines():
            row = json.loads(line)
            if "error" not in row:
                latest[row["row"]] = row
        print(table([latest[name] for name in ROWS if name in latest]))
        return
    rows = []
    for name in args.only:
        started = time.time()
        command = [sys.executable, __file__, "--one", name, "--protocol", args.protocol]
        if args.lock:
            command = ["flock", args.lock, "nice", "-n", "5"] + command
        run = subprocess.run(command, stdout=subprocess.PIPE, text=True)
        if run.returncode != 0:  # keep going: a failed row must not cost the others
            print(f"row {name} failed with exit code {run.returncode}", file=sys.stderr, flush=True)
            common.append_result(Path(args.results), {"row": name, "error": run.returncode})
            continue
        row = json.loads(run.stdout.strip().splitlines()[-1])
        row["row_wall_s"] = time.time() - started
        common.append_result(Path(args.results), row)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
