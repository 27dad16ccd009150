"""The ``hf`` exporter: a dense safetensors folder that plain transformers loads."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from .. import hookimpl, sentence, streaming
from ..components import Exporter, Options


class HfOptions(Options):
    dtype: Literal["keep", "float16", "bfloat16", "float32"] = Field(
        "keep", description="dtype of the saved weights; keep = the model's own")


def export_hf(model, path, options, context) -> None:
    # a part at a time, in memory or streamed: never a dense copy of the whole model
    dtype = None if options is None or options.dtype == "keep" else getattr(torch, options.dtype)
    streaming.export_hf_streamed(model, path, dtype, getattr(context, "tokenizer", None))
    if getattr(model.config, sentence.CONFIG_KEY, None):
        sentence.write_sentence_transformers(model, path)   # sentence-transformers loads it too


@hookimpl
def register_exporters(register):
    register(Exporter("hf", HfOptions, export_hf,
                      represents=frozenset({"dense", "masked", "restructured", "quantized"}),
                      summary="dense float safetensors folder for transformers (quantized layers are dequantized)",
                      streams=True))
