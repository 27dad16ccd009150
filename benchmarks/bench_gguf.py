"""GGUF Q4_0 on the reference model (benchmarks/PROTOCOL.md, ``quick`` protocol): GPTQ's optimized
grid written exactly as Q4_0 against llama.cpp's own round-to-nearest Q4_0, same exporter, same size.

Usage (heavy: run under the shared lock):
  flock /tmp/pocketlm-bench.lock nice -n 5 .venv/bin/python benchmarks/bench_gguf.py \
      [--parts baseline,rtn-llamacpp,gptq,rtn-pocketlm] [--out /tmp/pocketlm-gguf-bench]

Parts (each appends one JSON row to benchmarks/results/gguf.jsonl):
* ``baseline``: the float32 reference model, in memory.
* ``rtn-llamacpp``: the dense model exported with ``quantize="q4_0"`` (llama.cpp's reference
  round-to-nearest, gguf-py's bit-exact port of ``quantize_row_q4_0_ref``).
* ``gptq``: pocketlm-gptq's ``gptq`` method, W4 group 32 symmetric (act-order, its default), exported
  exactly as Q4_0; every matrix read back from the file is compared with the in-memory grid
  (and, with ``--in-memory``, the in-memory perplexity is measured too).
* ``rtn-pocketlm``: pocketlm-gptq's ``rtn`` method with the same grid, exported exactly as Q4_0.

Every ``.gguf`` file is loaded back with transformers' GGUF loader (``dtype=float32``) and
evaluated with ``common.perplexity``; with ``--llama-python`` (an environment holding
llama-cpp-python) it is also run in llama.cpp on the same token windows (``gguf_llamacpp.py``:
perplexity, prompt and generation tokens/s on 2 threads). Settings: 32 calibration windows of 512 tokens (WikiText-2
valid, ``random.Random(0)``), 32 evaluation windows (WikiText-2 test), 2 torch threads, seed 0;
token embedding (tied with the head) kept in F16 in every file, norms F32.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

RESULTS = HERE / "results" / "gguf.jsonl"
PARTS = ("baseline", "rtn-llamacpp", "gptq", "rtn-pocketlm")


def log(message: str) -> None:
    print(time.strftime("%H:%M:%S"), message, flush=True)


def export(model, tokenizer, folder: Path, recipe: dict, **options) -> tuple[Path, list[str], float]:
    from pocketlm.plugins import get_plugins
    from pocketlm.testing import make_context

    plugins = get_plugins()
    exporter = plugins.exporters["gguf"]
    opts = exporter.options(tokenizer_pre="smollm", name="SmolLM2-135M-Instruct", **options)
    problems = exporter.check(model, opts)
    assert not problems, problems
    context = make_context(tokenizer=tokenizer, plugins=plugins)
    context.recipe = recipe
    lines: list[str] = []
    context.logger = lambda message: (lines.append(message), log(message))
    if folder.exists():
        shutil.rmtree(folder)
    with common.Timer() as timer:
        exporter.export(model, folder, opts, context)
    return folder / opts.filename, lines, timer.seconds


def compare_tensors(model, path: Path) -> dict:
    """Every decoder matrix as read from the file (gguf-py's reference dequantizer, llama.cpp's
    q/k permutation undone) against the in-memory quantized module: how many are bit-identical."""
    import numpy as np
    import torch
    from gguf import GGUFReader, dequantize

    from pocketlm_gguf.blocks import rope_permutation

    config = model.config
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    identical, total, worst = 0, 0, 0.0
    for tensor in GGUFReader(path).tensors:
        parts = tensor.name.split(".")
        if parts[0] != "blk" or parts[2] not in names:
            continue
        values = dequantize(tensor.data, tensor.tensor_type).reshape(int(tensor.shape[1]), int(tensor.shape[0]))
        if parts[2] in ("attn_q", "attn_k"):
            heads = config.num_attention_heads if parts[2] == "attn_q" else config.num_key_value_heads
            values = values[np.argsort(rope_permutation(values.shape[0], heads))]
        module = model.model.layers[int(parts[1])].get_submodule(names[parts[2]])
        ours = module.dequantize() if hasattr(module, "dequantize") else module.weight.detach()
        difference = float((torch.from_numpy(np.ascontiguousarray(values)) - ours).abs().max())
        identical += difference == 0.0
        total += 1
        worst = max(worst, difference)
    return {"matrices_bit_identical": f"{identical}/{total}", "max_abs_difference": worst}


def gguf_perplexity(path: Path, evaluation) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return common.perplexity(model, evaluation)


def llama_cpp(path: Path, evaluation, python: str | None) -> dict:
    """Perplexity on the same token windows and CPU tokens/s in llama.cpp, through
    llama-cpp-python in its own environment (``--llama-python``); skipped where there is none."""
    import numpy as np

    if not python or not Path(python).exists():
        return {"llama_cpp": "not available: llama.cpp perplexity and tokens/s not measured"}
    windows = path.with_suffix(".windows.npy")
    np.save(windows, evaluation.numpy().astype(np.int64))
    out = path.with_suffix(".llamacpp.json")
    done = subprocess.run([python, str(HERE / "gguf_llamacpp.py"), str(path), str(windows), str(out), "--threads", "2"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        return {"llama_cpp": "failed: " + done.stderr.strip()[-500:]}
    result = json.loads(out.read_text())
    return {"llama_cpp_" + key: value for key, value in result.items()}


def run(part: str, out: Path, llama_python: str | None, in_memory: bool) -> dict:
    import torch

    from pocketlm.plugins import get_plugins
    from pocketlm.testing import make_context

    common.setup_torch()
    model, tokenizer = common.load_reference()
    evaluation, calibration = common.windows(tokenizer, "quick")
    row: dict = {"part": part, "protocol": "quick", "eval_windows": int(evaluation.shape[0]),
                 "calib_windows": int(calibration.shape[0]), "seq_len": common.SEQ_LEN, "seed": 0}
    if part == "baseline":
        row["perplexity"] = round(common.perplexity(model, evaluation), 3)
        row["fp16_mb"] = round(common.fp16_reference_mb(model), 1)
        return row
    if part == "rtn-llamacpp":
        recipe = {"model": "demo:smollm2-135m", "export": {"format": "gguf", "quantize": "q4_0"}}
        path, lines, seconds = export(model, tokenizer, out / part, recipe, quantize="q4_0")
        row.update(method="llama.cpp round-to-nearest (exporter quantize=q4_0)", export_seconds=round(seconds, 1))
    else:
        plugins = get_plugins()
        name = "gptq" if part == "gptq" else "rtn"
        method = plugins.methods[name]
        options = method.options(bits=4, group_size=32, symmetric=True)
        context = make_context(calibration, tokenizer=tokenizer, plugins=plugins)
        context.logger = log
        with common.Timer() as timer, torch.no_grad():
            method.compress(model, options, context)
        row.update(method=f"pocketlm {name} W4 g32 symmetric" + (" act-order" if getattr(options, "act_order", False) else ""), options=options.model_dump(),
                   compress_seconds=round(timer.seconds, 1))
        if in_memory:
            row["in_memory_perplexity"] = round(common.perplexity(model, evaluation), 3)
            log(f"{part}: in-memory perplexity {row['in_memory_perplexity']}")
        recipe = {"model": "demo:smollm2-135m", "stages": [{"method": name, **options.model_dump()}],
                  "export": {"format": "gguf"}}
        path, lines, seconds = export(model, tokenizer, out / part, recipe)
        row["export_seconds"] = round(seconds, 1)
        row.update(compare_tensors(model, path))
        log(f"{part}: file vs memory {compare_tensors(model, path)}")
    del model
    row["file"] = str(path)
    row["file_bytes"] = path.stat().st_size
    row["file_mb"] = round(path.stat().st_size / 1e6, 2)
    row["export_log"] = lines[-1] if lines else ""
    row["perplexity"] = round(gguf_perplexity(path, evaluation), 3)
    row.update(llama_cpp(path, evaluation, llama_python))
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--out", default="/tmp/pocketlm-gguf-bench")
    parser.add_argument("--llama-python", default=None,
                        help="python of an environment with llama-cpp-python (optional)")
    parser.add_argument("--in-memory", action="store_true",
                        help="also measure the perplexity of the quantized model in memory (one more evaluation)")
    parser.add_argument("--llama-only", action="store_true",
                        help="only run llama.cpp on the .gguf files a previous run left in --out")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.llama_only:  # llama.cpp on the files an earlier run left in --out
        common.setup_torch()
        from transformers import AutoTokenizer

        evaluation, _ = common.windows(AutoTokenizer.from_pretrained(common.reference_folder()), "quick")
        for part in args.parts.split(","):
            path = out / part / "model.gguf"
            if path.exists():
                row = {"part": part, "runtime": "llama.cpp", "file": str(path), "file_bytes": path.stat().st_size,
                       **llama_cpp(path, evaluation, args.llama_python)}
                log(json.dumps(row))
                common.append_result(RESULTS, row)
        return
    common.run_parts(args.parts, PARTS, lambda part: run(part, out, args.llama_python, args.in_memory), RESULTS, log)


if __name__ == "__main__":
    main()
