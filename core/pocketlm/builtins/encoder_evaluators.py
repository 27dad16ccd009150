"""Built-in evaluators for encoders (the BERT family), which make sentence embeddings rather than
next-token predictions: ``embedding-fidelity`` (how closely the compressed model's embeddings
follow the original's) and ``retrieval`` (how well the model's own embeddings find a paragraph's
continuation from its first sentence). ``latency`` reports sentences per second for an encoder
through :func:`encoder_latency`.

Both read the evaluation text (WikiText-2 test by default) with one reproducible rule:

* a paragraph is a line of the text (WikiText keeps one paragraph per line); a heading
  (a line that starts and ends with ``=``, such as `` = = Career = = ``) and a blank line are
  not paragraphs;
* a sentence ends at ``.``, ``!`` or ``?`` followed by whitespace and a character that is not a
  lowercase ASCII letter (WikiText writes `` . `` between sentences; an abbreviation followed by
  a capitalised name, such as "St. Louis", is split too, the same way every time).

``embedding-fidelity`` takes ``sentences`` sentences of at least ``MIN_SENTENCE_WORDS`` words,
evenly spaced over the whole text. ``retrieval`` takes the first ``pairs`` paragraphs of at
least ``MIN_PARAGRAPH_SENTENCES`` sentences, in order: the query is a paragraph's first sentence
and its passage the rest of the paragraph (a paragraph whose first sentence is already a query,
or whose rest is already a passage, is skipped, so every query has exactly one right passage).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..components import Architecture
from ..data import DEFAULT_EVALUATION_TEXT, read_text, resolve_text
from ..devices import module_device
from ..errors import PocketError
from .options import FidelityOptions, RetrievalOptions  # noqa: F401
from ..sentence import embed, last_hidden, pool, pooling

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[^\sa-z])")
MIN_SENTENCE_WORDS = 5
MIN_PARAGRAPH_SENTENCES = 3


# --------------------------------------------------------------------------- text

def is_heading(line: str) -> bool:
    stripped = line.strip()
    return len(stripped) > 1 and stripped.startswith("=") and stripped.endswith("=")


def paragraphs(text: str) -> list[str]:
    """The non-blank lines of ``text`` that are not headings, stripped."""
    return [line.strip() for line in text.splitlines() if line.strip() and not is_heading(line)]


def split_sentences(paragraph: str) -> list[str]:
    return [s for s in SENTENCE_END.split(paragraph.strip()) if s]


def evaluation_sentences(text: str, count: int) -> list[str]:
    """``count`` sentences of at least ``MIN_SENTENCE_WORDS`` words, evenly spaced over ``text``
    (all of them when it holds fewer)."""
    found = [s for p in paragraphs(text) for s in split_sentences(p) if len(s.split()) >= MIN_SENTENCE_WORDS]
    if len(found) <= count:
        return found
    return [found[i * len(found) // count] for i in range(count)]


def retrieval_pairs(text: str, count: int) -> list[tuple[str, str]]:
    """The first ``count`` (query, passage) pairs of ``text``: a paragraph's first sentence and
    the rest of it, for paragraphs of at least ``MIN_PARAGRAPH_SENTENCES`` sentences."""
    pairs, queries, passages = [], set(), set()
    for paragraph in paragraphs(text):
        sentences = split_sentences(paragraph)
        if len(sentences) < MIN_PARAGRAPH_SENTENCES:
            continue
        query, passage = sentences[0], " ".join(sentences[1:])
        if query in queries or passage in passages:  # a repeated text would have two right answers
            continue
        queries.add(query)
        passages.add(passage)
        pairs.append((query, passage))
        if len(pairs) == count:
            break
    return pairs


def _read_evaluation_text(options, context, metric: str) -> str:
    base = Path(context.recipe.get("_base", ".")) if context and context.recipe else None
    path = resolve_text(options.text, base)
    if not path.is_file():
        raise PocketError(f"evaluation text {path} does not exist", field=f"evaluate.{metric}.text",
                          fix="give an existing text file, or builtin:wikitext-2-test")
    return read_text(path)


# --------------------------------------------------------------------------- which models

def architecture_or_none(model, context) -> Architecture | None:
    """The model's registered architecture, or None when none is registered for it (a model
    that is only evaluated needs none)."""
    if context is None:
        return None
    try:
        return context.architecture(model)
    except PocketError:
        return None


def is_encoder(model, context) -> bool:
    architecture = architecture_or_none(model, context)
    return architecture is not None and architecture.encoder


def refuse_encoder(model, context, metric: str) -> None:
    """Stop a next-token metric (perplexity, kl-divergence, top1-agreement) on an encoder."""
    architecture = architecture_or_none(model, context)
    if architecture is not None and architecture.encoder:
        raise PocketError(f"{metric} measures next-token predictions, but the model is an encoder "
                          f"(architecture {architecture.name!r}), which makes sentence embeddings",
                          field="evaluate.metrics",
                          fix=f"use embedding-fidelity or retrieval instead of {metric} for an encoder: "
                          'metrics = ["embedding-fidelity", "retrieval", "size"] in [evaluate], or '
                          "pocketlm eval MODEL --metrics embedding-fidelity,retrieval,size")


def require_encoder(model, context, metric: str) -> None:
    architecture = architecture_or_none(model, context)
    if architecture is None or not architecture.encoder:
        what = f"architecture {architecture.name!r}" if architecture else "a model of no registered architecture"
        raise PocketError(f"{metric} measures the sentence embeddings of an encoder (the BERT family), "
                          f"but the model is {what}", field="evaluate.metrics",
                          fix=f"drop {metric} from the metrics; for a causal LM use perplexity, "
                          "kl-divergence or top1-agreement")


# --------------------------------------------------------------------------- embeddings

def _embed(model, sentences: list[str], options, context, description: str) -> torch.Tensor:
    """:func:`pocketlm.sentence.embed` (texts of like length batched together) under a progress bar."""
    with context.progress.task(description, len(sentences)) as advance:
        return embed(model, context.tokenizer, sentences, options.batch_size, options.max_length, advance)


def embedding_fidelity(model, options: FidelityOptions, context) -> dict[str, float]:
    """Cosine similarity between the model's and the original model's sentence embeddings: the
    mean and the 5th percentile (the worst sentences) over the sentences."""
    require_encoder(model, context, "embedding-fidelity")
    sentences = evaluation_sentences(_read_evaluation_text(options, context, "embedding-fidelity"), options.sentences)
    if not sentences:
        raise PocketError(f"the evaluation text holds no sentence of {MIN_SENTENCE_WORDS} words or more",
                          field="evaluate.embedding-fidelity.text", fix="use a longer text")
    ours = _embed(model, sentences, options, context, "embedding fidelity")
    original = _embed(context.teacher(), sentences, options, context, "embedding fidelity (original)")
    if ours.shape != original.shape:
        raise PocketError(f"the model's embeddings have width {ours.shape[-1]}, the original's {original.shape[-1]}",
                          field="evaluate.metrics", fix="compare models of one embedding width, or drop "
                          "embedding-fidelity and measure retrieval")
    cosine = F.cosine_similarity(ours.double(), original.double(), dim=-1)
    return {"embedding_fidelity": cosine.mean().item(),
            "embedding_fidelity_p5": torch.quantile(cosine, 0.05).item(),
            "fidelity_sentences": len(sentences)}


# --------------------------------------------------------------------------- retrieval

def retrieval_ranks(queries: torch.Tensor, passages: torch.Tensor) -> torch.Tensor:
    """The 1-based rank of passage ``i`` among all passages for query ``i``, by cosine similarity.
    A tie counts against the model: a model that embeds every text alike ranks each right
    passage last, not first."""
    similarity = F.normalize(queries.double(), dim=-1) @ F.normalize(passages.double(), dim=-1).T
    right = similarity.diagonal().unsqueeze(1)
    return (similarity >= right).sum(1)


def recall_at(ranks: torch.Tensor, k: int) -> float:
    return (ranks <= k).double().mean().item()


def mrr_at(ranks: torch.Tensor, k: int) -> float:
    """Mean reciprocal rank, counting 0 for a right passage ranked below ``k``."""
    return torch.where(ranks <= k, 1.0 / ranks.double(), torch.zeros_like(ranks, dtype=torch.double)).mean().item()


def retrieval(model, options: RetrievalOptions, context) -> dict[str, float]:
    """Rank every passage for every query by the model's own embeddings; recall@1 and MRR@10."""
    require_encoder(model, context, "retrieval")
    pairs = retrieval_pairs(_read_evaluation_text(options, context, "retrieval"), options.pairs)
    if len(pairs) < 2:
        raise PocketError(f"the evaluation text holds {len(pairs)} paragraph(s) of {MIN_PARAGRAPH_SENTENCES} "
                          "sentences or more; retrieval needs at least 2", field="evaluate.retrieval.text",
                          fix="use a longer text, with one paragraph per line")
    queries = _embed(model, [q for q, _ in pairs], options, context, "retrieval queries")
    passages = _embed(model, [p for _, p in pairs], options, context, "retrieval passages")
    ranks = retrieval_ranks(queries, passages)
    return {"recall_at_1": recall_at(ranks, 1), "mrr_at_10": mrr_at(ranks, 10), "retrieval_pairs": len(pairs)}


# --------------------------------------------------------------------------- latency

LATENCY_SENTENCES = 32  # the batch of the batched rate, and the sentences timed one by one


def encoder_latency(model, tokenizer, max_length: int, repeats: int) -> dict[str, float]:
    """Sentences per second embedding ``LATENCY_SENTENCES`` sentences of the default evaluation
    text (at most ``max_length`` tokens each), one at a time and as one batch: a warm-up, then
    the best of ``repeats``. Tokenizing is done beforehand; the times cover the forward pass and
    the pooling."""
    sentences = evaluation_sentences(read_text(resolve_text(DEFAULT_EVALUATION_TEXT)), LATENCY_SENTENCES)
    device = module_device(model)
    encode = lambda texts: tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                                     return_tensors="pt").to(device)
    singles = [encode([s]) for s in sentences]
    batch = encode(sentences)
    mode = pooling(model)["mode"]
    run = lambda inputs: pool(last_hidden(model, **inputs), inputs["attention_mask"], mode).cpu()
    one_by_one = lambda: [run(inputs) for inputs in singles]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        run(singles[0])  # warm-up: the first calls allocate and pick kernels
        run(batch)
        best_single = min(timed(one_by_one) for _ in range(repeats))
        best_batch = min(timed(lambda: run(batch)) for _ in range(repeats))
    model.train(was_training)
    return {"sentences_per_s_batch1": len(sentences) / best_single,
            "sentences_per_s_batch32": len(sentences) / best_batch}


def timed(fn) -> float:
    """Seconds ``fn()`` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
