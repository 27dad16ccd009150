"""How far one run's retrieval share can be trusted: a paired bootstrap over the retrieval pairs.

The ``retrieval`` evaluator scores recall@1 and MRR@10 on 500 (query, passage) pairs of
WikiText-2 test, and the encoder benchmarks report a compressed model's score as a share of the
original's on the same pairs. This script scores a pocketlm ONNX export in ONNX Runtime and the
original (all-MiniLM-L6-v2) in memory on those pairs, then resamples the pairs with replacement
(the same draw for both models, so what the two get right together cancels) and prints the share's
point value and its 90% and 95% intervals, for recall@1 and MRR@10.

    python benchmarks/retrieval_interval.py RUN/export [--pairs 500] [--draws 5000] [--seed 0]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def per_pair(ranks: torch.Tensor) -> dict[str, np.ndarray]:
    """Each pair's hit at 1 and reciprocal rank within 10: their means are recall@1 and MRR@10."""
    ranks = ranks.double().numpy()
    return {"recall_at_1": (ranks <= 1).astype(float), "mrr_at_10": np.where(ranks <= 10, 1.0 / ranks, 0.0)}


def share_interval(ours: np.ndarray, theirs: np.ndarray, draws: int, seed: int) -> dict[str, float]:
    """The share ``sum(ours) / sum(theirs)`` and its paired-bootstrap percentile intervals."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(ours), size=(draws, len(ours)))
    shares = ours[picks].sum(1) / theirs[picks].sum(1)
    low90, high90, low95, high95 = np.percentile(shares, [5, 95, 2.5, 97.5])
    return {"share": round(float(ours.sum() / theirs.sum()), 4), "interval_90": [round(low90, 4), round(high90, 4)],
            "interval_95": [round(low95, 4), round(high95, 4)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", type=Path, help="a pocketlm ONNX export of the compressed encoder")
    parser.add_argument("--pairs", type=int, default=500)
    parser.add_argument("--draws", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from pocketlm import data, sentence
    from pocketlm.builtins.encoder_evaluators import retrieval_pairs, retrieval_ranks
    from pocketlm_onnx import runtime

    from bench_encoders import original_encoder

    original, tokenizer = original_encoder()
    pairs = retrieval_pairs(data.read_text(data.resolve_text(data.DEFAULT_EVALUATION_TEXT)), args.pairs)
    queries, passages = [q for q, _ in pairs], [p for _, p in pairs]
    ort_session = runtime.inference_session(args.export)
    ours = per_pair(retrieval_ranks(torch.from_numpy(runtime.embed(ort_session, tokenizer, queries)),
                                    torch.from_numpy(runtime.embed(ort_session, tokenizer, passages))))
    theirs = per_pair(retrieval_ranks(sentence.embed(original, tokenizer, queries),
                                      sentence.embed(original, tokenizer, passages)))
    result = {"export": str(args.export), "pairs": len(pairs), "draws": args.draws, "seed": args.seed}
    for metric in ("recall_at_1", "mrr_at_10"):
        result[metric] = {"ours": round(float(ours[metric].mean()), 4),
                          "original": round(float(theirs[metric].mean()), 4),
                          **share_interval(ours[metric], theirs[metric], args.draws, args.seed)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
