"""The built-in plugin that registers the model families of :mod:`pocketlm.families`."""

from __future__ import annotations

from .. import hookimpl
from ..families import (BERT, BERT_MLM, BUILTIN_ARCHITECTURES, DISTILBERT, DISTILBERT_MLM, GPT2, LLAMA,  # noqa: F401
                        MOBILEBERT, MOBILEBERT_MLM, OPT, PHI3, ROBERTA, ROBERTA_MLM)


@hookimpl
def register_architectures(register):
    for architecture in BUILTIN_ARCHITECTURES:
        register(architecture)
