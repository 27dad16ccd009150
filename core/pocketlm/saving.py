"""Dense copies and dense saving, for plugins: what the ``hf`` exporter does, as functions.

* :func:`densify`: a copy of a model with every quantized module dequantized back to a plain
  linear or embedding (a tied head tied again); the exporters that write float tensors next to
  packed ones start from it.
* :func:`save_dense`: a transformers folder (safetensors) of a model, quantized modules
  dequantized, with its tokenizer and, for a sentence encoder, the sentence-transformers files.
  It is written a part at a time, never as a whole dense copy. Bridges to other toolkits
  hand them a model this way.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import sentence, streaming
from .modules import dense_copy


def densify(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every quantized module replaced by its dense equivalent (a tied
    head tied again)."""
    dense = dense_copy(model)
    if getattr(dense.config, "tie_word_embeddings", False):
        dense.tie_weights()
    return dense


def save_dense(model: nn.Module, path: str | Path, tokenizer=None, dtype: torch.dtype | None = None) -> None:
    """Write ``model`` as a dense safetensors folder that plain transformers loads: quantized
    modules dequantized, weights in ``dtype`` (None: the model's own), ``tokenizer`` saved
    beside it when given. Written a part at a time (``streaming.write_sharded``), in memory or
    streamed, so no dense copy of the whole model is ever made."""
    streaming.write_sharded(model, path, lambda module, prefix: streaming.dense_tensors(module, prefix, dtype))
    streaming.write_config(model, path, dtype)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    if getattr(model.config, sentence.CONFIG_KEY, None):
        sentence.write_sentence_transformers(model, path)   # sentence-transformers loads it too


__all__ = ["densify", "save_dense"]
