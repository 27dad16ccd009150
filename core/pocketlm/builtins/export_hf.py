"""The ``hf`` exporter: a dense safetensors folder that plain transformers loads."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from .. import hookimpl, sentence, streaming
from ..components import Exporter, Options
from ..modules import dense_copy


def densify(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every quantized module replaced by its dense equivalent (a tied
    head tied again)."""
    dense = dense_copy(model)
    if getattr(dense.config, "tie_word_embeddings", False):
        dense.tie_weights()
    return dense


class HfOptions(Options):
    dtype: Literal["keep", "float16", "bfloat16", "float32"] = Field(
        "keep", description="dtype of the saved weights; keep = the model's own")


def export_hf(model, path, options, context) -> None:
    if streaming.is_streamed(model):  # one shard per decoder layer, with an index
        dtype = None if options is None or options.dtype == "keep" else getattr(torch, options.dtype)
        streaming.export_hf_streamed(model, path, dtype, getattr(context, "tokenizer", None))
        return
    dense = densify(model)
    if options is not None and options.dtype != "keep":
        dense = dense.to(getattr(torch, options.dtype))
    if hasattr(dense.config, "quantization_config"):
        del dense.config.quantization_config
    dense.save_pretrained(path, safe_serialization=True)
    if context is not None and context.tokenizer is not None:
        context.tokenizer.save_pretrained(path)
    if getattr(dense.config, sentence.CONFIG_KEY, None):
        sentence.write_sentence_transformers(dense, path)   # sentence-transformers loads it too


@hookimpl
def register_exporters(register):
    register(Exporter("hf", HfOptions, export_hf,
                      represents=frozenset({"dense", "masked", "restructured", "quantized"}),
                      summary="dense float safetensors folder for transformers (quantized layers are dequantized)",
                      streams=True))
