"""The options of the built-in evaluators and of the ``hf`` exporter: read whenever a recipe is
validated, so this module imports no torch."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..components import Options
from ..data import DEFAULT_EVALUATION_TEXT


class PerplexityOptions(Options):
    text: str = Field(DEFAULT_EVALUATION_TEXT, description="text file to evaluate on (or builtin:NAME)")
    windows: int = Field(32, ge=1, description="number of windows, taken in order from the start")
    seq_len: int = Field(512, ge=2, description="tokens per window")
    batch_size: int = Field(4, ge=1, description="windows per forward pass")


class DivergenceOptions(Options):
    text: str = Field(DEFAULT_EVALUATION_TEXT, description="text file to compare on (or builtin:NAME)")
    windows: int = Field(8, ge=1, description="number of windows, taken in order from the start")
    seq_len: int = Field(512, ge=2, description="tokens per window")
    batch_size: int = Field(2, ge=1, description="windows per forward pass")


class LatencyOptions(Options):
    prompt_tokens: int = Field(128, ge=1, description="causal LMs: tokens of the prompt")
    new_tokens: int = Field(32, ge=1, description="causal LMs: tokens generated greedily")
    repeats: int = Field(3, ge=1, description="timed runs after the warm-up; the best one counts")
    max_length: int = Field(128, ge=2, description="encoders: tokens per sentence at most (the prompt and "
                            "new tokens are for causal LMs)")


class FidelityOptions(Options):
    text: str = Field(DEFAULT_EVALUATION_TEXT, description="text file the sentences come from (or builtin:NAME)")
    sentences: int = Field(256, ge=2, description="number of sentences, evenly spaced over the text")
    batch_size: int = Field(32, ge=1, description="sentences per forward pass")
    max_length: int | None = Field(None, ge=2, description="tokens per sentence at most (None: the model's "
                                   "sentence-transformers max_seq_length, else 256)")


class RetrievalOptions(Options):
    text: str = Field(DEFAULT_EVALUATION_TEXT, description="text file the pairs are built from (or builtin:NAME)")
    pairs: int = Field(500, ge=2, description="number of (first sentence, rest of paragraph) pairs, taken in "
                       "order from the start")
    batch_size: int = Field(32, ge=1, description="texts per forward pass")
    max_length: int | None = Field(None, ge=2, description="tokens per query or passage at most (None: the "
                                   "model's sentence-transformers max_seq_length, else 256)")


class HfOptions(Options):
    dtype: Literal["keep", "float16", "bfloat16", "float32"] = Field(
        "keep", description="dtype of the saved weights; keep = the model's own")
