"""What validating a recipe reads, without torch: the options of the ``awq`` method and
exporter, and the method's size effect. The tensor code (``awq``, ``export_awq``) imports them
from here; registration (``pocketlm_awq.__init__``) names that code lazily.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from pocketlm import Options
from pocketlm.schemes import QuantScheme, size_effect


class AWQOptions(QuantScheme):
    """AWQ's options; the defaults are AutoAWQ's (4-bit, group 128, zero point, 20-point grids).

    * ``bits``, ``group_size``, ``symmetric``, ``targets``, ``ignore``: the kit's ``QuantScheme``,
      narrowed to what AWQ does: 3, 4 or 8 bits, groups of -1, 32, 64 or 128 that divide every
      target's input width, linears inside the decoder layers only.
    * ``n_grid``: α grid points in [0, 1); ``duo_scaling``: divide by ``mean|w|^(1-α)``.
    * ``search_tokens``: calibration tokens (whole sequences, first batches first) on which the
      scale search measures its loss; None uses all of them. Channel means use every token.
    * ``clip``: search per-group clipping bounds (``clip_grid`` steps down to ``1 - max_shrink``
      of ``max|w|``, on ``max_clip_tokens`` tokens); ``clip_qk`` also clips q/k projections.
    * ``backend``: ``"pocketlm"`` (this file) or ``"llmcompressor"``: llm-compressor's
      AWQModifier run in its own venv (see ``backend_llmcompressor``; needs ``clip = false``
      and ``search_tokens`` covering every calibration token).
    """

    bits: Literal[3, 4, 8] = Field(4, description="bits per stored weight value, before scales and zero points")
    group_size: Literal[-1, 32, 64, 128] = Field(
        128, description="input columns sharing one scale (-1: one per output channel); must divide every "
        "target's input width")
    symmetric: bool = Field(False, description="zero point 2**(bits-1) instead of a fitted one")
    allow_partial_group: Literal[False] = Field(False, description="awq needs whole groups (always false)")
    grid: str = Field("minmax", description="grid rule rounding each group after the search (minmax, "
                      "weighted-mse, or one a plugin registers)")
    n_grid: int = Field(20, description="points of the scale exponent alpha searched in [0, 1) (AutoAWQ: 20)")
    duo_scaling: bool = Field(True, description="divide the activation scale by mean|w|^(1-alpha)")
    clip: bool = Field(True, description="search per-group clipping bounds after the scales")
    clip_qk: bool = Field(False, description="also clip the q and k projections")
    clip_grid: int = Field(20, description="clipping steps from max|w| down to (1 - max_shrink) max|w|")
    max_shrink: float = Field(0.5, description="the largest fraction of max|w| the clip search may cut")
    max_clip_tokens: int = Field(512, description="calibration tokens the clip search measures on")
    search_tokens: int | None = Field(2048, description="calibration tokens the scale search measures its "
                                      "loss on (whole sequences, first first); null: all")
    backend: Literal["pocketlm", "llmcompressor"] = Field(
        "pocketlm", description="this implementation, or llm-compressor's AWQModifier in its own environment")

    @field_validator("n_grid", "clip_grid", "max_clip_tokens")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1")
        return value

    @field_validator("max_shrink")
    @classmethod
    def _shrink(cls, value: float) -> float:
        if not 0.0 <= value < 1.0:
            raise ValueError("max_shrink must be in [0, 1)")
        return value

    @field_validator("search_tokens")
    @classmethod
    def _search_tokens(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError("search_tokens must be positive, or None for every calibration token")
        return value


effect = size_effect   # the kit's: bits per weight of the packed layout


class AWQExportOptions(Options):
    dtype: Literal["float16", "bfloat16", "float32"] = Field("float16", description="dtype of scales and dense tensors")
