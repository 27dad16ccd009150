"""Activation-sparsity benchmark on the reference model (quick protocol), see docs/bench/dynamic.md.

    # quality (no timing): thresholds calibrated on 32 x 512 WikiText-2 validation windows
    nice .venv/bin/python benchmarks/bench_dynamic.py quality --configs teal-greedy-40,teal-uniform-40,cats-uniform-40
    # decode speed (timing: under the lock), for configs whose thresholds the quality run saved
    flock /tmp/pocketlm-bench.lock .venv/bin/python benchmarks/bench_dynamic.py speed --configs teal-greedy-40
    nice .venv/bin/python benchmarks/bench_dynamic.py report

A config is ``MODE-ALLOCATION-PERCENT`` with an optional ``gptq-`` prefix (GPTQ W4, group 64,
first; thresholds calibrated on the quantized model; decode on its dequantized weights) and an
optional ``+kdN`` suffix: N steps of pocketlm-distill's ``distill`` after the thresholds, the
weights trained under them (KL to the original model's logits; ``--kd-lr``, ``--kd-batch``,
``--kd-windows`` distinct windows of the calibration text, ``--kd-generated`` more windows the
original model writes; ``--kd-windows 0``: only those, distill's ``generated_only``); the speed
job reads the distilled model the quality run saved. At PERCENT 0 the speed job runs the decode
path with every threshold at zero: its kernel against PyTorch's dense product, nothing skipped.

    nice .venv/bin/python benchmarks/bench_dynamic.py quality --configs teal-greedy-40+kd128 \
        --kd-batch 1 --kd-windows 64 --kd-generated 64

* quality: perplexity on the first 32 x 512 windows of WikiText-2 test and of a second domain
  (the Python Language Reference extract bundled in plugins/pocketlm-dynamic/tests/data, which
  no stage calibrates on); retention = baseline / compressed; the measured fraction of skipped
  input channels on the WikiText-2 windows (weighted by the weight bytes of each channel's
  column, the fraction decoding saves; and over the decoder's linears as a whole);
* speed: tokens per second of greedy generation at batch 1 (64 new tokens after a 32-token
  prompt), dense model against the same model with thresholds on the decode path, alternating,
  best of 3, 2 threads; ``--profile`` adds a torch.profiler table of one sparse generation and
  the bytes of weight read per token against the memory-bandwidth floor.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from pocketlm import data  # noqa: E402
from pocketlm.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from pocketlm.plugins import get_plugins  # noqa: E402
from pocketlm.testing import make_context  # noqa: E402
from pocketlm.weights import is_linear, linear_shape  # noqa: E402
from pocketlm_dynamic import decode, sparsity  # noqa: E402

RESULTS = common.ROOT / "benchmarks" / "results"
SECOND_DOMAIN = common.ROOT / "plugins" / "pocketlm-dynamic" / "tests" / "data" / "python-reference.txt"
GPTQ = {"bits": 4, "group_size": 64}


def parse_config(config: str) -> tuple[bool, dict, int]:
    """(GPTQ first?, activation-sparsity's options, distill steps after it: the ``+kdN`` suffix)."""
    config, _, recovery = config.partition("+")
    if recovery and not (recovery.startswith("kd") and recovery[2:].isdigit()):
        raise SystemExit(f"{recovery!r}: a config ends in +kdN (N steps of distill after the thresholds)")
    gptq = config.startswith("gptq-")
    parts = config.removeprefix("gptq-").split("-")
    rank = int(parts.pop()[1:]) if parts[-1].startswith("r") and parts[-1][1:].isdigit() else 0   # -r64: low_rank
    mode, *allocation, percent = parts  # teal-greedy-proxy-40 too
    options = {"mode": mode, "allocation": "-".join(allocation), "sparsity": int(percent) / 100}
    if rank:
        options["low_rank"] = rank
    return gptq, options, int(recovery[2:] or 0)


def gptq_model(model, calibration, log):
    """GPTQ W4 g64 of the reference model, cached as a core checkpoint (RESULTS/dynamic-gptq)."""
    folder = RESULTS / "dynamic-gptq-w4g64"
    if (folder / "pocketlm-modules.json").exists():
        return load_checkpoint(folder).model
    plugins = get_plugins()
    method = plugins.methods["gptq"]
    start = time.perf_counter()
    plugins.hook.compress(model=model, method=method, options=method.options(**GPTQ),
                          context=make_context(calibration, plugins=plugins))
    log({"job": "gptq", "options": GPTQ, "seconds": round(time.perf_counter() - start, 1)})
    save_checkpoint(model, None, folder)
    return model


def recover(model, teacher, steps: int, settings: dict, tokenizer, stage_dir, log) -> dict:
    """``steps`` of pocketlm-distill's ``distill`` on ``model`` with its thresholds in the forward
    pass (the weights learn to do without the skipped inputs; the thresholds stay), KL to
    ``teacher``'s logits, on ``settings["windows"]`` distinct windows of the calibration text and
    ``settings["generated"]`` more that the teacher writes (distill's ``generated_windows``)."""
    plugins = get_plugins()
    method = plugins.methods["distill"]
    only = settings["windows"] == 0   # the teacher's own text only: no domain of ours is favoured
    options = method.options(steps=steps, batch_size=settings["batch_size"], lr=settings["lr"], checkpoint_every=0,
                             generated_windows=settings["generated"], generated_only=only)
    windows = data.calibration_windows(tokenizer, common.text_path(common.CALIB_TEXT), max(settings["windows"], 1),
                                       common.SEQ_LEN, 0)
    context = make_context(windows, tokenizer=tokenizer, teacher=teacher, plugins=plugins, stage_dir=stage_dir)
    context.logger = lambda message: log({"job": "distill", "message": message})
    start = time.perf_counter()
    plugins.hook.compress(model=model, method=method, options=options, context=context)
    return {"distill": {"steps": steps, "batch_size": options.batch_size, "lr": options.lr,
                        "windows": 0 if only else int(windows.shape[0]), "generated_windows": settings["generated"],
                        "tokens": steps * options.batch_size * common.SEQ_LEN,
                        "seconds": round(time.perf_counter() - start, 1)}}


def calibrate(model, options: dict, calibration):
    plugins = get_plugins()
    method = plugins.methods["activation-sparsity"]
    plugins.hook.compress(model=model, method=method, options=method.options(**options),
                          context=make_context(calibration, plugins=plugins))
    return model


class SkipCounter:
    """Counts, on every thresholded module, the input (or output) entries the rule zeroes."""

    def __init__(self, model):
        self.zeroed, self.total, self.handles = {}, {}, []
        for name, (where, _) in sparsity.thresholds(model).items():
            module = dict(model.named_modules())[name]
            if where == sparsity.INPUT:
                self.handles.append(module.register_forward_pre_hook(self._input(name)))
            else:
                self.handles.append(module.register_forward_hook(self._output(name)))

    def _count(self, name, x, t):
        self.zeroed[name] = self.zeroed.get(name, 0) + int((x.abs() <= t).sum())
        self.total[name] = self.total.get(name, 0) + x.numel()

    def _input(self, name):
        return lambda module, args: self._count(name, args[0], module._buffers[sparsity.INPUT])

    def _output(self, name):
        def hook(module, args, output):
            self._count(name, output, module._buffers[sparsity.OUTPUT])
        return hook

    def close(self):
        for handle in self.handles:
            handle.remove()


def skipped(model, counter: SkipCounter) -> dict:
    """Fraction of thresholded input channels skipped, weighted by the weight bytes of their
    columns; the fraction of all decoder-linear weight bytes a decode step skips; and the mean
    fraction per projection (the last part of the module name), unweighted."""
    modules = dict(model.named_modules())
    decoder = sum(o * i for n, m in modules.items() if is_linear(m) and ".layers." in n for o, i in [linear_shape(m)])
    saved = weight = 0.0
    by_projection = {}   # q_proj, down_proj, ...: where the allocation put the sparsity
    for name, zeroed in counter.zeroed.items():
        fraction = zeroed / counter.total[name]
        by_projection.setdefault(name.rpartition(".")[2], []).append(fraction)
        target = name
        if sparsity.thresholds(model)[name][0] == sparsity.OUTPUT:  # CATS: the down projection's columns
            target = name.rpartition(".")[0] + ".down_proj"
        out_features, in_features = linear_shape(modules[target])
        saved += fraction * out_features * in_features
        weight += out_features * in_features
    return {"skipped_thresholded": saved / weight, "skipped_decoder": saved / decoder,
            "skipped_by_projection": {k: round(sum(v) / len(v), 4) for k, v in by_projection.items()}}


def quality(configs, log, recovery: dict):
    model, tokenizer = common.load_reference()
    evaluation, calibration = common.windows(tokenizer, "quick")
    second = data.evaluation_windows(tokenizer, SECOND_DOMAIN, 32, common.SEQ_LEN)
    assert second.shape == (32, common.SEQ_LEN), second.shape
    def baseline() -> dict:  # read when another run measured it already (runs may share the work)
        path = RESULTS / "dynamic-baseline.json"
        if path.exists():
            return json.loads(path.read_text())
        found = {"wikitext2": common.perplexity(model, evaluation), "python_reference": common.perplexity(model, second)}
        log({"job": "quality", "config": "dense", **found})
        path.write_text(json.dumps(found))
        return found

    gptq_base = None
    for config in configs:
        gptq, options, steps = parse_config(config)
        if gptq and gptq_base is None:
            gptq_base = gptq_model(copy.deepcopy(model), calibration, log)
            log({"job": "quality", "config": "gptq-dense", "wikitext2": common.perplexity(gptq_base, evaluation),
                 "python_reference": common.perplexity(gptq_base, second)})
        work = copy.deepcopy(gptq_base if gptq else model)
        start = time.perf_counter()
        calibrate(work, options, calibration)
        seconds = time.perf_counter() - start
        trained = {}
        if steps:   # the thresholds alone first: the row of the config without +kdN, from this calibration
            evaluate(work, config.partition("+")[0], options, gptq, seconds, {}, evaluation, second, baseline, log)
        if steps:   # the distilled model is saved for the speed job (thresholds in its manifest)
            # the stage folder keeps the windows the teacher wrote: runs with other steps reuse them
            base = config.partition("+")[0]
            stage = RESULTS / "dynamic-distill" / f"{base}-{recovery['windows']}w-gen{recovery['generated']}"
            trained = recover(work, model, steps, recovery, tokenizer, stage, log)
            save_checkpoint(work, None, RESULTS / "dynamic-distill" / config / "model")
        evaluate(work, config, options, gptq, seconds, trained, evaluation, second, baseline, log)
        del work


def evaluate(work, config, options, gptq, seconds, trained, evaluation, second, baseline, log):
    """Perplexity on both texts, the skipped fraction, the thresholds saved for the speed job."""
    counter = SkipCounter(work)
    wiki = common.perplexity(work, evaluation)
    counter.close()
    measured = skipped(work, counter)
    python = common.perplexity(work, second)
    base = baseline()
    table = {n: list(v) for n, v in sparsity.thresholds(work).items()}
    (RESULTS / "dynamic-thresholds").mkdir(parents=True, exist_ok=True)
    (RESULTS / "dynamic-thresholds" / f"{config}.json").write_text(json.dumps(table))
    factors = sum(a.numel() + b.numel() for a, b in sparsity.low_ranks(work).values())
    log({"job": "quality", "config": config, **options, "gptq": gptq, "calibration_s": round(seconds, 1), **trained,
         "wikitext2": wiki, "python_reference": python, "retention_wikitext2": base["wikitext2"] / wiki,
         "retention_python_reference": base["python_reference"] / python, **measured,
         **({"low_rank_factor_share": factors / decoder_weights(work)} if factors else {})})


def decoder_weights(model) -> int:
    return sum(o * i for n, m in model.named_modules() if is_linear(m) and ".layers." in n for o, i in [linear_shape(m)])


@torch.no_grad()
def generate_seconds(model, prompt) -> float:
    start = time.perf_counter()
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=64,
                         min_new_tokens=64, do_sample=False)
    seconds = time.perf_counter() - start
    assert out.shape[1] == prompt.shape[1] + 64
    return seconds


def speed(configs, log, rounds: int = 3, profile: bool = False, compiled: bool = True, calibration_windows: int = 0):
    model, tokenizer = common.load_reference()
    evaluation, calibration = common.windows(tokenizer, "quick")
    prompt = evaluation[:1, :32]
    for config in configs:
        gptq, options, steps = parse_config(config)
        if steps and calibration_windows:
            raise SystemExit(f"{config}: distilled weights come from a quality run; drop --calibration-windows")
        dense = gptq_model(copy.deepcopy(model), calibration, log) if gptq else model
        if gptq:  # the dense side of a GPTQ row runs the dequantized weights too
            from pocketlm.modules import dense_copy
            dense = dense_copy(dense)
        saved = RESULTS / "dynamic-thresholds" / f"{config}.json"
        sparse = copy.deepcopy(dense)
        if steps:   # the quality run's distilled weights and thresholds
            sparse = load_checkpoint(RESULTS / "dynamic-distill" / config / "model").model.eval()
        elif options["sparsity"] == 0:   # the decode path skipping nothing: its kernel against PyTorch's
            calibrate(sparse, {**options, "sparsity": 0.4}, calibration[:1])
            sparsity.install(sparse, {n: (where, 0.0) for n, (where, _) in sparsity.thresholds(sparse).items()})
        elif calibration_windows:  # speed only: thresholds from the first N calibration windows
            calibrate(sparse, options, calibration[:calibration_windows])
        else:
            table = json.loads(saved.read_text())
            sparsity.install(sparse, {n: tuple(v) for n, v in table.items()})
            for name in table if options.get("low_rank") and not steps else ():  # the factors: the weights' SVD
                sparsity.add_low_rank(sparse.get_submodule(name), options["low_rank"])
        counter = SkipCounter(sparse)
        with torch.no_grad():
            sparse(evaluation[:1])
        counter.close()
        measured = skipped(sparse, counter)
        decode.to_decode(sparse, compiled=compiled)
        for m in (dense, sparse):
            generate_seconds(m, prompt)  # warm-up
        best = {"dense": float("inf"), "sparse": float("inf")}
        for _ in range(rounds):  # alternating, so a busy moment hits both alike
            for name, m in (("dense", dense), ("sparse", sparse)):
                best[name] = min(best[name], generate_seconds(m, prompt))
        used = 0 if options["sparsity"] == 0 else calibration_windows or len(calibration)
        row = {"job": "speed", "config": config, "compiled": compiled, "rounds": rounds, "calibration_windows": used,
               **measured,
               "dense_tokens_per_s": 64 / best["dense"], "sparse_tokens_per_s": 64 / best["sparse"],
               "speedup": best["dense"] / best["sparse"]}
        if profile:
            row.update(profile_decode(dense, sparse, prompt))
        log(row)


def kernel_job(log, copies: int = 30, repeats: int = 20):
    """One matrix-vector product per reference-model shape: dense ``F.linear`` against the
    PyTorch gather (``index_select`` then product) and the compiled kernel, at 0/40/50% of the
    inputs skipped; 30 distinct matrices per shape so weights come from memory, best of 20."""
    import torch.nn.functional as F

    from pocketlm_dynamic import kernel

    fn = kernel.load()
    generator = torch.Generator().manual_seed(0)
    for in_features, out_features in ((576, 1536), (1536, 576), (576, 576), (576, 192)):
        weights = [torch.randn(out_features, in_features, generator=generator) for _ in range(copies)]
        transposed = [w.t().contiguous() for w in weights]
        x = torch.randn(in_features, generator=generator)
        for level in (0.0, 0.4, 0.5):
            t = sparsity.threshold_for(x.abs(), level)
            runs = {"dense": lambda: [F.linear(x, w) for w in weights],
                    "torch_gather": lambda: [decode.gather_matvec(x, w, t) for w in transposed]}
            if fn is not None:
                runs["compiled"] = lambda: [kernel.gather_matvec(fn, x, w, t) for w in transposed]
            best = {}
            for name, run in runs.items():
                run()
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    run()
                    times.append(time.perf_counter() - start)
                best[name + "_us"] = min(times) / copies * 1e6
            log({"job": "kernel", "shape": [out_features, in_features], "skipped": level, **best})


def bandwidth_gbs() -> float:
    """Measured read bandwidth: summing a 512 MB float32 tensor, best of 5."""
    big = torch.ones(128 * 1024 * 1024)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        big.sum()
        best = min(best, time.perf_counter() - start)
    return big.numel() * 4 / best / 1e9


def weight_bytes_per_token(model) -> float:
    total = 0.0
    for name, m in model.named_modules():
        if isinstance(m, decode.SparseDecodeLinear):
            total += m.weight_t.numel() * 4  # upper bound; the gather reads (1 - skipped) of it
        elif is_linear(m):
            out_features, in_features = linear_shape(m)
            total += out_features * in_features * 4
    return total


@torch.no_grad()
def profile_decode(dense, sparse, prompt) -> dict:
    from torch.profiler import ProfilerActivity, profile

    tables = {}
    for name, m in (("dense", dense), ("sparse", sparse)):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            m.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=64,
                       min_new_tokens=64, do_sample=False)
        tables[name] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    path = RESULTS / "dynamic-profile.txt"
    path.write_text("\n\n".join(f"== {k}\n{v}" for k, v in tables.items()))
    return {"bandwidth_gbs": bandwidth_gbs(), "dense_weight_bytes_per_token": weight_bytes_per_token(dense),
            "profile": "benchmarks/results/" + path.name}


def report() -> str:
    rows = [json.loads(line) for line in (RESULTS / "dynamic.jsonl").read_text().splitlines() if line.strip()]
    quality_rows = {r["config"]: r for r in rows if r.get("job") == "quality"}
    speed_rows = {r["config"]: r for r in rows if r.get("job") == "speed" and r.get("compiled", True)}
    lines = ["| config | WikiText-2 ppl | retention | Python ref. ppl | retention | skipped (thresholded) | "
             "skipped (decoder bytes) | dense tok/s | sparse tok/s | speed-up |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for config, r in quality_rows.items():
        s = speed_rows.get(config, {})
        cells = [config, f"{r['wikitext2']:.2f}", f"{r.get('retention_wikitext2', 1):.3f}", f"{r['python_reference']:.2f}",
                 f"{r.get('retention_python_reference', 1):.3f}",
                 f"{r['skipped_thresholded']:.1%}" if "skipped_thresholded" in r else "-",
                 f"{r['skipped_decoder']:.1%}" if "skipped_decoder" in r else "-",
                 f"{s['dense_tokens_per_s']:.1f}" if s else "-", f"{s['sparse_tokens_per_s']:.1f}" if s else "-",
                 f"{s['speedup']:.2f}x" if s else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("job", choices=["quality", "speed", "kernel", "report"])
    parser.add_argument("--configs", default="teal-greedy-40,teal-uniform-40,cats-uniform-40")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--torch-gather", action="store_true", help="decode with PyTorch operations, no C kernel")
    parser.add_argument("--calibration-windows", type=int, default=0,
                        help="speed: calibrate on the first N calibration windows instead of reading saved thresholds")
    parser.add_argument("--kd-lr", type=float, default=1e-4, help="quality, +kdN configs: distill's peak rate")
    parser.add_argument("--kd-batch", type=int, default=2, help="quality, +kdN configs: windows per distill step")
    parser.add_argument("--kd-windows", type=int, default=256,
                        help="quality, +kdN configs: distinct calibration-text windows distill trains on "
                        "(0: only the --kd-generated windows)")
    parser.add_argument("--kd-generated", type=int, default=0,
                        help="quality, +kdN configs: this many more windows the original model writes, "
                        "after the text's")
    args = parser.parse_args()
    if args.job == "report":
        print(report())
        return
    common.setup_torch()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "dynamic.jsonl"

    def log(row):
        row = {"time": time.strftime("%H:%M:%S"), **row}
        print(json.dumps(row), flush=True)
        common.append_result(out, row)

    configs = args.configs.split(",")
    if args.job == "kernel":
        kernel_job(log)
    elif args.job == "quality":
        quality(configs, log, {"lr": args.kd_lr, "batch_size": args.kd_batch, "windows": args.kd_windows,
                                 "generated": args.kd_generated})
    else:
        speed(configs, log, args.rounds, args.profile, compiled=not args.torch_gather,
              calibration_windows=args.calibration_windows)


if __name__ == "__main__":
    main()
