"""Grid rules and k-quants on the reference model (benchmarks/PROTOCOL.md, ``quick`` protocol).

GPTQ W4 (group 32, symmetric, act-order, true-sequential, damp 0.01, block 128) with each grid
rule, every result exported with the ``gguf`` exporter and measured from the file:

* ``gptq-minmax``: ``grid = "minmax"`` (the default), written exactly as Q4_0;
* ``gptq-weighted``: ``grid = "weighted-mse"`` (per group, the shrunken range with the lowest
  squared error weighted by the Hessian diagonal, i.e. the mean squared activation; 20
  candidates), written exactly as Q4_0;
* ``gptq-q4k``: ``grid = "q4_k"`` (the same search, then llama.cpp's two-level Q4_K grid):
  down_proj (1536-wide rows) written exactly as Q4_K, every 576-wide matrix exactly as Q4_0
  (llama.cpp's own quantizer would write Q5_0 there);
* ``gptq-q6k``: ``bits = 6, group_size = 16, grid = "q6_k"``: down_proj Q6_K, the rest Q8_0;
* ``gptq-q4k-embed8``: ``gptq-q4k``, then ``rtn`` 8-bit group 32 on the tied embedding (Q8_0),
  the size class of llama.cpp's Q4_K_M, which quantizes the embedding too;
* ``gptq-q5_0-embed8``: GPTQ W5 g32 (exactly Q5_0) with the 8-bit embedding: the size class of
  llama.cpp's Q4_K_M on this model, whose 576-wide rows fall back to Q5_0;
* ``rtn-q4k``: the dense model exported with ``quantize = "q4_k"`` (pocketlm's k-quant grid fit
  without importance; 576-wide rows take llama.cpp's Q5_0 fallback).
* ``llamacpp-q4_k_m`` and ``llamacpp-q4_0``: llama.cpp's own quantizer (``llama_model_quantize``,
  ``benchmarks/peers/llamacpp_quantize.py`` in the environment ``--llama-python`` names) on the
  dense model exported as F32 GGUF; llama.cpp's rules choose every block type, the tied
  embedding included (Q6_K under Q4_K_M), without an importance matrix; ``llamacpp-q3_k_m`` the
  same at Q3_K_M;
* ``llamacpp-q4_k_m-imatrix``, ``llamacpp-q3_k_m-imatrix``, ``llamacpp-q4_0-imatrix`` and
  ``llamacpp-iq4_nl-imatrix``: the same with an importance
  matrix from the 32 calibration windows (``importance_matrix``: llama-imatrix's statistic,
  computed in PyTorch, because the Python package ships no ``llama-imatrix``; passed to
  ``llama_model_quantize`` as its ``imatrix`` parameter, see ``peers/llamacpp_quantize.py``).

The token embedding (tied with the head) stays F16 unless the part quantizes it (``-embed8``,
and llama.cpp's own types), norms F32. Each file is read
back with transformers' GGUF loader and scored with ``common.perplexity``; every decoder matrix
of the file is compared with the in-memory grid.

Usage (heavy: run under the shared lock):
  flock /tmp/pocketlm-bench.lock nice .venv/bin/python benchmarks/bench_kquants.py \
      [--parts gptq-minmax,gptq-weighted,gptq-q4k,gptq-q6k,gptq-q4k-embed8,gptq-q5_0-embed8,rtn-q4k,
      llamacpp-q4_k_m,llamacpp-q4_0,llamacpp-q3_k_m,llamacpp-q4_k_m-imatrix,llamacpp-q3_k_m-imatrix,
      llamacpp-q4_0-imatrix,llamacpp-iq4_nl-imatrix]
      [--score FILE.gguf ...] [--out /tmp/pocketlm-kquants-bench] [--no-reload] [--llama-python benchmarks/.venvs/llamacpp/bin/python]
``--score FILE.gguf ...`` scores existing files (another benchmark's exports) the same way.
``--speed FILE.gguf ...`` measures their decode speed in llama.cpp side by side (batch 1, greedy, 64
new tokens after a 32-token prompt, the files taking turns, best of 3; run it alone on the machine,
under the lock). Rows are appended to benchmarks/results/kquants.jsonl.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_gguf  # noqa: E402
import common  # noqa: E402

RESULTS = HERE / "results" / "kquants.jsonl"
PARTS = {
    "gptq-minmax": dict(bits=4, group_size=32, grid="minmax"),
    "gptq-weighted": dict(bits=4, group_size=32, grid="weighted-mse"),
    "gptq-q4k": dict(bits=4, group_size=32, grid="q4_k"),
    "gptq-q6k": dict(bits=6, group_size=16, grid="q6_k"),
    # the tied embedding quantized too (rtn, 8-bit g32, written as Q8_0), as llama.cpp's types do
    "gptq-q4k-embed8": dict(bits=4, group_size=32, grid="q4_k", embed=dict(bits=8, group_size=32)),
    # every matrix 5-bit (exactly Q5_0, what llama.cpp's Q4_K_M writes for 576-wide rows), embedding 8-bit
    "gptq-q5_0-embed8": dict(bits=5, group_size=32, grid="minmax", embed=dict(bits=8, group_size=32)),
    "rtn-q4k": None,
    "llamacpp-q4_k_m": "Q4_K_M",
    "llamacpp-q4_0": "Q4_0",
    "llamacpp-q3_k_m": "Q3_K_M",
    # with an importance matrix from the 32 calibration windows (see importance_matrix)
    "llamacpp-q4_k_m-imatrix": "Q4_K_M+imatrix",
    "llamacpp-q3_k_m-imatrix": "Q3_K_M+imatrix",
    # llama.cpp's two 4.5-bit types of 32-weight blocks side by side: the uniform grid (Q4_0) and
    # the non-uniform one (IQ4_NL, 16 fixed levels denser near zero), both with the matrix
    "llamacpp-q4_0-imatrix": "Q4_0+imatrix",
    "llamacpp-iq4_nl-imatrix": "IQ4_NL+imatrix",
}


def log(message: str) -> None:
    print(time.strftime("%H:%M:%S"), message, flush=True)


def tensor_types(path: Path) -> dict[str, int]:
    from gguf import GGUFReader

    return dict(Counter(t.tensor_type.name for t in GGUFReader(path).tensors if t.name.startswith("blk.")
                        and t.name.endswith(".weight") and "norm" not in t.name))


def importance_matrix(model, windows) -> dict[str, "torch.Tensor"]:
    """llama.cpp's importance matrix, the statistic its ``llama-imatrix`` tool collects, computed
    here in PyTorch (the Python package ships no such tool): for each decoder matrix, the mean over
    every calibration token of each input column's squared activation, keyed by the matrix's GGUF
    tensor name. Like ``llama-imatrix`` by default, only the decoder's ``blk.*`` matrices; the
    token embedding and the head are quantized without one."""
    import gguf
    import torch

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def collect(target):
        def hook(module, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            sums[target] = sums.get(target, 0) + x.square().sum(0)
            counts[target] = counts.get(target, 0) + x.shape[0]
        return hook

    hooks = []
    for name, module in model.named_modules():
        target = names.get_name(name, try_suffixes=(".weight",)) if isinstance(module, torch.nn.Linear) else None
        if target and target.startswith("blk."):
            hooks.append(module.register_forward_pre_hook(collect(target + ".weight")))
    with torch.no_grad():
        for window in windows:
            model(window[None])
    for hook in hooks:
        hook.remove()
    return {name: sums[name] / counts[name] for name in sums}


def write_importance_matrix(matrix: dict, path: Path) -> None:
    """The flat layout ``peers/llamacpp_quantize.py`` reads."""
    import struct

    with open(path, "wb") as handle:
        handle.write(struct.pack("<I", len(matrix)))
        for name, values in matrix.items():
            data = values.float().numpy().astype("<f4").tobytes()
            handle.write(struct.pack("<I", len(name)) + name.encode() + struct.pack("<I", values.numel()) + data)


def run(part: str, out: Path, reload: bool = True, llama_python: str | None = None) -> dict:
    import torch

    from pocketlm.plugins import get_plugins
    from pocketlm.testing import make_context

    common.setup_torch()
    model, tokenizer = common.load_reference()
    evaluation, calibration = common.windows(tokenizer, "quick")
    row: dict = {"part": part, "protocol": "quick", "eval_windows": int(evaluation.shape[0]),
                 "calib_windows": int(calibration.shape[0]), "seq_len": common.SEQ_LEN, "seed": 0}
    settings = PARTS[part]
    if isinstance(settings, str):  # llama.cpp's own quantizer on the float file
        dense, lines, seconds = bench_gguf.export(model, tokenizer, out / f"{part}-f32", {"model": {
            "source": "demo:smollm2-135m"}, "export": {"format": "gguf", "dtype": "f32"}}, dtype="f32")
        path = out / part / f"{part}.gguf"
        path.parent.mkdir(parents=True, exist_ok=True)
        ftype, _, imatrix = settings.partition("+")
        extra = []
        if imatrix:
            matrix = importance_matrix(model, calibration)
            write_importance_matrix(matrix, out / part / "imatrix.bin")
            extra = ["--imatrix", str(out / part / "imatrix.bin")]
            row["imatrix_tensors"] = len(matrix)
        with common.Timer() as timer:
            done = subprocess.run([llama_python, str(HERE / "peers" / "llamacpp_quantize.py"), str(dense), str(path),
                                   ftype, *extra], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"llama.cpp's quantizer failed: {done.stderr.strip()[-800:]}")
        how = ("an importance matrix from the calibration windows" if imatrix else "no importance matrix")
        row.update(method=f"llama.cpp llama_model_quantize {ftype} ({how})",
                   **json.loads(done.stdout.strip().splitlines()[-1]), export_seconds=round(timer.seconds, 1))
        lines = []
    elif settings is None:
        recipe = {"model": {"source": "demo:smollm2-135m"}, "export": {"format": "gguf", "quantize": "q4_k"}}
        path, lines, seconds = bench_gguf.export(model, tokenizer, out / part, recipe, quantize="q4_k")
        row.update(method="dense model, exporter quantize=q4_k", export_seconds=round(seconds, 1))
    else:
        plugins = get_plugins()
        method = plugins.methods["gptq"]
        settings = dict(settings)
        embed = settings.pop("embed", None)
        options = method.options(symmetric=True, **settings)
        context = make_context(calibration, tokenizer=tokenizer, plugins=plugins)
        context.logger = log
        stages = [{"method": "gptq", **options.model_dump()}]
        with common.Timer() as timer, torch.no_grad():
            method.compress(model, options, context)
            if embed is not None:
                rtn = plugins.methods["rtn"]
                embed_options = rtn.options(symmetric=True, targets=["embed"], ignore=[], **embed)
                rtn.compress(model, embed_options, context)
                stages.append({"method": "rtn", **embed_options.model_dump()})
        row.update(method=f"pocketlm gptq W{options.bits} g{options.group_size} symmetric act-order grid {options.grid}",
                   options=options.model_dump(), compress_seconds=round(timer.seconds, 1))
        row["in_memory_perplexity"] = round(common.perplexity(model, evaluation), 3)
        log(f"{part}: in-memory perplexity {row['in_memory_perplexity']}")
        recipe = {"model": {"source": "demo:smollm2-135m"}, "stages": stages, "export": {"format": "gguf"}}
        path, lines, seconds = bench_gguf.export(model, tokenizer, out / part, recipe)
        row["export_seconds"] = round(seconds, 1)
        row.update(bench_gguf.compare_tensors(model, path))
    del model
    row["tensor_types"] = tensor_types(path)
    row["file_bytes"] = path.stat().st_size
    row["file_mb"] = round(path.stat().st_size / 1e6, 2)
    row["export_log"] = [line for line in lines if line.startswith("gguf:")]
    if reload:   # the file read back by transformers' GGUF loader and evaluated again
        row["perplexity"] = round(bench_gguf.gguf_perplexity(path, evaluation), 3)
    if llama_python:  # and in llama.cpp itself, on the same token windows
        row.update(bench_gguf.llama_cpp(path, evaluation, llama_python))
    return row


def score(path: Path, reload: bool, llama_python: str | None) -> dict:
    """An existing GGUF file (another benchmark's export) scored like the parts: its tensor types,
    bytes, perplexity read back by transformers and in llama.cpp, on the same evaluation windows."""
    common.setup_torch()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(common.reference_folder())
    evaluation, _ = common.windows(tokenizer, "quick")
    row: dict = {"part": f"file:{path.parent.name}/{path.name}", "protocol": "quick",
                 "eval_windows": int(evaluation.shape[0]), "seq_len": common.SEQ_LEN,
                 "tensor_types": tensor_types(path), "token_embd": embedding_type(path),
                 "file_bytes": path.stat().st_size, "file_mb": round(path.stat().st_size / 1e6, 2)}
    if reload:
        row["perplexity"] = round(bench_gguf.gguf_perplexity(path, evaluation), 3)
    if llama_python:
        row.update(bench_gguf.llama_cpp(path, evaluation, llama_python))
    log(json.dumps(row))
    common.append_result(RESULTS, row)
    return row


def speed(paths: list[Path], llama_python: str | None, out: Path) -> dict:
    """Decode tokens/s of these GGUF files in llama.cpp, measured side by side
    (``peers/llamacpp_decode.py``): the prompt is the first 32 tokens of the first evaluation window."""
    import numpy as np

    if not llama_python:
        raise SystemExit("--speed needs --llama-python (an environment with llama-cpp-python)")
    common.setup_torch()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(common.reference_folder())
    evaluation, _ = common.windows(tokenizer, "quick")
    prompt = out / "decode-prompt.npy"
    np.save(prompt, evaluation[0, :32].numpy().astype(np.int64))
    result_file = out / "decode-speed.json"
    subprocess.run([llama_python, str(HERE / "peers" / "llamacpp_decode.py"), str(prompt), str(result_file),
                    *map(str, paths), "--threads", "2"], check=True)
    result = json.loads(result_file.read_text())
    row = {"part": "decode-speed", "llama_cpp_version": result["llama_cpp_version"], "threads": result["threads"],
           "prompt_tokens": result["prompt_tokens"], "new_tokens": result["new_tokens"],
           "repeats": result["repeats"], "files": {
               f"{Path(path).parent.name}/{Path(path).name}": {"file_bytes": Path(path).stat().st_size,
                                                              "token_embd": embedding_type(Path(path)), **figures}
               for path, figures in result["files"].items()}}
    log(json.dumps(row))
    common.append_result(RESULTS, row)
    return row


def embedding_type(path: Path) -> str:
    from gguf import GGUFReader

    return next(t.tensor_type.name for t in GGUFReader(path).tensors if t.name == "token_embd.weight")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--score", nargs="*", default=[], metavar="FILE.gguf",
                        help="score these existing GGUF files instead of running parts")
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--out", default="/tmp/pocketlm-kquants-bench")
    parser.add_argument("--no-reload", action="store_true", help="skip the perplexity of the file read back "
                        "(the in-memory perplexity stands for it when every matrix is bit-identical)")
    parser.add_argument("--llama-python", help="python of an environment with llama-cpp-python (the llamacpp-* "
                        "parts, and llama.cpp's perplexity of every file)")
    parser.add_argument("--speed", nargs="*", default=[], metavar="FILE.gguf",
                        help="measure these GGUF files' decode speed in llama.cpp side by side instead of running parts")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.speed:
        speed([Path(path) for path in args.speed], args.llama_python, out)
        return
    if args.score:
        for path in args.score:
            score(Path(path), reload=not args.no_reload, llama_python=args.llama_python)
        return
    needs_llama = [p for p in args.parts.split(",") if isinstance(PARTS.get(p), str)]
    if needs_llama and not args.llama_python:
        raise SystemExit(f"{', '.join(needs_llama)} need --llama-python (an environment with llama-cpp-python)")
    common.run_parts(args.parts, PARTS, lambda part: run(part, out, reload=not args.no_reload,
                                                          llama_python=args.llama_python), RESULTS, log)


if __name__ == "__main__":
    main()
