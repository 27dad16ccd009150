"""How well a distilled encoder fits its teacher on the text it trained on against held-out text.

The student of an encoder recipe (``texts = "pairs"``) learns the original's sentence embeddings
on (query, passage) pairs of WikiText-2 validation. This script embeds pairs of that training text
and pairs of WikiText-2 test (the evaluation text) with a pocketlm ONNX export in ONNX Runtime and
with the original in memory, and prints the mean cosine of the two on each: a large gap says the
student memorized its training texts rather than learned the teacher's function, so more or
other text, not more steps, is what would lift it.

    python benchmarks/encoder_fit_gap.py RUN/export [--pairs 150] [--seed 0]

Pairs: every sentence of each paragraph in turn against the rest of it (``queries = "every"``),
``--pairs`` of them drawn with ``--seed`` from each text, both sides embedded at up to 128 tokens
(the recipes' training length). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np


def drawn_pairs(text: str, count: int, seed: int) -> list[tuple[str, str]]:
    from pocketlm_distill.encoder import query_passage_pairs

    pairs = query_passage_pairs(text, every_sentence=True)
    return random.Random(seed).sample(pairs, min(count, len(pairs)))


def mean_cosines(student: np.ndarray, teacher: np.ndarray) -> np.ndarray:
    student = student / np.linalg.norm(student, axis=1, keepdims=True)
    teacher = teacher / np.linalg.norm(teacher, axis=1, keepdims=True)
    return (student * teacher).sum(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", type=Path, help="a pocketlm ONNX export of the distilled encoder")
    parser.add_argument("--pairs", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()

    from pocketlm import data, sentence
    from pocketlm_onnx import runtime

    from bench_encoders import original_encoder

    original, tokenizer = original_encoder()
    ort_session = runtime.inference_session(args.export)
    result = {"export": str(args.export), "pairs": args.pairs, "seed": args.seed, "max_length": args.max_length}
    for name, source in (("training", data.DEFAULT_CALIBRATION_TEXT), ("held_out", data.DEFAULT_EVALUATION_TEXT)):
        pairs = drawn_pairs(data.read_text(data.resolve_text(source)), args.pairs, args.seed)
        for side, texts in (("queries", [q for q, _ in pairs]), ("passages", [p for _, p in pairs])):
            ours = np.asarray(runtime.embed(ort_session, tokenizer, texts, max_length=args.max_length))
            theirs = sentence.embed(original, tokenizer, texts, max_length=args.max_length).numpy()
            result[f"{name}_{side}_cosine"] = round(float(mean_cosines(ours, theirs).mean()), 4)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
