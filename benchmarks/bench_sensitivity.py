"""Which matrices of the reference model to widen from 4 to 5 bits, by the KL change of the
model's output (benchmarks/PROTOCOL.md, reference model, seed 0).

For every decoder linear, and for 4 and 5 bits, the linear alone is rounded to a symmetric
32-weight grid (``absmax / 2^(bits-1)``, the grid of GGUF's Q4_0 and Q5_0 blocks) with every other
weight left in float, and the sensitivity is the mean KL divergence of the model's next-token
distribution from the original's over the measured tokens: ``--windows N`` windows of 512 tokens
of the calibration text (WikiText-2 validation, in the order ``[calibration] seed = 0`` draws them)
and N of the windows the original model writes itself (``[calibration] generated``, seed 0). Each
measurement runs the layers from the linear's own one to the head, from inputs recorded once.

The widths are then chosen as a knapsack (pocketlm-mixed's ``allocate``): widening a matrix
costs one bit per weight (Q5_0's 22-byte blocks against Q4_0's 18) and gains ``kl4 - kl5``;
the budget is the weights of the matrices llama.cpp's own ``Q4_K_M`` widens on this model
(``bench_recovery.py --five-bit llamacpp``), so the two choices cost the same bytes. The chosen
names are printed on one line, ready for ``bench_recovery.py --five-bit``; every measurement is
a row of ``docs/bench/raw/bench_sensitivity.jsonl``.

    python benchmarks/bench_sensitivity.py [--windows 1] [--out /tmp/pocketlm-recovery-bench]

``--out`` is where ``bench_recovery.py --calibration-generated 64`` keeps the generated windows
(``calibration-generated-64.safetensors``); they are written there when missing (about 5 to 7
minutes on 2 cores). About 10 minutes for the measurements at ``--windows 1``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import common
import torch

from bench_recovery import LLAMACPP_WIDER, generated_windows, log

RESULTS = common.ROOT / "docs" / "bench" / "raw" / "bench_sensitivity.jsonl"
GENERATED = 64   # the windows bench_recovery.py's --calibration-generated 64 samples


def round_symmetric(weight: torch.Tensor, bits: int, group_size: int = 32) -> torch.Tensor:
    """``weight`` rounded to a symmetric grid per ``group_size`` inputs, scale ``absmax / 2^(bits-1)``."""
    groups = weight.reshape(weight.shape[0], -1, group_size)
    top = 2 ** (bits - 1)
    scale = groups.abs().amax(-1, keepdim=True) / top
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return (torch.clamp(torch.round(groups / scale), -top, top - 1) * scale).reshape(weight.shape)


def kl_divergence(reference: torch.Tensor, log_probs: torch.Tensor) -> float:
    """Mean over tokens of ``KL(reference || log_probs)``, both log-probabilities."""
    return float((reference.exp() * (reference - log_probs)).sum(-1).mean())


def record_layer_inputs(model, windows: torch.Tensor) -> tuple[list, list, torch.Tensor]:
    """Each decoder layer's input and keyword arguments on ``windows``, and the output log-probabilities."""
    inputs, keywords = [], []

    def record(module, args, kwargs):
        inputs.append(args[0] if args else kwargs["hidden_states"])
        keywords.append({k: v for k, v in kwargs.items() if k != "hidden_states"})

    hooks = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in model.model.layers]
    try:
        logits = model(windows, use_cache=False).logits
    finally:
        for hook in hooks:
            hook.remove()
    return inputs, keywords, torch.log_softmax(logits.float(), -1)


def log_probs_from(model, index: int, hidden: torch.Tensor, keywords: list) -> torch.Tensor:
    """The output log-probabilities when layer ``index`` receives ``hidden``."""
    for layer, kwargs in zip(model.model.layers[index:], keywords[index:]):
        output = layer(hidden, **kwargs)
        hidden = output[0] if isinstance(output, tuple) else output
    return torch.log_softmax(model.lm_head(model.model.norm(hidden)).float(), -1)


def main() -> None:
    from pocketlm import data
    from pocketlm.modules import select_linears
    from pocketlm_mixed.mixed import allocate

    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=1, help="windows of each text (calibration, generated)")
    parser.add_argument("--out", default="/tmp/pocketlm-recovery-bench")
    args = parser.parse_args()
    common.setup_torch()
    torch.set_grad_enabled(False)
    model, tokenizer = common.load_reference()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = data.calibration_windows(tokenizer, common.text_path(common.CALIB_TEXT), 64, common.SEQ_LEN, 0)
    written = generated_windows(model, tokenizer, GENERATED, out)
    windows = torch.cat([text[:args.windows], written[:args.windows]])
    inputs, keywords, reference = record_layer_inputs(model, windows)

    rows, started = [], time.perf_counter()
    for index, layer in enumerate(model.model.layers):
        for name, linear in select_linears(layer, ["*"], []).items():
            weight = linear.weight.data
            row = {"linear": f"model.layers.{index}.{name}", "weights": weight.numel(),
                   "windows": f"{args.windows} calibration + {args.windows} generated", "seq_len": common.SEQ_LEN,
                   "group_size": 32, "seed": 0}
            for bits in (4, 5):
                linear.weight.data = round_symmetric(weight, bits)
                row[f"kl{bits}"] = kl_divergence(reference, log_probs_from(model, index, inputs[index], keywords))
            linear.weight.data = weight
            rows.append(row)
            common.append_result(RESULTS, row)
        log(f"layer {index} measured ({time.perf_counter() - started:.0f} s)")

    llamacpp = select_linears(model, LLAMACPP_WIDER, ["lm_head"])
    budget = sum(m.weight.numel() for m in llamacpp.values())
    unit = math.gcd(*[row["weights"] for row in rows])   # every cost a whole number of units: the optimum
    picks = allocate([[0, row["weights"]] for row in rows], [[row["kl4"], row["kl5"]] for row in rows],
                     budget, resolution=budget // unit)
    chosen = [row["linear"] for row, pick in zip(rows, picks) if pick == 1]

    def summed(wide) -> float:   # the independent-errors proxy the knapsack minimises
        return sum(row["kl5" if row["linear"] in wide else "kl4"] for row in rows)

    log(f"{len(chosen)} matrices widened, {sum(r['weights'] for r in rows if r['linear'] in chosen)} of {budget} "
        f"weights; summed KL {summed(set(chosen)):.4f} against {summed(llamacpp):.4f} for llama.cpp's choice")
    print(" ".join(chosen))


if __name__ == "__main__":
    main()
