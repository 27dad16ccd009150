"""Benchmark of pocketlm-distill: recovering a width-pruned SmolLM2-135M.

1. reference model (quick protocol perplexity);
2. remove 25% of the MLP channels of every layer: the ``prune-width`` method of pocketlm-prune
   when it is registered (``mlp_ratio=0.25``), else a magnitude-based structured removal done
   here (score of channel c = ||W_gate[c]|| * ||W_up[c]|| * ||W_down[:, c]||);
3. a short timing probe sets the step count N that fits the CPU budget for KD;
4. KD: N steps of ``distill`` (KL on logits, T=1, teacher = the unpruned reference);
   with ``--teacher-correction-steps M`` a copy of the teacher is first fine-tuned with CE for
   M steps on the same text (Minitron's teacher correction; label "KD+TC", its time counted in
   the KD run's train_s);
5. CE: the same N steps, same windows, same optimizer and schedule, cross-entropy only
   (``kl_weight=0, ce_weight=1``: no teacher); optionally CE for the same wall time (more steps).

Training text: WikiText-2 *validation* (the calibration split), all non-overlapping 512-token
windows, shuffled with the seed; evaluation: the quick protocol on WikiText-2 test (``--eval full``
adds the full protocol's 128 windows, from the same pass). ``--seeds 0,1`` repeats steps 4-5 for
each seed (window order and training RNG), the pruned model being the same.

    flock /tmp/pocketlm-bench.lock nice -n 5 .venv/bin/python benchmarks/bench_distill.py --budget-s 480
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import _protocol  # noqa: E402

from pocketlm.modules import get_module  # noqa: E402
from pocketlm.plugins import get_plugins  # noqa: E402
from pocketlm.testing import make_context  # noqa: E402

QUICK_WINDOWS = 32  # the quick protocol's evaluation windows: the first 32 of the full protocol's 128
RESULTS = common.ROOT / "benchmarks" / "results" / "bench_distill.jsonl"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@torch.no_grad()
def magnitude_width_prune(model, architecture, ratio: float) -> None:
    """Physically remove ``ratio`` of the MLP channels of every layer, lowest magnitude first."""
    layers = get_module(model, architecture.layers)
    keep = None
    for layer in layers:
        ins = [get_module(layer, name) for name in architecture.mlp_in]
        out = get_module(layer, architecture.mlp_out)
        score = out.weight.norm(dim=0)
        for linear in ins:
            score = score * linear.weight.norm(dim=1)
        keep = round(score.numel() * (1 - ratio))
        kept = score.topk(keep).indices.sort().values
        for linear in ins:
            linear.weight = torch.nn.Parameter(linear.weight[kept].clone())
            linear.out_features = keep
        out.weight = torch.nn.Parameter(out.weight[:, kept].clone())
        out.in_features = keep
    setattr(model.config, architecture.intermediate_size_key, keep)


def prune(model, tokenizer, calibration, ratio: float) -> str:
    plugins = get_plugins()
    method = plugins.methods.get("prune-width")
    if method is not None:
        try:
            result = method.compress(model, method.options(mlp_ratio=ratio),
                                     make_context(calibration, tokenizer=tokenizer, plugins=plugins))
            assert result is None or result is model, "prune-width returned a new model object"
            return f"prune-width (pocketlm-prune) mlp_ratio={ratio}"
        except Exception as exc:  # noqa: BLE001 - fall back, and say so
            log(f"prune-width failed ({type(exc).__name__}: {exc}); using the benchmark's own removal")
    magnitude_width_prune(model, make_context(plugins=plugins).architecture(model), ratio)
    return f"magnitude structured MLP-channel removal in the benchmark script, ratio={ratio}"


def run_distill(student, teacher, tokenizer, calibration, text, stage: Path, **options):
    from pocketlm_distill import DistillOptions, distill

    opts = DistillOptions(text=str(text), seq_len=common.SEQ_LEN, checkpoint_every=0, **options)
    context = make_context(calibration, tokenizer=tokenizer, teacher=teacher, stage_dir=stage, seed=0)
    context.logger = log
    with common.Timer() as timer:
        distill(student, opts, context)
    rows = list(csv.DictReader(open(stage / "loss.csv")))
    return timer.seconds, rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget-s", type=float, default=480.0, help="CPU seconds of KD training")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--kd-ce-weight", type=float, default=0.0,
                        help="weight of the label cross-entropy in the KD run (Hinton et al. mix soft and "
                             "hard targets; 0 = logits KL only)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--teacher-correction-steps", type=int, default=0,
                        help="KD run only: CE steps on a copy of the teacher before distilling (Minitron's "
                             "teacher correction; 0 = off). Its time is part of the KD run's train_s but not "
                             "of the step-count probe or the --finish-by budget")
    parser.add_argument("--seeds", default="0",
                        help="comma-separated seeds: each one orders the training windows and seeds the training "
                             "RNG, and gets its own KD and CE runs (the two runs of one seed see the same windows)")
    parser.add_argument("--eval", choices=["quick", "full"], default="quick",
                        help="full: also report the full protocol's perplexity (128 test windows, which "
                             "begin with the quick protocol's 32; one pass gives both)")
    parser.add_argument("--steps", type=int, default=None, help="skip the probe and use this many steps")
    parser.add_argument("--ce-equal-time", action="store_true", help="also run CE for the KD wall time")
    parser.add_argument("--no-ce", action="store_true", help="KD only (the CE row of an earlier run with the "
                                                             "same steps, seed and windows stands)")
    parser.add_argument("--out", type=Path, default=common.ROOT / "benchmarks" / "results" / "distill")
    parser.add_argument("--finish-by", default=None,
                        help="UTC HH:MM by which the run must end: shrinks the budget (and drops the "
                             "equal-time CE run) when the run starts late; the budget used is recorded")
    args = parser.parse_args()
    started = time.time()
    if args.finish_by:
        hour, minute = map(int, args.finish_by.split(":"))
        now = time.gmtime(started)
        left = ((hour * 60 + minute) - (now.tm_hour * 60 + now.tm_min)) % (24 * 60) * 60 - now.tm_sec
        overhead = 600  # loading, 4 quick evaluations, pruning and the timing probe
        runs = 2.0 + (0.8 if args.ce_equal_time else 0)  # KD, CE (~0.7x KD's time), CE for KD's time
        fit = (left - overhead) / runs
        if args.ce_equal_time and fit < args.budget_s:
            args.ce_equal_time = False
            fit = (left - overhead) / 2.0
        if fit < args.budget_s:
            log(f"{left / 60:.0f} min left before {args.finish_by}: KD budget {args.budget_s:.0f} s -> {max(fit, 60):.0f} s")
            args.budget_s = max(fit, 60.0)

    common.setup_torch()
    model, tokenizer = common.load_reference()
    evaluation, calibration = common.windows(tokenizer, "quick")
    text = common.text_path(common.CALIB_TEXT)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def record(row):
        row = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **row}
        rows.append(row)
        common.append_result(RESULTS, row)
        log(json.dumps(row))

    if args.eval == "full":
        evaluation = common.windows(tokenizer, "full")[0]
    seeds = [int(seed) for seed in args.seeds.split(",")]

    def measure(model) -> dict:
        nll = _protocol.window_nll(model, evaluation)  # one pass: the quick windows are the first 32
        scores = {"perplexity": _protocol.perplexity_of(nll[:QUICK_WINDOWS], common.SEQ_LEN)}
        if args.eval == "full":
            scores["perplexity_full"] = _protocol.perplexity_of(nll, common.SEQ_LEN)
        return scores

    def quality(scores: dict) -> dict:
        """Retention and the share of the pruning loss recovered, for each protocol measured."""
        out = {}
        for key, value in scores.items():
            suffix = key[len("perplexity"):]
            out["retention" + suffix] = base[key] / value
            out["recovered" + suffix] = (pruned[key] - value) / (pruned[key] - base[key])
        return out

    base = measure(model)
    base_ppl = base["perplexity"]
    record({"model": "reference (unpruned)", **base})
    teacher = copy.deepcopy(model).eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)

    with common.Timer() as timer:
        how = prune(model, tokenizer, calibration, args.ratio)
    params = sum(p.numel() for p in model.parameters())
    pruned = measure(model)
    record({"model": "pruned", "how": how, **pruned, "params": params,
            "intermediate_size": model.config.intermediate_size, "prune_s": timer.seconds})
    pruned_state = {k: v.clone() for k, v in model.state_dict().items()}

    train = dict(batch_size=args.batch_size, lr=args.lr, warmup_steps=2)
    steps = args.steps
    if steps is None:  # timing probe: 3 KD steps, the first one (set-up) dropped
        with tempfile.TemporaryDirectory() as folder:
            probe = copy.deepcopy(model)
            _, probe_rows = run_distill(probe, teacher, tokenizer, calibration, text, Path(folder), steps=3, **train)
            del probe
        per_step = sum(float(r["seconds"]) for r in probe_rows[1:]) / 2
        steps = max(4, int(args.budget_s / per_step))
        log(f"probe: {per_step:.1f} s a KD step -> {steps} steps in {args.budget_s:.0f} s")
    tokens = steps * args.batch_size * common.SEQ_LEN

    results = {}
    kd = dict(kl_weight=1.0, ce_weight=args.kd_ce_weight, temperature=args.temperature,
              teacher_correction_steps=args.teacher_correction_steps)
    kd_name = "KD" if not args.teacher_correction_steps else f"KD+TC({args.teacher_correction_steps})"
    kd_name += "" if not args.kd_ce_weight else f" (KL + {args.kd_ce_weight:g} CE)"
    kd_name += "" if args.temperature == 1.0 else f" T={args.temperature:g}"
    runs = [(kd_name, kd)] + ([] if args.no_ce else [("CE", dict(kl_weight=0.0, ce_weight=1.0))])
    for seed in seeds:
        for name, extra in runs:
            name += "" if seed == 0 else f" seed {seed}"
            model.load_state_dict(pruned_state)
            seconds, history = run_distill(model, teacher, tokenizer, calibration, text, args.out / name,
                                           steps=steps, seed=seed, **train, **extra)
            scores = measure(model)
            results["CE" if name.startswith("CE") else "KD"] = seconds
            record({"model": f"pruned + {name}", **scores, "steps": steps, "tokens": tokens, **extra,
                    "budget_s": args.budget_s, "train_s": seconds, "first_loss": float(history[0]["loss"]),
                    "last_loss": float(history[-1]["loss"]), **quality(scores), **train, "seed": seed})
    if args.ce_equal_time:
        ce_steps = int(steps * results["KD"] / results["CE"])
        model.load_state_dict(pruned_state)
        seconds, history = run_distill(model, teacher, tokenizer, calibration, text, args.out / "CE-time",
                                       steps=ce_steps, seed=seeds[-1], **train, kl_weight=0.0, ce_weight=1.0)
        scores = measure(model)
        record({"model": "pruned + CE (KD's wall time)", **scores, "steps": ce_steps,
                "tokens": ce_steps * args.batch_size * common.SEQ_LEN, "train_s": seconds, **quality(scores),
                **train, "seed": seeds[-1]})

    print("\n| model | perplexity (quick) | perplexity (full) | retention | recovered | steps | tokens | train s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['model']} | {row['perplexity']:.2f} | {row.get('perplexity_full', float('nan')):.2f} | "
              f"{base_ppl / row['perplexity']:.3f} | {row.get('recovered', float('nan')):.3f} | "
              f"{row.get('steps', '')} | {row.get('tokens', '')} | {row.get('train_s', 0):.0f} |")
    log(f"peak RSS {common.peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
