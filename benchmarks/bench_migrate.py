"""Migration from llm-compressor to llama.cpp through pocketlm, on the reference model
(benchmarks/PROTOCOL.md, ``quick`` protocol): a GPTQ checkpoint another tool wrote is loaded with
its grids exact, exported to GGUF Q4_0 without dequantizing and re-quantizing, and run in llama.cpp.

Usage (heavy: run under the shared lock):
  flock /tmp/pocketlm-bench.lock nice -n 5 .venv/bin/python benchmarks/bench_migrate.py \
      --llama-python benchmarks/.venvs/llamacpp/bin/python [--parts baseline,llmcompressor,gptq] \
      [--out /tmp/pocketlm-migrate-bench]

Parts (each appends one JSON row to benchmarks/results/migrate.jsonl):
* ``baseline``: the float32 reference model's perplexity, in memory.
* ``llmcompressor``: llm-compressor's GPTQModifier, W4A16 integer symmetric group 32, act-order
  off, lm_head ignored, damp 0.01, block 128, scales rounded to float16 (``scale_dtype``), in its
  own environment (``peers/llmc_migrate.py``; ``POCKETLM_LLMCOMPRESSOR_PYTHON``, by default
  ``benchmarks/.venvs/llmcompressor/bin/python``, made by ``peers/setup_llmcompressor.sh``) on
  the same 32 calibration windows as pocketlm, saved as a compressed-tensors pack-quantized
  checkpoint. The worker also reloads it in transformers (compressed-tensors decompresses it),
  saves those weights and measures that model's perplexity.
* ``gptq``: pocketlm-gptq's ``gptq`` (same grid, act-order off) written by its ``gptq`` exporter,
  a GPTQ-convention checkpoint (AutoGPTQ's layout).
* ``baseline-llamacpp``: the float model exported as an F16 GGUF, run in llama.cpp (its own
  baseline on the same windows).

For each checkpoint: pocketlm loads the folder as a model source (its loader chosen by the
plugins, every quantized linear a ``QuantizedLinear`` with the checkpoint's integer grid),
measures its perplexity in memory, exports it with the ``gguf`` exporter (Q4_0 blocks written
from the grid, ``d = scale``; tied embedding F16, norms F32), and reads every Q4_0 matrix back
with gguf-py's dequantizer: each must equal the checkpoint's dequantized weight bit for bit
(compressed-tensors' own decompression for llm-compressor's checkpoint; the compressed model that
wrote it for pocketlm's). With ``--llama-python`` (an environment holding llama-cpp-python, e.g.
``python3 -m venv benchmarks/.venvs/llamacpp && benchmarks/.venvs/llamacpp/bin/pip install numpy
llama-cpp-python==0.3.36``) the GGUF also runs in llama.cpp on the same token windows
(``gguf_llamacpp.py``, 2 threads).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_gguf  # noqa: E402  (its exporter call and llama.cpp runner)
import common  # noqa: E402

RESULTS = HERE / "results" / "migrate.jsonl"
PARTS = ("baseline", "llmcompressor", "gptq", "baseline-llamacpp")
GROUP_SIZE = 32
GGUF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj"}
log = bench_gguf.log


# ------------------------------------------------------------------ the two checkpoints


def llmcompressor_checkpoint(work: Path, evaluation, calibration) -> tuple[Path, dict, dict]:
    """llm-compressor's checkpoint of the reference model: (folder, compressed-tensors'
    decompressed weights, what the worker measured)."""
    from safetensors.torch import load_file, save_file

    work.mkdir(parents=True, exist_ok=True)
    windows, folder, decompressed = work / "windows.safetensors", work / "checkpoint", work / "decompressed.safetensors"
    save_file({"calibration": calibration.contiguous(), "evaluation": evaluation.contiguous()}, str(windows))
    command = [common.llmcompressor_python(), str(HERE / "peers" / "llmc_migrate.py"), str(common.reference_folder()),
               str(windows), str(folder), str(decompressed)]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"llm-compressor's worker failed with exit code {done.returncode}")
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    renamed = {"oneshot_seconds": "llmcompressor_oneshot_seconds", "decompressed_matrices": "llmcompressor_matrices",
               "transformers": "peer_transformers", "torch": "peer_torch"}  # pocketlm's own versions keep their keys
    peer = {renamed.get(key, key): value for key, value in result.items()}
    return folder, load_file(str(decompressed)), peer


def gptq_checkpoint(work: Path, calibration) -> tuple[Path, dict, dict]:
    """pocketlm-gptq's GPTQ of the reference model written by its ``gptq`` exporter: (folder, the
    compressed model's dequantized weights, its settings)."""
    import torch

    from pocketlm.plugins import get_plugins
    from pocketlm.testing import make_context
    from pocketlm_gptq.export_gptq import GPTQExportOptions, export_gptq

    model, tokenizer = common.load_reference()
    plugins = get_plugins()
    method = plugins.methods["gptq"]
    options = method.options(bits=4, group_size=GROUP_SIZE, symmetric=True, act_order=False)
    context = make_context(calibration, tokenizer=tokenizer, plugins=plugins)
    context.logger = log
    with common.Timer() as timer, torch.no_grad():
        model = method.compress(model, options, context) or model
    folder = work / "checkpoint"
    folder.mkdir(parents=True, exist_ok=True)
    export_gptq(model, folder, GPTQExportOptions(), context)
    return folder, quantized_weights(model), {"options": options.model_dump(), "compress_seconds": round(timer.seconds, 1)}


# ------------------------------------------------------------------ load, export, compare


def load_checkpoint(folder: Path):
    """The folder as a recipe's model source: (LoadedModel, the loader that took it)."""
    from pocketlm.pipeline import Run
    from pocketlm.plugins import get_plugins
    from pocketlm.recipe import parse_recipe

    plugins = get_plugins()
    text = f'[model]\nsource = "{folder}"\n[evaluate]\nmetrics = []\nper_stage = []\n'
    run = Run(parse_recipe(text, plugins), folder.parent / "run", plugins, echo=log)
    loader = next(loader.name for loader in plugins.loaders if loader.matches(str(folder)))
    return run.load(str(folder)), loader


def quantized_weights(model) -> dict:
    from pocketlm.weights import QuantizedLinear

    return {f"{name}.weight": module.dequantize() for name, module in model.named_modules()
            if isinstance(module, QuantizedLinear)}


def grids(model) -> dict:
    """How the loaded model holds its linears: quantized ones by (bits, group size, symmetric)."""
    import torch

    from pocketlm.weights import QuantizedLinear

    kinds: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            key = f"{module.bits}-bit g{module.group_size} {'sym' if module.symmetric else 'asym'}"
        elif isinstance(module, torch.nn.Linear):
            key = f"dense {name}" if name == "lm_head" else "dense"
        else:
            continue
        kinds[key] = kinds.get(key, 0) + 1
    return kinds


def gguf_matrices(path: Path, config) -> tuple[dict, dict]:
    """Every decoder matrix of the file as gguf-py dequantizes it, under its transformers name
    (llama.cpp's q/k row order undone), and the count of each tensor type in the file."""
    import numpy as np
    import torch
    from gguf import GGUFReader, dequantize

    from pocketlm_gguf.blocks import rope_permutation

    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    matrices, types = {}, {}
    for tensor in GGUFReader(path).tensors:
        types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
        parts = tensor.name.split(".")
        if parts[0] != "blk" or parts[2] not in GGUF_NAMES:
            continue
        rows, cols = int(tensor.shape[1]), int(tensor.shape[0])
        values = dequantize(tensor.data, tensor.tensor_type).reshape(rows, cols)
        if parts[2] in heads:
            values = values[np.argsort(rope_permutation(rows, heads[parts[2]]))]
        name = f"model.layers.{parts[1]}.{GGUF_NAMES[parts[2]]}.weight"
        matrices[name] = (tensor.tensor_type.name, torch.from_numpy(np.ascontiguousarray(values)))
    return matrices, types


def compare(matrices: dict, reference: dict) -> dict:
    """How many of the reference's matrices the file holds as Q4_0 equal to it bit for bit."""
    identical, worst = 0, 0.0
    for name, expected in reference.items():
        kind, values = matrices.get(name, (None, None))
        if kind != "Q4_0":
            continue
        difference = float((values - expected.float()).abs().max())
        identical += difference == 0.0
        worst = max(worst, difference)
    return {"bit_identical": f"{identical}/{len(reference)}", "max_abs_difference": worst}


def migrate(folder: Path, reference: dict, evaluation, llama_python: str | None) -> dict:
    """Load ``folder`` in pocketlm, measure it, export GGUF Q4_0, check the file, run llama.cpp."""
    loaded, loader = load_checkpoint(folder)
    model = loaded.model
    row: dict = {"loader": loader, "linears": grids(model), "checkpoint_mb": round(common.folder_mb(folder), 2)}
    with common.Timer() as timer:
        row["pocketlm_perplexity"] = common.perplexity(model, evaluation)
    row["pocketlm_eval_seconds"] = round(timer.seconds, 1)
    log(f"pocketlm (in memory): perplexity {row['pocketlm_perplexity']:.3f}")
    recipe = {"model": {"source": str(folder)}, "export": {"format": "gguf"}}
    path, lines, seconds = bench_gguf.export(model, loaded.tokenizer, folder.parent / "gguf", recipe)
    matrices, types = gguf_matrices(path, model.config)
    row.update(gguf_file=str(path), gguf_bytes=path.stat().st_size, gguf_tensor_types=types,
               export_seconds=round(seconds, 1), export_log=lines[-1] if lines else "",
               gguf_vs_checkpoint=compare(matrices, reference),
               gguf_vs_pocketlm=compare(matrices, quantized_weights(model)))
    log(f"GGUF vs checkpoint: {row['gguf_vs_checkpoint']}; vs pocketlm's grid: {row['gguf_vs_pocketlm']}")
    del model, loaded
    row.update(bench_gguf.llama_cpp(path, evaluation, llama_python))
    return row


# ------------------------------------------------------------------ rows


def versions() -> dict:
    names = ("pocketlm", "pocketlm-gptq", "pocketlm-gguf", "transformers", "torch", "gguf")
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    commit = subprocess.run(["git", "-C", str(common.ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    found["commit"] = commit.stdout.strip()
    return found


def run(part: str, out: Path, llama_python: str | None) -> dict:
    common.setup_torch()
    from transformers import AutoTokenizer

    evaluation, calibration = common.windows(AutoTokenizer.from_pretrained(common.reference_folder()), "quick")
    row: dict = {"part": part, "protocol": "quick", "eval_windows": int(evaluation.shape[0]),
                 "calib_windows": int(calibration.shape[0]), "seq_len": common.SEQ_LEN, "seed": 0,
                 "group_size": GROUP_SIZE, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **versions()}
    if part == "baseline":
        model, _ = common.load_reference()
        row["perplexity"] = common.perplexity(model, evaluation)
        return row
    if part == "baseline-llamacpp":  # the float model as an F16 GGUF: llama.cpp's own baseline
        model, tokenizer = common.load_reference()
        recipe = {"model": {"source": "demo:smollm2-135m"}, "export": {"format": "gguf"}}
        path, _, _ = bench_gguf.export(model, tokenizer, out / part / "gguf", recipe)
        row.update(gguf_file=str(path), gguf_bytes=path.stat().st_size)
        del model
        row.update(bench_gguf.llama_cpp(path, evaluation, llama_python))
        return row
    if part == "llmcompressor":
        folder, reference, made = llmcompressor_checkpoint(out / part, evaluation, calibration)
        row.update(made, checkpoint="llm-compressor compressed-tensors pack-quantized",
                   reference="compressed-tensors' decompression (transformers, run_compressed=False)")
    else:
        folder, reference, made = gptq_checkpoint(out / part, calibration)
        row.update(made, checkpoint="pocketlm-gptq gptq exporter (GPTQ convention)",
                   reference="the compressed model that wrote the checkpoint")
    row.update(migrate(folder, reference, evaluation, llama_python))
    return row


def llama_only(out: Path, parts: list[str], llama_python: str | None) -> None:
    """llama.cpp on the GGUF files an earlier run left in ``out``, one row each."""
    common.setup_torch()
    from transformers import AutoTokenizer

    evaluation, _ = common.windows(AutoTokenizer.from_pretrained(common.reference_folder()), "quick")
    for part in parts:
        path = out / part / "gguf" / "model.gguf"
        if path.exists():
            row = {"part": part, "runtime": "llama.cpp", "gguf_file": str(path), "gguf_bytes": path.stat().st_size,
                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **versions(),
                   **bench_gguf.llama_cpp(path, evaluation, llama_python)}
            log(json.dumps(row))
            common.append_result(RESULTS, row)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--out", default="/tmp/pocketlm-migrate-bench")
    parser.add_argument("--llama-python", default=None, help="python of an environment with llama-cpp-python")
    parser.add_argument("--llama-only", action="store_true",
                        help="only run llama.cpp on the .gguf files a previous run left in --out")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.llama_only:
        llama_only(out, args.parts.split(","), args.llama_python)
        return
    common.run_parts(args.parts, PARTS, lambda part: run(part, out, args.llama_python), RESULTS, log)


if __name__ == "__main__":
    main()
