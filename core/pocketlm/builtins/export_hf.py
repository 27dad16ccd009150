"""The ``hf`` exporter: a dense safetensors folder that plain transformers loads."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from .. import hookimpl
from ..components import Exporter, Options
from ..saving import densify, save_dense  # noqa: F401  (densify: the name plugins imported from here)


class HfOptions(Options):
    dtype: Literal["keep", "float16", "bfloat16", "float32"] = Field(
        "keep", description="dtype of the saved weights; keep = the model's own")


def export_hf(model, path, options, context) -> None:
    dtype = None if options is None or options.dtype == "keep" else getattr(torch, options.dtype)
    save_dense(model, path, getattr(context, "tokenizer", None), dtype)


@hookimpl
def register_exporters(register):
    register(Exporter("hf", HfOptions, export_hf,
                      represents=frozenset({"dense", "masked", "restructured", "quantized"}),
                      summary="dense float safetensors folder for transformers (quantized layers are dequantized)",
                      streams=True))
