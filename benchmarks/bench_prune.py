"""Pruning benchmark on the reference model (quick protocol), see docs/bench/prune.md.

    flock /tmp/pocketlm-bench.lock nice -n 5 .venv/bin/python benchmarks/bench_prune.py \
        [--jobs sparsegpt-50,baseline-speed,...] [--out benchmarks/results/prune.jsonl]

* ours: magnitude, wanda, sparsegpt at 50% unstructured and 2:4 (lm_head ignored), perplexity
  and seconds of the compression itself;
* structured: prune-width (25% of MLP channels) and prune-depth (4 layers, block influence):
  perplexity, parameters, CPU forward latency (batch 1 x 512 tokens, best of 3), greedy
  generation tokens/s, and a round trip through the core `hf` exporter and plain transformers;
* peers: llm-compressor's SparseGPTModifier and WandaPruningModifier (50% and 2:4, lm_head
  ignored) in its own venv, on the same calibration and evaluation windows (safetensors file).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from pocketlm.builtins.export_hf import export_hf  # noqa: E402
from pocketlm.plugins import get_plugins  # noqa: E402
from pocketlm.testing import make_context  # noqa: E402

LLMC_PYTHON = Path(os.environ[common.LLMCOMPRESSOR_VARIABLE])  # llm-compressor's environment (common.py)


def sparsity_of(model) -> float:
    from pocketlm.weights import masks
    found = masks(model)
    return sum(int((~m).sum()) for m in found.values()) / max(1, sum(m.numel() for m in found.values()))


@torch.no_grad()
def forward_latency(model, tokens: torch.Tensor, repeats: int = 3) -> float:
    model(input_ids=tokens, use_cache=False)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model(input_ids=tokens, use_cache=False)
        best = min(best, time.perf_counter() - start)
    return best


@torch.no_grad()
def generation_speed(model, prompt: torch.Tensor, new_tokens: int = 64, repeats: int = 2) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)
        best = min(best, time.perf_counter() - start)
        assert out.shape[1] == prompt.shape[1] + new_tokens
    return new_tokens / best


@torch.no_grad()
def round_trip(model, window: torch.Tensor) -> dict:
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as folder:
        export_hf(model, Path(folder), None, None)
        loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        diff = (loaded(input_ids=window).logits - model(input_ids=window).logits).abs().max().item()
        return {"reload_max_logit_diff": diff, "reload_params": common.unique_parameters(loaded),
                "reload_class": type(loaded).__name__}


def run_ours(method, options, calibration, evaluation, log, extra=None):
    plugins = get_plugins()
    model, _ = common.load_reference()
    spec = plugins.methods[method]
    context = make_context(calibration, plugins=plugins)
    context.logger = lambda message: print("   ", message, flush=True)
    with common.Timer() as timer:
        spec.compress(model, spec.options(**options), context)
    row = {"method": method, "options": options, "seconds": round(timer.seconds, 1),
           "perplexity": common.perplexity(model, evaluation), "sparsity": sparsity_of(model),
           "parameters": common.unique_parameters(model)}
    if extra:
        row.update(extra(model))
    log(row)
    return model


def structured_extra(evaluation):
    def measure(model):
        return {"forward_s": forward_latency(model, evaluation[:1]),
                "gen_tokens_per_s": generation_speed(model, evaluation[:1, :32]),
                **round_trip(model, evaluation[:1, :128]), "config": {
                    k: getattr(model.config, k) for k in ("num_hidden_layers", "intermediate_size",
                                                          "num_attention_heads", "num_key_value_heads", "head_dim")}}
    return measure


def speed_job(calibration, evaluation, log, rounds: int = 3):
    """Baseline, width-, depth- and width-then-depth-pruned models timed in alternation
    (A B C D A B C D ...) in one process, so that load from other processes on a shared machine
    hits all of them alike. The combined model's perplexity is measured too (the single ones
    have theirs in the ``width``/``depth`` jobs)."""
    import copy

    plugins = get_plugins()
    models = {"baseline": common.load_reference()[0]}

    def pruned(model, method, options):
        plugins.methods[method].compress(model, plugins.methods[method].options(**options),
                                         make_context(calibration, plugins=plugins))
        return model

    width = pruned(common.load_reference()[0], "prune-width", {"mlp_ratio": 0.25})
    models['prune-width {"mlp_ratio": 0.25}'] = width
    models['prune-depth {"layers": 4}'] = pruned(common.load_reference()[0], "prune-depth", {"layers": 4})
    both = pruned(copy.deepcopy(width), "prune-depth", {"layers": 4})
    models['prune-width {"mlp_ratio": 0.25} then prune-depth {"layers": 4}'] = both
    log({"method": "prune-width+prune-depth", "options": {"mlp_ratio": 0.25, "layers": 4},
         "perplexity": common.perplexity(both, evaluation), "parameters": common.unique_parameters(both)})
    forward = {name: float("inf") for name in models}
    generate = {name: 0.0 for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            forward[name] = min(forward[name], forward_latency(model, evaluation[:1], repeats=1))
            generate[name] = max(generate[name], generation_speed(model, evaluation[:1, :32], repeats=1))
    for name, model in models.items():
        log({"method": "speed", "model": name, "parameters": common.unique_parameters(model),
             "forward_s": forward[name], "gen_tokens_per_s": generate[name],
             "forward_speedup": forward["baseline"] / forward[name],
             "gen_speedup": generate[name] / generate["baseline"]})


JOBS = ["sparsegpt-50", "baseline-speed", "width", "depth", "wanda-50", "sparsegpt-2:4", "wanda-2:4",
        "magnitude-50", "magnitude-2:4", "llmc-sparsegpt-50", "llmc-wanda-50", "llmc-sparsegpt-2:4",
        "llmc-wanda-2:4", "baseline-ppl"]


def report(path: Path) -> str:
    """Markdown tables from the results file (the latest row of each configuration wins)."""
    rows = {}
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        key = (row["method"], json.dumps(row.get("options", row.get("mask"))), "forward_s" in row)
        if row["method"] == "speed":
            key = ("speed", row["model"], False)
        rows[key] = {**rows.get(key, {}), **row}
    base_ppl = next((r["perplexity"] for (m, _, _), r in rows.items() if m == "baseline" and "perplexity" in r), None)
    lines = ["| method | setting | perplexity | seconds | sparsity |", "| --- | --- | --- | --- | --- |"]
    for (method, _, speed), r in rows.items():
        if speed or method in ("baseline", "prune-width", "prune-depth", "speed", "prune-width+prune-depth"):
            continue
        setting = r.get("options") or {"mask": r.get("mask")}
        setting = setting.get("pattern") or setting.get("mask") or f"{setting.get('sparsity', 0.5):.0%}"
        setting = "50%" if setting == "0:0" else setting
        text = r.get("error", "")[-80:] if "error" in r else f"{r['perplexity']:.2f}"
        lines.append(f"| {method} | {setting} | {text} | {r.get('seconds', 0):.0f} | {r.get('sparsity', 0):.3f} |")
    if base_ppl:
        lines.append(f"| baseline | dense | {base_ppl:.2f} | - | 0 |")
    lines += ["", "| model | perplexity | parameters | forward 1x512 (s, best of 3) | speed-up | generation tok/s | "
              "speed-up | reload max logit diff |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    base = next((r for (m, _, s), r in rows.items() if m == "baseline" and s), None)
    for (method, _, speed), r in rows.items():
        if not speed:
            continue
        ppl = r.get("perplexity", base_ppl)
        ppl = f"{ppl:.2f}" if ppl else "-"
        fwd = base["forward_s"] / r["forward_s"] if base else float("nan")
        gen = r["gen_tokens_per_s"] / base["gen_tokens_per_s"] if base else float("nan")
        label = method if method == "baseline" else f"{method} {json.dumps(r['options'])}"
        lines.append(f"| {label} | {ppl} | {r['parameters'] / 1e6:.1f} M | {r['forward_s']:.3f} | {fwd:.2f}x | "
                     f"{r['gen_tokens_per_s']:.1f} | {gen:.2f}x | {r.get('reload_max_logit_diff', 0):.1e} |")
    timed = [r for (m, _, _), r in rows.items() if m == "speed"]
    if timed:
        lines += ["", "Alternating timing (`--jobs speed`: the three models timed in turn, best of 3 rounds):", "",
                  "| model | parameters | forward 1x512 (s) | speed-up | generation tok/s | speed-up |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in timed:
            lines.append(f"| {r['model']} | {r['parameters'] / 1e6:.1f} M | {r['forward_s']:.3f} | "
                         f"{r['forward_speedup']:.2f}x | {r['gen_tokens_per_s']:.1f} | {r['gen_speedup']:.2f}x |")
    combined = [r for (m, _, _), r in rows.items() if m == "prune-width+prune-depth"]
    for r in combined:
        lines.append(f"\nprune-width (25% MLP) then prune-depth (4 layers): perplexity {r['perplexity']:.2f}, "
                     f"{r['parameters'] / 1e6:.1f} M parameters")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--report", action="store_true", help="print markdown tables of --out and stop")
    parser.add_argument("--jobs", default=",".join(JOBS), help="comma-separated, run in this order")
    parser.add_argument("--out", default=str(common.ROOT / "benchmarks" / "results" / "prune.jsonl"))
    args = parser.parse_args()
    if args.report:
        print(report(Path(args.out)))
        return
    common.setup_torch()
    out = Path(args.out)

    def log(row):
        row = {"time": time.strftime("%H:%M:%S"), **row}
        print(json.dumps(row), flush=True)
        common.append_result(out, row)

    model, tokenizer = common.load_reference()
    evaluation, calibration = common.windows(tokenizer, "quick")
    out.parent.mkdir(parents=True, exist_ok=True)
    windows_file = out.parent / "prune_windows.safetensors"
    save_file({"calibration": calibration.contiguous(), "evaluation": evaluation.contiguous()}, str(windows_file))
    del model
    options_of = {"50": {"sparsity": 0.5}, "2:4": {"pattern": "2:4"}}
    for job in args.jobs.split(","):
        name, _, variant = job.partition("-") if not job.startswith("llmc-") else ("llmc", "", job[5:])
        if job == "baseline-speed" or job == "baseline-ppl":
            model, _ = common.load_reference()
            row = {"method": "baseline", "options": {}, "parameters": common.unique_parameters(model)}
            if job == "baseline-speed":
                row.update({"forward_s": forward_latency(model, evaluation[:1]),
                            "gen_tokens_per_s": generation_speed(model, evaluation[:1, :32])})
            else:
                row["perplexity"] = common.perplexity(model, evaluation)
            log(row)
        elif job == "speed":
            speed_job(calibration, evaluation, log)
        elif job == "width":
            run_ours("prune-width", {"mlp_ratio": 0.25}, calibration, evaluation, log, structured_extra(evaluation))
        elif job == "depth":
            run_ours("prune-depth", {"layers": 4}, calibration, evaluation, log, structured_extra(evaluation))
        elif name in ("magnitude", "wanda", "sparsegpt"):
            run_ours(name, options_of[variant], calibration, evaluation, log)
        elif name == "llmc":
            method, _, level = variant.partition("-")
            mask = "0:0" if level == "50" else level
            proc = subprocess.run([str(LLMC_PYTHON), str(common.ROOT / "benchmarks" / "peers" / "llmc_prune.py"),
                                   str(common.reference_folder()), str(windows_file), method, mask],
                                  capture_output=True, text=True)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode or not lines:
                log({"method": f"llmc-{method}", "mask": mask, "error": proc.stderr[-2000:]})
            else:
                log(json.loads(lines[-1][len("RESULT "):]))
        else:
            raise SystemExit(f"unknown job {job!r}; jobs: {', '.join(JOBS)}")


if __name__ == "__main__":
    main()
