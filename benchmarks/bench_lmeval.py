"""Downstream accuracy offline: a WikiText-2 cloze task through lm-eval, on the reference model
before and after GPTQ W4 g64, next to KL divergence and top-1 agreement on WikiText-2 test.

The task (``wikicloze``) is built from the core's bundled WikiText-2 test text (CC BY-SA 3.0,
Merity et al., 2016), deterministically:

1. paragraphs are the text's lines that are not headings (`` = Title = ``) or blank;
2. sentences are cut at `` . `` (the raw text spaces its punctuation); a sentence qualifies when
   it has 8 to 40 words and its last word (before the full stop) is alphabetic and at least 4
   letters long;
3. the question is the sentence without its last word; the right answer is that word, the three
   distractors are last words of other qualifying sentences, drawn with ``random.Random(0)``, all
   different;
4. ``QUESTIONS`` questions are drawn with ``random.Random(0).sample`` over the qualifying
   sentences; the answer's position among the four choices is drawn from the same generator.

lm-eval scores each choice by its summed log-likelihood after the question (``acc``), and by
that sum divided by the choice's length in bytes (``acc_norm``). Chance is 25%.

    nice .venv/bin/python benchmarks/bench_lmeval.py [--questions 100] [--out runs/bench-lmeval]

(quality only and under 4 GB of memory, so it needs no benchmark lock; its seconds are not a
timing figure).

Prints a markdown table and writes ``--out``/summary.json. Calibration follows
the ``quick`` protocol of benchmarks/PROTOCOL.md.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

from pocketlm import data

TASK_YAML = """task: wikicloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: wikicloze.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def cloze_questions(text: str, count: int, seed: int = 0) -> list[dict]:
    """The ``wikicloze`` questions (see the module docstring for the construction)."""
    candidates = []  # sentence words
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        sentences = [s.strip() for s in re.split(r" \. ", line + " ") if s.strip()]
        for sentence in sentences:
            words = sentence.split()
            if 8 <= len(words) <= 40 and words[-1].isalpha() and len(words[-1]) >= 4:
                candidates.append(words)
    rng = random.Random(seed)
    picked = rng.sample(range(len(candidates)), count)
    endings = sorted({words[-1] for words in candidates})
    questions = []
    for number in picked:
        words = candidates[number]
        answer = words[-1]
        distractors = []
        while len(distractors) < 3:
            word = rng.choice(endings)
            if word != answer and word not in distractors:
                distractors.append(word)
        label = rng.randrange(4)
        choices = distractors[:label] + [answer] + distractors[label:]
        questions.append({"context": " ".join(words[:-1]), "choices": [" " + c for c in choices], "label": label})
    return questions


def write_task(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = data.read_text(data.resolve_text("builtin:wikitext-2-test"))
    (folder / "wikicloze.yaml").write_text(TASK_YAML)
    with open(folder / "wikicloze.jsonl", "w", encoding="utf-8") as handle:
        for question in cloze_questions(text, count):
            handle.write(json.dumps(question) + "\n")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--questions", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-lmeval"))
    args = parser.parse_args()

    import pocketlm

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import common

    common.setup_torch()  # seed 0, 2 threads (POCKETLM_BENCH_THREADS=1 to share the cores)
    tasks = write_task(args.out / "tasks", args.questions)
    recipe = {
        "model": {"source": "demo:smollm2-135m"},
        "calibration": {"text": "builtin:wikitext-2-valid", "samples": 32, "seq_len": 512, "seed": 0},
        "stages": [{"method": "gptq", "bits": 4, "group_size": 64}],
        # the distance from the original is measured once, after the stage (before it, it is 0)
        # perplexity of this recipe is in the gptq section; here the downstream task and the
        # distance from the original (measured once, after the stage: before it, it is 0)
        "evaluate": {"metrics": ["lm-eval"], "per_stage": ["kl-divergence", "top1-agreement"],
                     "kl-divergence": {"windows": 8, "seq_len": 512},
                     "top1-agreement": {"windows": 8, "seq_len": 512},
                     "lm-eval": {"tasks": ["wikicloze"], "include_path": str(tasks.resolve()), "batch_size": 16,
                                 "recovery": False}},
    }
    start = time.time()
    result = pocketlm.run(recipe, run_dir=args.out / "run", overwrite=True)
    after = {**result.report["stages"][0]["metrics"], **result.after}
    before = {**result.before, "kl_divergence": 0.0, "top1_agreement": 1.0}
    summary = {"questions": args.questions, "before": before, "after": after, "seconds": time.time() - start}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    rows = [("wikicloze acc", "wikicloze:acc", "{:.1%}"),
            ("wikicloze acc_norm", "wikicloze:acc_norm", "{:.1%}"), ("KL divergence (8 x 512)", "kl_divergence", "{:.4f}"),
            ("top-1 agreement (8 x 512)", "top1_agreement", "{:.1%}")]
    print("| metric | original | GPTQ W4 g64 |\n|---|---|---|")
    for label, key, fmt in rows:
        print(f"| {label} | {fmt.format(before[key])} | {fmt.format(after[key])} |")
    print(f"recovery (acc): {after['wikicloze:acc'] / before['wikicloze:acc']:.3f}")


if __name__ == "__main__":
    main()
