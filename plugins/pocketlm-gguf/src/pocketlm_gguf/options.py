"""What validating a recipe reads, without torch, numpy or gguf: the options of the ``gguf``
exporter. The writer (:mod:`pocketlm_gguf.export`) imports them from here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from pocketlm import Options


class GGUFOptions(Options):
    """Options of the ``gguf`` exporter.

    * ``filename``: the file written inside the export folder.
    * ``dtype``: ``"f16"`` or ``"f32"`` for dense (not quantized) matrices; norms and biases are
      always F32.
    * ``quantize``: ``"none"``, or llama.cpp's round-to-nearest ``"q8_0"``/``"q5_0"``/``"q5_1"``/
      ``"q4_0"``/``"q4_1"``, or a k-quant ``"q2_k"`` ... ``"q6_k"`` (grids fitted by pocketlm's
      k-quant rule, as gguf-py has no k-quant quantizer) for the dense linears selected by
      ``targets``/``ignore`` (the token embedding and, by default, ``lm_head`` stay in ``dtype``).
      A k-quant on rows that 256 does not divide takes llama.cpp's own fallback (Q4_K: Q5_0,
      Q5_K: Q5_1, Q6_K: Q8_0; Q2_K and Q3_K: llama.cpp's IQ4_NL, written here as Q4_0 of the same
      size), said in the log. Layers that are already quantized are never re-rounded.
    * ``fallback``: the format for a quantized grid with no exact block form: ``"auto"`` (the
      same size class: Q8_0 for 8 bits, Q4_0 for symmetric grids of 4 bits or fewer, Q4_1
      otherwise), or one of ``"q8_0"``, ``"q4_0"``, ``"q4_1"``, ``"f16"``, ``"f32"``.
    * ``name``: ``general.name`` (default: the model's name or path).
    * ``tokenizer``: write the tokenizer (byte-level BPE) from the context into the metadata.
    * ``tokenizer_pre``: llama.cpp's pre-tokenizer name (``tokenizer.ggml.pre``); guessed from
      the tokenizer when unset.
    """

    filename: str = Field("model.gguf", description="the file written inside the export folder")
    dtype: Literal["f16", "f32"] = Field("f16", description="storage of dense matrices (norms and biases: F32)")
    quantize: Literal["none", "q8_0", "q5_0", "q5_1", "q4_0", "q4_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k"] = Field(
        "none", description="llama.cpp block type for the dense linears that targets/ignore select")
    fallback: Literal["auto", "q8_0", "q5_0", "q5_1", "q4_0", "q4_1", "f16", "f32"] = Field(
        "auto", description="block type for a quantized grid with no exact block form (auto: same size class)")
    targets: list[str] = Field(["*"], description="module-name patterns that quantize applies to")
    ignore: list[str] = Field(["lm_head"], description="module-name patterns kept in dtype")
    name: str | None = Field(None, description="general.name (default: the model's name or path)")
    tokenizer: bool = Field(True, description="write the tokenizer into the metadata")
    tokenizer_pre: str | None = Field(None, description="llama.cpp pre-tokenizer name (tokenizer.ggml.pre); "
                                      "guessed from the tokenizer when unset")

    @field_validator("filename")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not value.endswith(".gguf") or "/" in value or "\\" in value or value.startswith("."):
            raise ValueError("filename must be a plain file name ending in .gguf, such as model.gguf")
        return value
