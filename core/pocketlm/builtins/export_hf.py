"""The ``hf`` exporter: a dense safetensors folder that plain transformers loads."""

from __future__ import annotations

from typing import Literal

import torch

from .options import HfOptions  # noqa: F401
from ..saving import densify, save_dense  # noqa: F401  (densify: the name plugins imported from here)


def export_hf(model, path, options, context) -> None:
    dtype = None if options is None or options.dtype == "keep" else getattr(torch, options.dtype)
    save_dense(model, path, getattr(context, "tokenizer", None), dtype)
