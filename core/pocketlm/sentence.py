"""Sentence embeddings from an encoder, pooled the way the model's sentence-transformers config says.

A sentence-transformers folder describes its pipeline in ``modules.json``: the transformer, a
``Pooling`` module (``1_Pooling/config.json``: mean, CLS or max over the tokens) and, often, a
``Normalize`` module. The loader reads that once into ``model.config.sentence_pooling`` (a small
dict), so it travels with the model through every stage checkpoint (``config.json``) and the
``hf`` export writes the same files back (:func:`write_sentence_transformers`). A model without
them is pooled by the mean over its tokens, sentence-transformers' own default.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

CONFIG_KEY = "sentence_pooling"
MODES = ("mean", "cls", "max")
DEFAULT = {"mode": "mean", "normalize": False, "max_seq_length": None}


def pooling(model) -> dict:
    """``{"mode", "normalize", "max_seq_length"}`` of ``model`` (the default when it has none)."""
    found = getattr(getattr(model, "config", None), CONFIG_KEY, None) or {}
    return {**DEFAULT, **found}


def read_pooling(model, folder: Path) -> None:
    """Record the sentence-transformers pooling of the model in ``folder``, when it has one."""
    folder = Path(folder)
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return
    modules = json.loads(modules_file.read_text())
    found = dict(DEFAULT)
    for module in modules:
        kind = module.get("type", "").rsplit(".", 1)[-1]
        if kind == "Pooling":
            config = json.loads((folder / module["path"] / "config.json").read_text())
            found["mode"] = ("cls" if config.get("pooling_mode_cls_token") else
                             "max" if config.get("pooling_mode_max_tokens") else "mean")
        elif kind == "Normalize":
            found["normalize"] = True
    settings = folder / "sentence_bert_config.json"
    if settings.is_file():
        found["max_seq_length"] = json.loads(settings.read_text()).get("max_seq_length")
    setattr(model.config, CONFIG_KEY, found)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """One vector per sequence from ``hidden`` ``[batch, tokens, width]``, over the tokens that
    ``attention_mask`` keeps."""
    if mode == "cls":
        return hidden[:, 0]
    keep = attention_mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(keep == 0, torch.finfo(hidden.dtype).min).amax(1)
    return (hidden * keep).sum(1) / keep.sum(1).clamp(min=1e-9)


def sentence_vectors(hidden: torch.Tensor, attention_mask: torch.Tensor, settings: dict) -> torch.Tensor:
    """The sentence embeddings of ``hidden`` as the pipeline ``settings`` (:func:`pooling`) makes
    them: pooled, then L2-normalized when the pipeline normalizes."""
    vectors = pool(hidden, attention_mask, settings["mode"])
    return F.normalize(vectors, dim=-1) if settings["normalize"] else vectors


def last_hidden(model, **inputs) -> torch.Tensor:
    """The encoder's last hidden states, from a bare model or one inside a masked-LM wrapper."""
    output = model(**inputs, output_hidden_states=True)
    hidden = getattr(output, "last_hidden_state", None)
    return hidden if hidden is not None else output.hidden_states[-1]


def embed(model, tokenizer, sentences: list[str], batch_size: int = 32, max_length: int | None = None,
          advance=None) -> torch.Tensor:
    """Float32 sentence embeddings ``[len(sentences), width]`` on the CPU, computed on the
    model's device, normalized when the model's pipeline normalizes. ``advance(n)``, when given,
    is called after each batch of ``n`` sentences (a progress bar)."""
    if tokenizer.pad_token is None:
        from .errors import PocketError

        raise PocketError("the tokenizer has no padding token, so sentences of different lengths cannot share "
                          "a batch", field="model.source", fix="give the model folder's tokenizer a pad token "
                          "(an encoder's tokenizer normally has [PAD] or <pad>)")
    settings = pooling(model)
    max_length = max_length or settings["max_seq_length"] or 256
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    # Batches of similar lengths waste little on padding (sentence-transformers sorts too).
    order = sorted(range(len(sentences)), key=lambda i: -len(sentences[i]))
    out = []
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = tokenizer([sentences[i] for i in order[start:start + batch_size]], padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt").to(device)
            out.append(sentence_vectors(last_hidden(model, **batch).float(), batch["attention_mask"], settings).cpu())
            if advance is not None:
                advance(len(batch["attention_mask"]))
    model.train(was_training)
    vectors = torch.cat(out) if out else torch.zeros(0, 0)
    return vectors[torch.argsort(torch.tensor(order))] if order else vectors


def write_sentence_transformers(model, folder: Path) -> None:
    """Write the sentence-transformers files (``modules.json``, the pooling config, and
    ``sentence_bert_config.json``) beside a saved encoder, so sentence-transformers loads the
    export with the original's pooling."""
    settings = pooling(model)
    folder = Path(folder)
    width = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.dim
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if settings["normalize"]:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (folder / "2_Normalize").mkdir(exist_ok=True)
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": width,
        "pooling_mode_cls_token": settings["mode"] == "cls",
        "pooling_mode_mean_tokens": settings["mode"] == "mean",
        "pooling_mode_max_tokens": settings["mode"] == "max",
        "pooling_mode_mean_sqrt_len_tokens": False}, indent=2))
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "sentence_bert_config.json").write_text(json.dumps(
        {"max_seq_length": settings["max_seq_length"] or 256, "do_lower_case": False}, indent=2))
