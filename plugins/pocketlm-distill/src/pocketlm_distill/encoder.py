"""The encoder half of ``distill``: what DistilBERT and sentence-embedding distillation train on.

An encoder (the BERT family: ``Architecture.encoder``) reads whole sentences in both
directions, so it is trained on text chunks rather than causal windows:

* **data**: the training text cut into paragraphs, each paragraph into sentences, and runs of
  1 to ``MAX_SENTENCES`` consecutive sentences (the count drawn with the seed) make the
  examples: single sentences and short passages, the two things a sentence encoder embeds
  (``texts = "chunks"``). With ``texts = "pairs"`` each paragraph of at least
  ``MIN_PAIR_SENTENCES`` sentences gives a (query, passage) pair instead, its first sentence and
  the rest of it, the pairs the ``retrieval`` evaluator ranks; a micro-batch then holds whole
  pairs, so the relational loss sees a query next to its own passage and beside unrelated texts;
  ``queries = "every"`` makes each sentence of such a paragraph a query against the rest of it.
  Each is tokenized with the model's tokenizer *with* its special tokens (``[CLS] ... [SEP]``)
  and truncated to the maximum length; a batch is padded to its longest example and carries an
  attention mask.
* **masked-LM models** (``*ForMaskedLM``): 15% of the real tokens of each example are chosen as
  in BERT, 80% of them replaced by ``[MASK]``, 10% by a random token, 10% left as they are. The
  choice is drawn from the seed and the example's position in the training order, so it is the
  same for any process count and after a resume.
* **losses**: the student's pooled sentence embedding against the teacher's (cosine or MSE), the
  cosine similarities between the batch's texts against the teacher's (relational: how the
  embeddings of *different* texts relate, which retrieval ranks by), and hidden states compared
  token by token over the real tokens (cosine, as DistilBERT, or MSE).

Everything here runs on the host (text, token ids, masking: data preparation), except the loss
functions, which work on the model's tensors where they are.
"""

from __future__ import annotations

import math
import random
import re
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pocketlm import PocketError
from pocketlm.modules import decoder_layers, set_module
from pocketlm.sentence import sentence_vectors

from .options import removed_fraction  # noqa: F401  (its home before options.py)

MAX_SENTENCES = 4      # an example holds 1..MAX_SENTENCES consecutive sentences of one paragraph
MIN_CHARACTERS = 16    # shorter fragments (stray headings, numbers) teach nothing
MIN_PAIR_SENTENCES = 3  # a pair: a query sentence and a passage of 2 or more (as retrieval's)
IGNORE = -100          # label of a position that is not predicted (transformers' convention)
LENGTH_GROUPS = 4      # a micro-batch runs as up to this many forward passes of texts of similar length

# A sentence ends at ., ! or ? followed by space and a capital, digit or opening quote.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


# --------------------------------------------------------------------------- text


def paragraphs(text: str) -> list[str]:
    """Non-empty lines of ``text`` that are not WikiText-style headings (``= Title =``)."""
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not (line.startswith("=") and line.endswith("=")):
            found.append(line)
    return found


def text_chunks(text: str, seed: int) -> list[str]:
    """Runs of 1..MAX_SENTENCES consecutive sentences of each paragraph, the run lengths drawn
    with ``seed`` (the same text and seed give the same chunks)."""
    rng = random.Random(seed)
    chunks = []
    for paragraph in paragraphs(text):
        sentences = _SENTENCE_END.split(paragraph)
        start = 0
        while start < len(sentences):
            count = rng.randint(1, MAX_SENTENCES)
            chunk = " ".join(sentences[start:start + count])
            start += count
            if len(chunk) >= MIN_CHARACTERS:
                chunks.append(chunk)
    return chunks


def query_passage_pairs(text: str, every_sentence: bool = False) -> list[tuple[str, str]]:
    """(first sentence, rest of the paragraph) of each paragraph of at least
    ``MIN_PAIR_SENTENCES`` sentences, in the text's order: the construction of the ``retrieval``
    evaluator's pairs, on this module's paragraphs and sentences. With ``every_sentence`` each
    sentence of such a paragraph in turn is a query against the others (in the text's order):
    several times the pairs from the same text. A pair with a query or passage shorter than
    ``MIN_CHARACTERS`` is left out."""
    pairs = []
    for paragraph in paragraphs(text):
        sentences = _SENTENCE_END.split(paragraph)
        if len(sentences) < MIN_PAIR_SENTENCES:
            continue
        for i in range(len(sentences) if every_sentence else 1):
            query, passage = sentences[i], " ".join(sentences[:i] + sentences[i + 1:])
            if len(query) >= MIN_CHARACTERS and len(passage) >= MIN_CHARACTERS:
                pairs.append((query, passage))
    return pairs


def tokenize_chunks(tokenizer, chunks: list[str], max_length: int) -> list[list[int]]:
    """Token ids of each chunk with the tokenizer's special tokens, truncated to ``max_length``."""
    encoded = tokenizer(chunks, add_special_tokens=True, truncation=True, max_length=max_length,
                        return_attention_mask=False)["input_ids"]
    return [ids for ids in encoded if len(ids) > 2]  # more than [CLS] [SEP]


def tokenize_pairs(tokenizer, pairs: list[tuple[str, str]], max_length: int) -> list[list[int]]:
    """Token ids of query 0, passage 0, query 1, passage 1, ... (example ``2i`` is pair ``i``'s
    query, ``2i + 1`` its passage), as :func:`tokenize_chunks` makes them; a pair with a side of
    no real token is left out whole."""
    texts = [text for pair in pairs for text in pair]
    encoded = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_length,
                        return_attention_mask=False)["input_ids"]
    kept = []
    for query, passage in zip(encoded[0::2], encoded[1::2]):
        if len(query) > 2 and len(passage) > 2:  # more than [CLS] [SEP]
            kept += [query, passage]
    return kept


# --------------------------------------------------------------------------- masking and batches


@dataclass(frozen=True)
class Masking:
    """BERT's masked-LM corruption: ``probability`` of the real tokens are predicted; of those
    80% become ``mask_id``, 10% a random id below ``vocab``, 10% stay."""

    probability: float
    mask_id: int
    vocab: int
    special_ids: frozenset[int]


def mask_tokens(ids: list[int], masking: Masking, generator: torch.Generator) -> tuple[list[int], list[int]]:
    """(corrupted ids, labels): labels hold the original id where a position is predicted and
    ``IGNORE`` elsewhere. At least one real token is predicted in every example."""
    candidates = [i for i, token in enumerate(ids) if token not in masking.special_ids]
    if not candidates:
        return list(ids), [IGNORE] * len(ids)
    draws = torch.rand(len(candidates), generator=generator, device="cpu").tolist()  # host-side data preparation
    chosen = [c for c, d in zip(candidates, draws) if d < masking.probability]
    if not chosen:
        chosen = [candidates[int(torch.randint(len(candidates), (1,), generator=generator, device="cpu"))]]
    corrupted, labels = list(ids), [IGNORE] * len(ids)
    for position in chosen:
        labels[position] = ids[position]
        action = float(torch.rand((), generator=generator, device="cpu"))
        if action < 0.8:
            corrupted[position] = masking.mask_id
        elif action < 0.9:
            corrupted[position] = int(torch.randint(masking.vocab, (1,), generator=generator, device="cpu"))
    return corrupted, labels


class Examples(torch.utils.data.Dataset):
    """The tokenized chunks, indexed by *position in the training order* (``order[position]`` is
    the chunk), so each drawn example can be masked from ``(seed, position)`` alone."""

    def __init__(self, chunks: list[list[int]], order: list[int], seed: int, masking: Masking | None):
        self.chunks, self.order, self.seed, self.masking = chunks, order, seed, masking

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, position: int) -> tuple[list[int], list[int] | None]:
        ids = self.chunks[self.order[position]]
        if self.masking is None:
            return ids, None
        generator = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + position)
        return mask_tokens(ids, self.masking, generator)


class Collate:
    """Pads a list of examples to the longest: ``input_ids``, ``attention_mask`` and, for a
    masked-LM model, ``labels``."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, examples: list[tuple[list[int], list[int] | None]]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids, _ in examples)
        batch = {
            "input_ids": torch.tensor([ids + [self.pad_id] * (width - len(ids)) for ids, _ in examples]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in examples]),
        }
        if examples[0][1] is not None:
            batch["labels"] = torch.tensor([labels + [IGNORE] * (width - len(labels)) for _, labels in examples])
        return batch


def masking_for(tokenizer, model: nn.Module, probability: float) -> Masking:
    if tokenizer is None or tokenizer.mask_token_id is None:
        raise PocketError("masked-LM distillation needs a tokenizer with a mask token",
                          fix="load the model with its tokenizer (it names [MASK] or <mask>)")
    vocab = min(len(tokenizer), model.get_output_embeddings().weight.shape[0])
    return Masking(probability, tokenizer.mask_token_id, vocab, frozenset(tokenizer.all_special_ids))


def length_groups(lengths: torch.Tensor, groups: int) -> list[torch.Tensor]:
    """Row indices of a padded batch, shortest first, cut into up to ``groups`` runs of (nearly)
    equal size: rows of similar real length (``lengths``), each run to be padded only to its own
    longest. Why: a micro-batch of pairs holds 30-token queries beside passages of 128 tokens or
    more, and one padded forward pass spends most of the queries' compute on padding."""
    order = torch.argsort(lengths, stable=True)
    return [rows for rows in torch.tensor_split(order, min(groups, len(order))) if len(rows)]


# --------------------------------------------------------------------------- losses


def embedding_loss(student: torch.Tensor, teachers: list[torch.Tensor], kind: str) -> torch.Tensor:
    """Loss between the student's sentence embeddings ``[batch, width]`` and the mean of the
    teachers' (the averaged teacher: one target per sentence, whatever the teacher count).
    ``cosine``: mean of ``1 - cos``; ``mse``: mean squared error per coordinate."""
    target = teachers[0] if len(teachers) == 1 else torch.stack(teachers).mean(0)
    student, target = student.float(), target.float()
    if kind == "cosine":
        return (1 - F.cosine_similarity(student, target, dim=-1)).mean()
    return F.mse_loss(student, target)


def similarity_matrix(embeddings: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every pair of rows of ``[batch, width]``: ``[batch, batch]``, in
    float32 also under autocast (``mixed_precision = "bf16"``): the relational loss trains
    differences of cosines of a few hundredths, and bfloat16 resolves 0.004 near 1."""
    unit = F.normalize(embeddings.float(), dim=-1)
    device = unit.device.type
    with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext():
        return unit @ unit.T


def similarity_loss(student: torch.Tensor, teachers: list[torch.Tensor]) -> torch.Tensor:
    """Relational loss of a batch's sentence embeddings: the mean squared difference between the
    student's and the averaged teacher's cosine similarities of every pair of *different* texts
    (the off-diagonal entries; the diagonal is 1 for both). Zero when the student's embeddings
    are the teacher's up to a positive scale per text; unchanged by reordering the batch; the
    widths of student and teacher may differ.

    The form of similarity-preserving distillation (Tung & Mori, 2019: the batch's normalized
    Gram matrices matched by squared difference), on cosines. Why not a KL between row-wise
    softmaxes of the similarities at a temperature (contrastive distillation): a micro-batch of
    chunks drawn at random holds few related texts, so a low temperature spends the loss on
    each row's nearest text and a high one flattens it; the result would turn on a temperature
    to tune per model. The squared difference has no such knob, weighs every pair, and is in the
    units of the cosine embedding loss beside it."""
    target = teachers[0] if len(teachers) == 1 else torch.stack(teachers).mean(0)
    ours, theirs = similarity_matrix(student), similarity_matrix(target)
    different = ~torch.eye(ours.shape[0], dtype=torch.bool, device=ours.device)
    return (ours - theirs)[different].pow(2).mean()


def token_loss(student: torch.Tensor, teacher: torch.Tensor, keep: torch.Tensor | None, kind: str) -> torch.Tensor:
    """Hidden-state loss of ``[batch, tokens, width]`` states over the tokens ``keep`` marks
    (None: all). ``cosine``: mean over tokens of ``1 - cos`` (DistilBERT); ``mse``: mean squared
    error per coordinate."""
    student, teacher = student.float(), teacher.float()
    if kind == "cosine":
        per_token = 1 - F.cosine_similarity(student, teacher, dim=-1)
    else:
        per_token = (student - teacher).pow(2).mean(-1)
    if keep is None:
        return per_token.mean()
    keep = keep.to(per_token.dtype)
    return (per_token * keep).sum() / keep.sum().clamp_min(1)


def sentence_embedding(output, attention_mask: torch.Tensor, settings: dict) -> torch.Tensor:
    """The pooled (and, where the model's pipeline normalizes, normalized) embedding of a
    forward pass made with ``output_hidden_states`` or from a bare encoder."""
    hidden = getattr(output, "last_hidden_state", None)
    hidden = hidden if hidden is not None else output.hidden_states[-1]
    return sentence_vectors(hidden.float(), attention_mask, settings)


# --------------------------------------------------------------------------- student from the teacher


def spread_half(depth: int) -> list[int]:
    """Half the layers (rounded up), evenly spread from the first to the last: BERT-base's 12
    give 0, 2, 4, 7, 9, 11 (the layers DistilBERT kept), 6 give 0, 2, 5, 4 give 0, 3."""
    keep = math.ceil(depth / 2)
    if keep == 1:
        return [depth - 1] if depth > 1 else [0]
    return sorted({round(i * (depth - 1) / (keep - 1)) for i in range(keep)})


def chosen_layers(spec: str | list[int], depth: int) -> list[int]:
    """The teacher layer indices ``student_layers`` names, checked against ``depth``."""
    chosen = spread_half(depth) if spec == "spread" else list(spec)
    if any(i >= depth for i in chosen):
        raise PocketError(f"student_layers {chosen} names a layer the {depth}-layer model does not have",
                          field="student_layers", fix=f"use indices from 0 to {depth - 1}")
    return chosen


def keep_layers(model: nn.Module, architecture, keep: list[int]) -> None:
    """Keep only layers ``keep`` (in that order) of ``model``, renumbered; the config's layer count
    (``Architecture.layer_count_key``) and ``layer_types``, where present, follow."""
    layers = decoder_layers(model, architecture)
    depth = len(layers)
    kept = nn.ModuleList([layers[i] for i in keep])
    set_module(model, architecture.layers, kept)
    for index, layer in enumerate(kept):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = index
    setattr(model.config, architecture.layer_count_key, len(keep))
    layer_types = getattr(model.config, "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and len(layer_types) == depth:
        model.config.layer_types = [layer_types[i] for i in keep]
