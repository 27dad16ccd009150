"""Encoders: all-MiniLM-L6-v2 quantized, pruned, distilled and exported to ONNX, beside its peers.

Every pocketlm row is a recipe run by the CLI (`pocketlm run`), as a user would; the recipes are
written to OUT/recipes. Each is measured by the built-in encoder evaluators against the original
model: `retrieval` (recall@1 and MRR@10, first sentence of a WikiText-2 test paragraph against
the rest of it, among all passages; 500 pairs) and `embedding-fidelity` (mean cosine to the
original's sentence embeddings, 256 held-out sentences). Calibration: WikiText-2 valid, 64
windows of 128 tokens, seed 0.

Rows: int8 and int4 (rtn, gptq); 50% unstructured (magnitude, Wanda, SparseGPT); the hybrids,
depth pruning then distillation then 8- or 7-bit weights on every linear and the token
embedding, exported to ONNX, whose per-stage rows give depth alone and depth then distillation:
docs/examples/recipes/minilm-hybrid-3layers.toml (6 -> 3), minilm-hybrid-4layers.toml (6 -> 4) and
minilm-hybrid.toml (6 -> 5, distilled on query/passage pairs, 7-bit: the one that meets the
targets).

ONNX Runtime rows: the original in float32 and the hybrid (pocketlm's `onnx` exporter), and the
peers in their own environment (benchmarks/peers/encoder_peers.py): Optimum's export with ONNX
Runtime dynamic int8 quantization, and sentence-transformers' ONNX int8 export, all scored on the
same pairs with the same scoring code, timed at batch 1 on the same 200 sentences.

    bash benchmarks/peers/setup_encoder_peers.sh
    flock /tmp/pocketlm-bench.lock nice -n 5 .venv/bin/python benchmarks/bench_encoders.py [--only NAME,...]
    # time finished exports again, in turn with the original (one model loaded at a time)
    flock /tmp/pocketlm-bench.lock .venv/bin/python benchmarks/bench_encoders.py --alternate 4 --only hybrid
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
PEER_PYTHON = ROOT / "benchmarks" / ".venvs" / "encoder-peers" / "bin" / "python"
HYBRIDS = {"hybrid-3layers": ROOT / "docs" / "examples" / "recipes" / "minilm-hybrid-3layers.toml",
           "hybrid-4layers": ROOT / "docs" / "examples" / "recipes" / "minilm-hybrid-4layers.toml",
           "hybrid": ROOT / "docs" / "examples" / "recipes" / "minilm-hybrid.toml"}
METRICS = '["embedding-fidelity", "retrieval", "size"]'
HEADER = f"""[model]
source = "demo:all-minilm-l6-v2"

[calibration]
samples = 64
seq_len = 128
seed = 0

[evaluate]
metrics = {METRICS}
before = false
"""


def stage(method: str, **options) -> str:
    lines = ["[[stages]]", f'method = "{method}"']
    lines += [f"{key} = {json.dumps(value)}" for key, value in options.items()]
    return "\n".join(lines) + "\n"


ROWS = {
    "original": "",
    "rtn-int8": stage("rtn", bits=8, group_size=-1, symmetric=True),
    "gptq-int8": stage("gptq", bits=8, group_size=-1, symmetric=True),
    "rtn-int4-g32": stage("rtn", bits=4, group_size=32),
    "gptq-int4-g32": stage("gptq", bits=4, group_size=32),
    "magnitude-50": stage("magnitude", sparsity=0.5),
    "wanda-50": stage("wanda", sparsity=0.5),
    "sparsegpt-50": stage("sparsegpt", sparsity=0.5),
    # one layer removed, no training: how much retrieval depth alone costs
    **{f"drop-layer-{i}": stage("prune-depth", drop=[i]) for i in range(6)},
}


def run_recipe(name: str, text: str, out: Path, export: str | None = None, reuse: bool = False) -> dict:
    """Run one recipe through the CLI; its report.json."""
    recipes = out / "recipes"
    recipes.mkdir(parents=True, exist_ok=True)
    recipe = recipes / f"{name}.toml"
    body = HEADER + text + (f'\n[export]\nformat = "{export}"\npath = "export"\n' if export else "")
    recipe.write_text(body)
    return _run(recipe, out / name, reuse)


def _run(recipe: Path, run_dir: Path, reuse: bool = False) -> dict:
    """``pocketlm run`` the recipe; with ``reuse``, a run directory a previous call finished is read instead."""
    if reuse and (run_dir / "report.json").is_file() and (run_dir / "bench-wall-seconds.txt").is_file():
        report = json.loads((run_dir / "report.json").read_text())
        report["wall_s"] = float((run_dir / "bench-wall-seconds.txt").read_text())
        return report
    started = time.perf_counter()
    result = subprocess.run([str(ROOT / ".venv" / "bin" / "pocketlm"), "run", str(recipe), "--run-dir", str(run_dir),
                             "--overwrite"], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{recipe.name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    report = json.loads((run_dir / "report.json").read_text())
    report["wall_s"] = time.perf_counter() - started
    (run_dir / "bench-wall-seconds.txt").write_text(f"{report['wall_s']:.1f}")
    return report


def original_encoder():
    """(model, tokenizer) of the reference encoder as its sentence-transformers folder defines it
    (pooling read from the folder), from pocketlm's demo cache."""
    from transformers import AutoModel, AutoTokenizer

    from pocketlm import sentence
    from pocketlm.builtins.loaders import demo_folder

    folder = demo_folder("all-minilm-l6-v2")
    model, tokenizer = AutoModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    sentence.read_pooling(model, folder)
    return model, tokenizer


def texts(pairs: int = 500, timing: int = 200) -> dict:
    from pocketlm.builtins.encoder_evaluators import evaluation_sentences, retrieval_pairs
    from pocketlm.data import DEFAULT_EVALUATION_TEXT, read_text, resolve_text

    text = read_text(resolve_text(DEFAULT_EVALUATION_TEXT))
    found = retrieval_pairs(text, pairs)
    return {"queries": [q for q, _ in found], "passages": [p for _, p in found],
            "timing": evaluation_sentences(text, timing)}


def scores(queries: np.ndarray, passages: np.ndarray) -> dict:
    from pocketlm.builtins.encoder_evaluators import mrr_at, recall_at, retrieval_ranks

    ranks = retrieval_ranks(torch.from_numpy(np.asarray(queries, dtype=np.float32)),
                            torch.from_numpy(np.asarray(passages, dtype=np.float32)))
    return {"recall_at_1": recall_at(ranks, 1), "mrr_at_10": mrr_at(ranks, 10)}


def onnx_row(name: str, export: Path, sentences: dict) -> dict:
    """Score and time a pocketlm ONNX export in ONNX Runtime."""
    from transformers import AutoTokenizer

    from pocketlm_onnx import runtime

    tokenizer = AutoTokenizer.from_pretrained(export)
    row = {"name": name, "onnx_bytes": sum(p.stat().st_size for p in export.glob("*.onnx*"))}
    for threads, key in ((None, "threads_all"), (1, "threads_1")):
        ort_session = runtime.inference_session(export, threads=threads)
        if threads is None:
            row.update(scores(runtime.embed(ort_session, tokenizer, sentences["queries"]),
                              runtime.embed(ort_session, tokenizer, sentences["passages"])))
        row[f"sentences_per_s_batch1_{key}"] = best_rate(
            lambda batch: runtime.embed(ort_session, tokenizer, batch, batch_size=1), sentences["timing"])
    return row


def best_rate(encode, sentences: list[str], repeats: int = 3) -> float:
    encode(sentences[:4])
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for sentence in sentences:
            encode([sentence])
        best = min(best, time.perf_counter() - started)
    return len(sentences) / best


def alternating_rates(folders: dict[str, Path], sentences: list[str], rounds: int) -> dict:
    """Batch-1 sentences/s of each ONNX export, the exports timed in turn (one of them loaded in ONNX Runtime
    at a time, so no idle thread pool competes), best of ``rounds`` turns; with all threads
    and with one."""
    import gc

    from transformers import AutoTokenizer

    from pocketlm_onnx import runtime

    found = {}
    for threads, key in ((None, "threads_all"), (1, "threads_1")):
        for _ in range(rounds):
            for name, folder in folders.items():
                tokenizer = AutoTokenizer.from_pretrained(folder)
                ort_session = runtime.inference_session(folder, threads=threads)
                rate = best_rate(lambda batch: runtime.embed(ort_session, tokenizer, batch, batch_size=1), sentences,
                                 repeats=1)
                rates = found.setdefault(name, {})
                rates[f"sentences_per_s_batch1_{key}"] = max(rate, rates.get(f"sentences_per_s_batch1_{key}", 0.0))
                del ort_session
                gc.collect()
    return found


def peer_rows(model_folder: Path, sentences: dict, out: Path) -> list[dict]:
    if not PEER_PYTHON.exists():
        return [{"name": "peers", "error": "peer environment missing: bash benchmarks/peers/setup_encoder_peers.sh"}]
    peers = out / "peers"
    peers.mkdir(parents=True, exist_ok=True)
    (peers / "texts.json").write_text(json.dumps(sentences))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run([str(PEER_PYTHON), str(ROOT / "benchmarks" / "peers" / "encoder_peers.py"), "--model", str(model_folder),
                    "--texts", str(peers / "texts.json"), "--out", str(peers)], check=False, env=env)
    rows = []
    for peer in ("optimum-int8", "st-onnx-int8"):
        found = peers / f"{peer}.json"
        row = json.loads(found.read_text()) if found.exists() else {"error": "no result"}
        row["name"] = peer
        if "error" not in row:
            row.update(scores(np.load(peers / f"{peer}-queries.npy"), np.load(peers / f"{peer}-passages.npy")))
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-encoders")
    parser.add_argument("--only", default=None, help="comma-separated row names (default: all)")
    parser.add_argument("--report", action="store_true", help="print the tables of results.json and stop")
    parser.add_argument("--reuse-runs", action="store_true", help="read the runs a previous call finished (their "
                        "report.json and export) instead of running their recipes again: to time the ONNX rows "
                        "again on a quiet machine")
    parser.add_argument("--alternate", type=int, default=0, metavar="ROUNDS",
                        help="only time the finished ONNX exports of original-onnx and the --only rows, in turn, "
                        "best of ROUNDS turns (no recipe runs)")
    args = parser.parse_args()
    if args.alternate:
        names = ["original-onnx"] + [n for n in (args.only or "").split(",") if n and n != "original-onnx"]
        rates = alternating_rates({n: args.out / n / "export" for n in names}, texts()["timing"], args.alternate)
        results_file = args.out / "results.json"
        results = json.loads(results_file.read_text()) if results_file.exists() else {}
        results.setdefault("alternating", []).append({"rounds": args.alternate, "rates": rates})
        _save(results_file, results)
        print(json.dumps(rates, indent=2))
        return
    if args.report:
        print(tables(json.loads((args.out / "results.json").read_text())))
        return
    torch.set_num_threads(os.cpu_count() or 1)
    from pocketlm.builtins.loaders import demo_folder

    folder = demo_folder("all-minilm-l6-v2")
    results_file = args.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    wanted = set(args.only.split(",")) if args.only else None

    def want(name: str) -> bool:
        return wanted is None or name in wanted

    for name, text in ROWS.items():
        if want(name):
            report = run_recipe(name, text, args.out, reuse=args.reuse_runs)
            results[name] = {"after": report["after"], "stages": [s["metrics"] for s in report["stages"]],
                             "wall_s": report["wall_s"]}
            _save(results_file, results)
    sentences = texts()
    if want("original-onnx"):
        run_recipe("original-onnx", "", args.out, export="onnx", reuse=args.reuse_runs)
        results["original-onnx"] = onnx_row("original-onnx", args.out / "original-onnx" / "export", sentences)
        _save(results_file, results)
    for name, recipe in HYBRIDS.items():
        if want(name):
            report = _run(recipe, args.out / name, args.reuse_runs)
            results[name] = {"stages": [{"method": s["method"], "seconds": s["seconds"], **s["metrics"]}
                                        for s in report["stages"]],
                             "after": report["after"], "wall_s": report["wall_s"],
                             "onnx": onnx_row(f"{name}-onnx", args.out / name / "export", sentences)}
            _save(results_file, results)
    if want("peers"):
        results["peers"] = peer_rows(folder, sentences, args.out)
        _save(results_file, results)
    print(json.dumps(results, indent=2))


def tables(results: dict) -> str:
    """docs/bench/encoders.md from results.json (ratios against the original's scores)."""
    base = results["original"]["after"]

    def share(row: dict, key: str) -> str:
        return f"{row[key]:.3f} ({row[key] / base[key]:.1%})"

    lines = ["| row | embedding cosine | recall@1 (share) | MRR@10 (share) | size estimate (MB) | wall (s) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name in ROWS:
        if name in results:
            row = results[name]["after"]
            lines.append(f"| {name} | {row['embedding_fidelity']:.4f} | {share(row, 'recall_at_1')} | "
                         f"{share(row, 'mrr_at_10')} | {row['size_mb']:.1f} | {results[name]['wall_s']:.0f} |")
    for name in HYBRIDS:
        if name in results:
            for number, stage in enumerate(results[name]["stages"], 1):
                lines.append(f"| {name}, after {number}: {stage['method']} | {stage['embedding_fidelity']:.4f} | "
                             f"{share(stage, 'recall_at_1')} | {share(stage, 'mrr_at_10')} | {stage['size_mb']:.1f} | "
                             f"{stage['seconds']:.0f} (stage) |")
    onnx = [results[n] for n in ("original-onnx",) if n in results]
    onnx += [results[n]["onnx"] for n in HYBRIDS if n in results]
    onnx += [r for r in results.get("peers", []) if "error" not in r]
    reference = results.get("original-onnx")
    lines += ["", "| ONNX Runtime | model bytes (MB) | smaller | recall@1 (share) | MRR@10 (share) | "
              "sentences/s, batch 1 (speed-up) | 1 thread (speed-up) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in onnx:
        size = row["onnx_bytes"] / 1e6
        smaller = reference["onnx_bytes"] / row["onnx_bytes"] if reference else float("nan")
        fast = row["sentences_per_s_batch1_threads_all"]
        one = row["sentences_per_s_batch1_threads_1"]
        lines.append(f"| {row['name']} | {size:.1f} | {smaller:.2f}x | {share(row, 'recall_at_1')} | "
                     f"{share(row, 'mrr_at_10')} | {fast:.1f} ({fast / reference['sentences_per_s_batch1_threads_all']:.2f}x) | "
                     f"{one:.1f} ({one / reference['sentences_per_s_batch1_threads_1']:.2f}x) |")
    for row in results.get("peers", []):
        if "error" in row:
            lines.append(f"| {row['name']} | failed: {row['error']} | | | | | |")
    return "\n".join(lines) + "\n"


def _save(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(path)


if __name__ == "__main__":
    main()
