"""Encoder distillation: a sentence encoder cut to half its layers, then distilled from itself.

    python benchmarks/bench_encoder_distill.py MODEL_FOLDER --steps 300 --lr 2e-4 --batch-size 32

MODEL_FOLDER is a sentence-transformers folder (all-MiniLM-L6-v2, say). The student is the
model with ``student_layers`` kept (default half the layers, spread, 6 -> 3 for MiniLM), trained with
``distill``'s encoder defaults (cosine between pooled sentence embeddings) on WikiText-2
validation. Reported on held-out WikiText-2 test text, before and after distillation:

* ``cosine``: mean cosine of the student's sentence embeddings with the teacher's, over the
  first ``--sentences`` sentences of 8 words or more;
* ``retrieval``: each paragraph's first sentence is a query, the rest of the paragraph its
  passage, ranked among every paragraph's passage; top-1 accuracy and MRR, and the student's
  MRR as a share of the teacher's.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

from pocketlm import data
from pocketlm.plugins import get_plugins
from pocketlm.sentence import embed
from pocketlm.testing import make_context
from pocketlm_distill import DistillOptions, distill
from pocketlm_distill.encoder import _SENTENCE_END, paragraphs


def held_out(sentence_count: int, passage_count: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Sentences (8 words or more) and (first sentence, rest) pairs of the test text's paragraphs."""
    text = data.read_text(data.resolve_text(data.DEFAULT_EVALUATION_TEXT))
    sentences, pairs = [], []
    for paragraph in paragraphs(text):
        parts = _SENTENCE_END.split(paragraph)
        sentences.extend(s for s in parts if len(s.split()) >= 8)
        if len(parts) >= 3 and len(pairs) < passage_count:
            pairs.append((parts[0], " ".join(parts[1:])))
    return sentences[:sentence_count], pairs


def retrieval(model, tokenizer, pairs: list[tuple[str, str]]) -> dict[str, float]:
    queries = torch.nn.functional.normalize(embed(model, tokenizer, [q for q, _ in pairs]), dim=-1)
    passages = torch.nn.functional.normalize(embed(model, tokenizer, [p for _, p in pairs]), dim=-1)
    scores = queries @ passages.T
    ranks = (scores > scores.diagonal().unsqueeze(1)).sum(1) + 1  # rank of the true passage
    return {"top1": (ranks == 1).float().mean().item(), "mrr": (1.0 / ranks.float()).mean().item()}


def fidelity(student, teacher_vectors: torch.Tensor, tokenizer, sentences: list[str]) -> float:
    vectors = embed(student, tokenizer, sentences)
    return torch.nn.functional.cosine_similarity(vectors, teacher_vectors, dim=-1).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", default="spread", help="'spread' or indices, e.g. 0,2,5")
    parser.add_argument("--hidden-weight", type=float, default=0.0)
    parser.add_argument("--sentences", type=int, default=200)
    parser.add_argument("--passages", type=int, default=300)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = get_plugins().hook.load_model(source=args.model, options=None, context=make_context())
    teacher, tokenizer = loaded.model.float().eval(), loaded.tokenizer
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    student = copy.deepcopy(teacher)
    sentences, pairs = held_out(args.sentences, args.passages)
    teacher_vectors = embed(teacher, tokenizer, sentences)
    layers = args.layers if args.layers == "spread" else [int(i) for i in args.layers.split(",")]
    options = DistillOptions(text=data.DEFAULT_CALIBRATION_TEXT, steps=args.steps, lr=args.lr,
                             batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed,
                             student_layers=layers, hidden_weight=args.hidden_weight, checkpoint_every=0)
    with tempfile.TemporaryDirectory() as folder:
        context = make_context(tokenizer=tokenizer, teacher=teacher, stage_dir=Path(folder) / "stage")
        context.logger = print
        # the student before training: the same layers, no steps (measured on a copy)
        untrained = copy.deepcopy(student)
        from pocketlm_distill.distill import make_student_layers

        make_student_layers(untrained, teacher, options, context)
        before = {"cosine": fidelity(untrained, teacher_vectors, tokenizer, sentences),
                  **retrieval(untrained, tokenizer, pairs)}
        began = time.perf_counter()
        distill(student, options, context)
        seconds = time.perf_counter() - began
        curve = (Path(folder) / "stage" / "loss.csv").read_text().splitlines()
    after = {"cosine": fidelity(student, teacher_vectors, tokenizer, sentences), **retrieval(student, tokenizer, pairs)}
    reference = retrieval(teacher, tokenizer, pairs)
    result = {"settings": vars(args), "distill_seconds": round(seconds, 1), "teacher": reference,
              "before": before, "after": after,
              "mrr_share_before": before["mrr"] / reference["mrr"], "mrr_share_after": after["mrr"] / reference["mrr"],
              "loss_first_last": [curve[1], curve[-1]]}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
