"""Quantization-aware recovery (``qat``, pocketlm-distill) on the reference model
(benchmarks/PROTOCOL.md, ``quick`` protocol).

One run, one process, in this order:

1. ``gptq``: GPTQ W4, group 32, symmetric, act-order, damp 0.01, ``grid = "weighted-mse"``, with
   the token embedding (tied with the head) quantized too (4-bit, group 32, the same grid rule),
   so that every matrix is a 4.5-bit Q4_0 block in the GGUF file. From pocketlm-gptq 0.6 the
   embedding and its tied head are solved as the head (``head = "solve"``, rows named
   ``gptq-solved-head...``); ``--head round`` rounds them to nearest as the rows named ``gptq...``
   did;
2. ``distill-ste`` (with ``--ste-steps N``): pocketlm-distill's ``distill`` with ``quantized =
   "ste"``: N steps of KL distillation from the original model on 1 window of 512 tokens each,
   training the weights through a straight-through estimator on their fixed grids (the integer
   codes re-rounded, the scales kept; the quantized embedding stays fixed), at ``--ste-lr``;
3. ``qat``: the block phase of ``qat`` on that model (``--epochs`` passes over the 32
   calibration windows per layer, micro-batches of ``--batch-size`` windows, ``--lr``);
4. ``qat-e2e`` (with ``--e2e-steps N``): the end-to-end phase on top of 3, N steps of KL
   distillation from the original model training only the scales (``--e2e-lr``), on windows of
   the calibration text (WikiText-2 validation); ``--e2e-windows N`` trains it on N windows of
   that text (``random.Random(0)``) instead of the 32 GPTQ calibrates on; ``--e2e-generated N``
   on N windows that the original model wrote itself (data-free, as LLM-QAT: a first token drawn
   uniformly from the vocabulary, then the model's own distribution sampled at temperature 1,
   seed 0: ``qat``'s ``e2e_generated_windows`` with ``e2e_generated_only``; saved in the stage
   folder), so the scales learn the model's distribution rather than one text's; ``--e2e-mix``
   trains on the calibration windows and the generated ones together (``e2e_generated_only``
   false). ``train_seconds`` includes the generation, reported alone as ``generate_seconds``.

``--mixed B`` replaces step 1 by pocketlm-mixed's allocation at B bits per weight (counted as the
GGUF file's bytes; the token embedding 4-bit or float16), run by GPTQ stages. ``--intermediate-size
N`` first removes MLP channels with pocketlm-prune's ``prune-width`` (N kept per layer): the way
below the 4.5 bits per weight that GGUF's 32-weight blocks set for rows of 576.
``--five-bit PATTERN ...`` runs a first ``gptq`` stage at 5 bits (Q5_0) on the matrices those
patterns select, and step 1 ignores them (rows named ``...-w5-w4``, or ``...-w5xN-w4`` for N
patterns of your own); ``--five-bit llamacpp``
stands for the k and v projections of every layer and the down projections of the layers
llama.cpp's own ``Q4_K_M`` widens (its ``use_more_bits``: the first and last eighth of the
layers and every third one between), 79.95 MB in all on the reference model.
``--calibration-samples N`` calibrates (and trains ``qat``) on N windows of the calibration text
(``random.Random(0)``, as a recipe's ``[calibration] samples``) instead of the quick protocol's 32.
``--calibration-generated N`` adds N windows the original model wrote itself to the calibration
windows, for every stage: GPTQ's Hessians (the head's too) and ``qat``'s training
windows (the recipe's ``[calibration] generated = N``; the same sampling as ``--e2e-generated``,
saved in ``--out`` and read back by a later run); rows are named ``...-calib-genN``.
``--embedding-bits B`` quantizes the embedding (and its tied head) on its own grid of B bits,
group 32, after GPTQ of the decoder: with ``rtn`` (rounded) or, with ``--embedding-method gptq``,
with a second ``gptq`` stage that solves it as the head (``--embedding-damp D``: that stage's own
dampening, rows named ``...-dampD``).

Each model is measured in memory on the first 32 x 512 windows of WikiText-2 test and of the
second-domain text (the Python Language Reference extract bundled with pocketlm-dynamic's tests,
which no stage trains or calibrates on), exported with the ``gguf`` exporter, and its file
compared matrix by matrix (gguf-py's dequantizer) with the in-memory model: when every matrix and
the token embedding are bit-identical, the in-memory perplexity is the file's.

Usage (heavy: run under the shared lock):
  flock /tmp/pocketlm-bench.lock nice -n 5 .venv/bin/python benchmarks/bench_recovery.py \
      [--epochs 2] [--lr 1e-4] [--batch-size 2] [--e2e-steps 0] [--out /tmp/pocketlm-recovery-bench] \
      [--reuse-reference] [--reuse-gptq] [--mixed 4.64] [--intermediate-size 704] [--e2e-windows 128] \
      [--ste-steps 64 --ste-lr 1e-5] [--e2e-generated 64 [--e2e-mix]] [--five-bit llamacpp] \
      [--calibration-samples 64] [--calibration-generated 64] [--embedding-bits 4 --embedding-method gptq \
      --embedding-damp 0.1]
Rows are appended to docs/bench/raw/bench_recovery.jsonl.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_gguf  # noqa: E402
import common  # noqa: E402

RESULTS = common.ROOT / "docs" / "bench" / "raw" / "bench_recovery.jsonl"
SECOND_DOMAIN = common.ROOT / "plugins" / "pocketlm-dynamic" / "tests" / "data" / "python-reference.txt"
# The layers whose down projection llama.cpp's Q4_K_M widens, for 30 layers (its use_more_bits:
# i < n/8, i >= 7n/8, or (i - n/8) % 3 == 2), written as module-name patterns.
LLAMACPP_WIDER = ["k_proj", "v_proj", "model.layers.[0-258].mlp.down_proj", "model.layers.1[147].mlp.down_proj",
                  "model.layers.2[03].mlp.down_proj", "model.layers.2[6-9].mlp.down_proj"]
GPTQ = dict(bits=4, group_size=32, symmetric=True, grid="weighted-mse", act_order=True, damp=0.01,
            ignore=["lm_head"])   # the default ignore list minus "embed": the embedding is quantized too


def log(message) -> None:
    print(time.strftime("%H:%M:%S"), message if isinstance(message, str) else json.dumps(message), flush=True)


def tensor_types(path: Path) -> dict[str, int]:
    from gguf import GGUFReader

    return dict(Counter(t.tensor_type.name for t in GGUFReader(path).tensors
                        if t.name.endswith(".weight") and "norm" not in t.name))


def embedding_identical(model, path: Path) -> bool:
    import numpy as np
    import torch
    from gguf import GGUFReader, dequantize

    tensor = next(t for t in GGUFReader(path).tensors if t.name == "token_embd.weight")
    values = dequantize(tensor.data, tensor.tensor_type).reshape(int(tensor.shape[1]), int(tensor.shape[0]))
    embedding = model.get_input_embeddings()
    ours = embedding.dequantize() if hasattr(embedding, "dequantize") else embedding.weight.detach()
    return bool(torch.equal(torch.from_numpy(np.ascontiguousarray(values)), ours))


def generated_windows(model, tokenizer, count: int, out: Path):
    """``count`` windows of ``common.SEQ_LEN`` tokens the original model writes (seed 0, as a
    recipe's ``[calibration] generated`` samples them), saved in ``out`` and read back."""
    from safetensors.torch import load_file, save_file

    from pocketlm import data

    path = out / f"calibration-generated-{count}.safetensors"
    if path.is_file():
        log(f"reusing the {count} generated windows in {path}")
        return load_file(path)["windows"]
    vocabulary = min(model.get_input_embeddings().num_embeddings, len(tokenizer))
    with common.Timer() as timer:
        windows = data.generate_windows(model, count, common.SEQ_LEN, vocabulary, 0)
    log(f"the original model wrote {count} windows of {common.SEQ_LEN} tokens in {timer.seconds:.0f} s")
    save_file({"windows": windows.contiguous()}, str(path))
    return windows


def measure(name: str, model, tokenizer, texts: dict, reference: dict, out: Path, stages: list[dict],
            extra: dict | None = None) -> dict:
    row: dict = {"row": name, "protocol": "quick", "eval_windows": 32, "seq_len": common.SEQ_LEN,
                 "calib_windows": 32, "seed": 0, "stages": stages}
    for text, windows in texts.items():
        row[text] = round(common.perplexity(model, windows), 3)
        if reference:
            row[f"retention_{text}"] = round(reference[text] / row[text], 4)
    if stages:
        recipe = {"model": {"source": "demo:smollm2-135m"}, "stages": stages, "export": {"format": "gguf"}}
        path, lines, seconds = bench_gguf.export(model, tokenizer, out / name, recipe)
        row.update(bench_gguf.compare_tensors(model, path))
        row["embedding_bit_identical"] = embedding_identical(model, path)
        row["tensor_types"] = tensor_types(path)
        row["files"] = {p.name: p.stat().st_size for p in sorted((out / name).iterdir()) if p.is_file()}
        row["export_bytes"] = sum(row["files"].values())
        row["export_mb"] = round(row["export_bytes"] / 1e6, 2)
        row["export_log"] = [line for line in lines if line.startswith("gguf:")]
    row.update(extra or {})
    log(row)
    common.append_result(RESULTS, row)
    return row


def main() -> None:
    import torch

    from pocketlm import data
    from pocketlm.plugins import get_plugins
    from pocketlm.testing import make_context

    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--e2e-steps", type=int, default=0)
    parser.add_argument("--e2e-lr", type=float, default=2e-5)
    parser.add_argument("--out", default="/tmp/pocketlm-recovery-bench")
    parser.add_argument("--reuse-reference", action="store_true",
                        help="take the float model's perplexities from the results file's last float32 row")
    parser.add_argument("--reuse-gptq", action="store_true",
                        help="load the GPTQ model an earlier run saved in --out (and skip its measurement)")
    parser.add_argument("--mixed", type=float, default=None, metavar="BITS_PER_WEIGHT",
                        help="start from pocketlm-mixed's allocation at this budget (GGUF bytes, the embedding "
                             "4-bit or float16) instead of uniform GPTQ W4 g32")
    parser.add_argument("--bits", type=int, default=4, help="GPTQ's width (5: every matrix exactly Q5_0)")
    parser.add_argument("--embedding-bits", type=int, default=None, metavar="B",
                        help="quantize the token embedding (and its tied head) with rtn at B bits, group 32 "
                             "(8: Q8_0, as llama.cpp's Q4_K_M writes it) instead of with GPTQ at --bits")
    parser.add_argument("--embedding-method", choices=["rtn", "gptq"], default="rtn",
                        help="with --embedding-bits: round the embedding (rtn) or solve it as the head (gptq)")
    parser.add_argument("--embedding-damp", type=float, default=None, metavar="D",
                        help="with --embedding-bits and --embedding-method gptq: the embedding stage's own "
                             "dampening (the other stages keep 0.01)")
    parser.add_argument("--head", choices=["solve", "round"], default="solve",
                        help="gptq's head option: solve a quantized (tied) head with GPTQ, or round it")
    parser.add_argument("--e2e-windows", type=int, default=None, metavar="N",
                        help="train the end-to-end phase on N windows of the calibration text (WikiText-2 "
                             "validation, random.Random(0)) instead of the 32 that GPTQ calibrates on")
    parser.add_argument("--intermediate-size", type=int, default=None, metavar="N",
                        help="first remove MLP channels with prune-width, keeping N per layer (the 10x point)")
    parser.add_argument("--e2e-generated", type=int, default=None, metavar="N",
                        help="train the end-to-end phase on N windows the original model generated")
    parser.add_argument("--e2e-mix", action="store_true",
                        help="with --e2e-generated: train on the calibration windows and the generated ones together")
    parser.add_argument("--ste-steps", type=int, default=0, metavar="N",
                        help="before qat, N steps of distill with quantized = \"ste\" (the weights re-rounded on "
                             "their fixed grids), 1 window each")
    parser.add_argument("--ste-lr", type=float, default=1e-5, help="distill's peak rate for --ste-steps")
    parser.add_argument("--five-bit", nargs="+", default=[], metavar="PATTERN",
                        help="quantize these matrices at 5 bits first, the rest at 4 (llamacpp: k and v projections "
                             "and the down projections llama.cpp's Q4_K_M widens)")
    parser.add_argument("--calibration-samples", type=int, default=32, metavar="N",
                        help="windows of the calibration text ([calibration] samples; the quick protocol's 32)")
    parser.add_argument("--calibration-generated", type=int, default=0, metavar="N",
                        help="every stage calibrates and trains on the calibration windows and N windows the original "
                             "model wrote ([calibration] generated = N)")
    args = parser.parse_args()
    if args.e2e_mix and not args.e2e_generated:
        parser.error("--e2e-mix mixes generated windows into the calibration ones: give --e2e-generated N too")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    common.setup_torch()
    model, tokenizer = common.load_reference()
    teacher = copy.deepcopy(model)
    evaluation, calibration = common.windows(tokenizer, "quick")
    sampled = {"calib_generated": args.calibration_generated} if args.calibration_generated else {}
    if args.calibration_samples != 32:
        calibration = data.calibration_windows(tokenizer, common.text_path(common.CALIB_TEXT), args.calibration_samples,
                                               common.SEQ_LEN, 0)
        sampled["calib_windows"] = args.calibration_samples
    if args.calibration_generated:
        calibration = torch.cat([calibration, generated_windows(teacher, tokenizer, args.calibration_generated, out)])
    texts = {"wikitext2": evaluation,
             "python_reference": data.evaluation_windows(tokenizer, SECOND_DOMAIN, 32, common.SEQ_LEN)}
    earlier = [json.loads(line) for line in RESULTS.read_text().splitlines()] if RESULTS.exists() else []
    earlier = [row for row in earlier if row.get("row") == "float32"]
    if args.reuse_reference and earlier:   # the float model's perplexities do not change between runs
        reference = earlier[-1]
        log(f"float32 perplexities from {RESULTS.name}: {reference['wikitext2']}, {reference['python_reference']}")
    else:
        reference = measure("float32", model, tokenizer, texts, {}, out, [])
    reference = {text: reference[text] for text in texts}

    plugins = get_plugins()
    start = "gptq" if args.mixed is None else f"mixed-{args.mixed:g}"
    if args.mixed is None and (args.bits != 4 or args.embedding_bits):
        start = f"gptq-w{args.bits}" + (f"-embed{args.embedding_bits}" if args.embedding_bits else "")
    solved = args.head == "solve" and args.mixed is None and (not args.embedding_bits or args.embedding_method == "gptq")
    if solved:   # the embedding solved as the head (pocketlm-gptq 0.6); rows without the suffix rounded it
        start = start.replace("gptq", "gptq-solved-head", 1)
    wider = LLAMACPP_WIDER if args.five_bit == ["llamacpp"] else args.five_bit
    if wider:   # llama.cpp's choice, or another list of matrices (named by how many it holds)
        start = start.replace("gptq", "gptq-w5-w4" if wider is LLAMACPP_WIDER else f"gptq-w5x{len(wider)}-w4", 1)
    if args.embedding_damp:
        start = f"{start}-damp{args.embedding_damp:g}"
    if args.calibration_samples != 32:
        start = f"{start}-calib{args.calibration_samples}"
    if args.calibration_generated:
        start = f"{start}-calib-gen{args.calibration_generated}"
    pruned = []
    if args.intermediate_size:
        width = plugins.methods["prune-width"]
        width_options = width.options(intermediate_size=args.intermediate_size)
        pruned = [{"method": "prune-width", **width_options.model_dump(exclude_defaults=True)}]
        start = f"width-{args.intermediate_size}-{start}"
        if not (args.reuse_gptq and (out / f"{start}-model.pt").is_file()):
            context = make_context(calibration, tokenizer=tokenizer, plugins=plugins)
            context.logger = log
            with torch.no_grad():
                width.compress(model, width_options, context)
    method = plugins.methods["gptq" if args.mixed is None else "mixed"]
    settings = dict(GPTQ, bits=args.bits, ignore=["lm_head", "embed"] if args.embedding_bits else ["lm_head"],
                    head=args.head)
    settings["ignore"] = settings["ignore"] + wider
    first = [method.options(**dict(GPTQ, bits=5, targets=wider))] if wider and args.mixed is None else []
    options = method.options(**settings) if args.mixed is None else method.options(
        bits_per_weight=args.mixed, embedding_bits=[4], ignore=["lm_head"])
    embedding = None
    if args.embedding_bits and args.mixed is None:   # the embedding on its own grid, as llama.cpp types it
        embedding = plugins.methods[args.embedding_method].options(
            bits=args.embedding_bits, group_size=32, symmetric=True, targets=["embed"], ignore=[],
            **(dict(grid="weighted-mse", head=args.head, damp=args.embedding_damp or GPTQ["damp"])
               if args.embedding_method == "gptq" else {}))
    context = make_context(calibration, tokenizer=tokenizer, plugins=plugins, stage_dir=out / f"{start}-stage")
    context.logger = log
    stages = pruned + [{"method": "gptq", **o.model_dump(exclude_defaults=True)} for o in first]
    stages += [{"method": method.name, **options.model_dump(exclude_defaults=True),
                **({"head": args.head} if args.mixed is None else {})}]   # head recorded: its default changed
    if embedding is not None:
        stages.append({"method": args.embedding_method, **embedding.model_dump(exclude_defaults=True),
                       **({"head": args.head} if args.embedding_method == "gptq" else {})})
    cached = out / f"{start}-model.pt"
    if args.reuse_gptq and cached.is_file():   # the same GPTQ result, saved by an earlier run of this script
        model = torch.load(cached, weights_only=False)
        log(f"{start} model loaded from {cached}")
    else:
        with common.Timer() as timer, torch.no_grad():
            for wide in first:   # the 5-bit matrices first; the main stage ignores them
                method.compress(model, wide, context)
            method.compress(model, options, context)
            if embedding is not None:
                plugins.methods[args.embedding_method].compress(model, embedding, context)
        torch.save(model, cached)
        measure(start, model, tokenizer, texts, reference, out, stages,
                {"gptq_seconds": round(timer.seconds, 1), **sampled})

    phases = [("distill", "distill-ste", dict(quantized="ste", steps=args.ste_steps, batch_size=1, lr=args.ste_lr,
                                               checkpoint_every=0))] if args.ste_steps else []
    if args.epochs:
        phases.append(("qat", "qat", dict(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size)))
    if args.e2e_steps:
        generated = dict(e2e_generated_windows=args.e2e_generated, e2e_generated_only=not args.e2e_mix) \
            if args.e2e_generated else {}
        phases.append(("qat", "qat-e2e", dict(epochs=0, e2e_steps=args.e2e_steps, e2e_lr=args.e2e_lr,
                                              checkpoint_every=0, **generated)))
    for method_name, name, settings in phases:
        phase = plugins.methods[method_name]
        phase_options = phase.options(**settings)
        name = name if start == "gptq" else f"{start}-{name}"
        if args.ste_steps and method_name == "qat":
            name = name.replace("qat", "ste-qat", 1)
        windows = calibration
        if name.endswith("e2e") and args.e2e_windows:   # more distinct windows of the same calibration text
            windows = data.calibration_windows(tokenizer, common.text_path(common.CALIB_TEXT), args.e2e_windows,
                                               common.SEQ_LEN, 0)
            name = f"{name}-{args.e2e_windows}w"
        if name.endswith("e2e") and args.e2e_generated:   # windows the original model writes (qat's option)
            name = f"{name}-gen{args.e2e_generated}" + ("-mix" if args.e2e_mix else "")
        stage_dir = out / f"{name}-stage"
        context = make_context(windows, tokenizer=tokenizer, teacher=teacher, plugins=plugins, stage_dir=stage_dir)
        messages = []
        context.logger = lambda message: (messages.append(message), log(message))
        with common.Timer() as timer:
            phase.compress(model, phase_options, context)
        stages = stages + [{"method": method_name, **phase_options.model_dump(exclude_defaults=True)}]
        extra = {"train_windows": len(windows), "train_seconds": round(timer.seconds, 1), **sampled}
        if args.e2e_generated and "-gen" in name:
            wrote = [re.search(r"the teacher wrote \d+ windows of \d+ tokens in (\d+) s", m) for m in messages]
            extra.update(train_text="generated by the original model" + (", after the calibration windows" if
                                                                         args.e2e_mix else ""),
                         train_windows=args.e2e_generated + (len(windows) if args.e2e_mix else 0),
                         generate_seconds=next((float(w.group(1)) for w in wrote if w), None))
        if method_name == "qat":
            summary = json.loads((stage_dir / "qat.json").read_text())
            extra.update(block_tokens=summary["block_tokens"], e2e_tokens=summary["e2e_tokens"],
                         layers=summary.get("layers", []))
        else:
            extra["ste_tokens"] = args.ste_steps * common.SEQ_LEN
        measure(name, model, tokenizer, texts, reference, out, stages, extra)


if __name__ == "__main__":
    main()
