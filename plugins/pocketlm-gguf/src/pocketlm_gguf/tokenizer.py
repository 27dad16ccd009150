"""The tokenizer as GGUF metadata (``tokenizer.ggml.*``), read from a transformers fast tokenizer.

A GGUF file has no ``tokenizer.json``: llama.cpp and transformers' GGUF loader rebuild the
tokenizer from the token list, the merges, the token types and the special token ids. This module
writes those for byte-level BPE tokenizers (``tokenizer.ggml.model = "gpt2"``: GPT-2, Llama 3,
Qwen2, SmolLM, ...), the kind every Llama-family model pocketlm meets uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import gguf


@dataclass
class Vocab:
    """What ``write_vocab`` writes; built by :func:`vocab_from_tokenizer`."""

    model: str
    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None
    notes: list[str] = field(default_factory=list)


def _guess_pre(pre_tokenizer: dict | None) -> tuple[str, str | None]:
    """llama.cpp's name for this pre-tokenizer, and a note when it is only a guess."""
    if pre_tokenizer is None:
        return "default", "the tokenizer has no pre-tokenizer; wrote tokenizer.ggml.pre = 'default'"
    steps = pre_tokenizer.get("pretokenizers", [pre_tokenizer]) if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2", None  # llama.cpp spells the pre-tokenizer "gpt-2" (the model "gpt2")
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm", None
    if kinds and kinds[0] == "Split":
        regex = (steps[0].get("pattern") or {}).get("Regex", "")
        if "\\p{N}{1,3}" in regex:
            return "llama-bpe", None
        if "\\p{L}+|\\p{N}|" in regex:
            return "qwen2", None
    return "default", (f"pre-tokenizer {kinds} has no llama.cpp name known to this exporter; wrote "
                       "tokenizer.ggml.pre = 'default' (set the exporter option tokenizer_pre to override)")


def vocab_from_tokenizer(tokenizer, vocab_size: int, pre: str | None = None) -> Vocab:
    """Read a transformers fast tokenizer into a :class:`Vocab` of ``vocab_size`` tokens (the
    model's embedding rows; missing ids are padded with ``[PAD<id>]`` tokens of type UNUSED, as
    llama.cpp's converter does)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("the gguf exporter needs a fast (tokenizers-backed) tokenizer")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ValueError(f"only byte-level BPE tokenizers are written (this one is {model.get('type')}"
                         f"{' with byte fallback' if model.get('byte_fallback') else ''})")
    notes = []
    guessed, note = _guess_pre(spec.get("pre_tokenizer"))
    if pre is None and note:
        notes.append(note)
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = {entry["id"]: entry for entry in spec.get("added_tokens", [])}
    if max(by_id) >= vocab_size:
        raise ValueError(f"the tokenizer has ids up to {max(by_id)} but the model only {vocab_size} embedding rows")
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.CONTROL if added[index].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges", [])]

    special_ids = {}
    for key, attribute in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unk_token_id"),
                           ("pad", "pad_token_id")):
        value = getattr(tokenizer, attribute, None)
        if isinstance(value, int) and 0 <= value < vocab_size:
            special_ids[key] = value
    # What the tokenizer really adds, measured rather than read from flags that vary by class.
    probe = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    add_bos = "bos" in special_ids and len(probe) > len(plain) and probe[0] == special_ids["bos"]
    add_eos = "eos" in special_ids and len(probe) > len(plain) and probe[-1] == special_ids["eos"]
    template = getattr(tokenizer, "chat_template", None)
    return Vocab("gpt2", pre or guessed, tokens, [int(t) for t in types], merges, special_ids, add_bos, add_eos,
                 template if isinstance(template, str) else None, notes)


def write_vocab(writer: gguf.GGUFWriter, vocab: Vocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)  # even empty: without it transformers looks for scores
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
              "pad": writer.add_pad_token_id}
    for key, token_id in vocab.special_ids.items():
        adders[key](token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
