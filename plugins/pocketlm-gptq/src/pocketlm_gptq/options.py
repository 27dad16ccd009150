"""What validating and planning a recipe reads, without torch: the options models of rtn, gptq
and both exporters, the size effect and the planner's option sets.

The tensor code (``rtn``, ``gptq``, ``export_gptq``, ``export_compressed_tensors``) imports these
from here; registration (``pocketlm_gptq.__init__``) names that code lazily.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pocketlm import Options
from pocketlm.schemes import QuantScheme, size_effect


class QuantOptions(QuantScheme):
    """Options shared by rtn and gptq: the kit's ``QuantScheme`` (bits, group_size, symmetric,
    targets, ignore, allow_partial_group) and the grid rule.

    * ``group_size``: the default 64 divides the widths of every built-in tiny model and of the
      reference model (576, 1536); 128 does not divide 576 and is refused there (see
      ``allow_partial_group``).
    * ``grid``: the registered grid rule that chooses each group's scale and zero point
      (``pocketlm plugins`` lists them): ``"minmax"`` (default), ``"weighted-mse"`` (weighted by the
      mean squared activation of each input channel), or a format's own grid such as the
      ``gguf`` plugin's ``"q4_k"``.
    """

    grid: str = Field("minmax", description="grid rule choosing each group's scale and zero point "
                      "(minmax, weighted-mse, or one a plugin registers, such as q4_k)")


effect = size_effect


class RTNOptions(QuantOptions):
    """Round-to-nearest options: exactly the shared quantizer options (see ``QuantOptions``)."""


class GPTQOptions(QuantOptions):
    """GPTQ options (the paper's defaults) on top of the shared quantizer options.

    * ``damp``: fraction of the mean Hessian diagonal added to the diagonal (0.01).
    * ``block_size``: columns quantized before a lazy batch update of the rest (128).
    * ``act_order``: process columns by descending Hessian diagonal, with static groups (on by
      default, as in llm-compressor: it costs nothing at inference because the groups keep their
      plain order, and on the reference model W4 g64 it took perplexity from 38.49 to 34.63).
    * ``true_sequential``: observe each group of linears after quantizing the previous group.
    * ``backend``: ``"pocketlm"`` (this implementation) or ``"llmcompressor"`` (llm-compressor's
      GPTQModifier run in its own environment on the same windows, loaded back as grids).
    * ``head``: when the output head is quantized (a token embedding tied to it is selected, or
      ``lm_head`` is not ignored), ``"solve"`` runs GPTQ on it with the Hessian of what it reads
      (the final norm's outputs on the calibration windows, after the quantized layers);
      ``"round"`` rounds it to nearest as 0.5 did. Encoders' masked-LM heads are always rounded,
      and with ``backend = "llmcompressor"`` a selected embedding is rounded (min-max).
    """

    damp: float = Field(0.01, description="Hessian dampening: fraction of the mean diagonal added to the "
                        "diagonal so it inverts stably (paper default 0.01)")
    block_size: int = Field(128, description="columns quantized before a lazy batch update of the rest "
                            "(paper default 128)")
    act_order: bool = Field(True, description="quantize columns by descending Hessian diagonal (static groups)")
    true_sequential: bool = Field(True, description="observe each group of linears after quantizing the previous one")
    backend: Literal["pocketlm", "llmcompressor"] = Field(
        "pocketlm", description="this implementation, or llm-compressor's GPTQModifier in its own environment")
    head: Literal["solve", "round"] = Field(
        "solve", description="a quantized output head (an embedding tied to it, or lm_head when not ignored): "
        "solve it with GPTQ on the Hessian of its inputs after the last layer, or round it to nearest")

    def model_post_init(self, __context) -> None:  # pydantic hook: cross-field checks
        if not 0 < self.damp < 1:
            raise ValueError(f"damp must be in (0, 1), not {self.damp}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive, not {self.block_size}")
        if self.backend == "llmcompressor" and self.grid != "minmax":
            raise ValueError(f"backend 'llmcompressor' fits min-max grids only, not grid {self.grid!r}; "
                             "use backend = 'pocketlm'")


class GPTQExportOptions(Options):
    """``checkpoint_format``: ``"gptq"`` (v1: zero - 1, the widest support) or ``"gptq_v2"``
    (zero as is; holds any asymmetric grid). ``dtype``: dtype of the tensors that are not
    quantized (norms, embeddings, biases)."""

    checkpoint_format: Literal["gptq", "gptq_v2"] = Field(
        "gptq", description="gptq (v1: zero points stored minus one, what vLLM assumes) or gptq_v2")
    dtype: Literal["float16", "bfloat16", "float32"] = Field("float16", description="dtype of scales and dense tensors")


class CTExportOptions(Options):
    """``dtype``: dtype of the dense tensors (norms, embeddings, unquantized layers). Scales are
    float16 values (the dtype pocketlm's grids hold them in), stored as float16, or as float32 in
    a float32 export."""

    dtype: Literal["float16", "bfloat16", "float32"] = Field("float16", description="dtype of the dense tensors (norms, embeddings, unquantized layers)")


def plan_rtn(budget=None) -> list[dict]:
    """Option sets the hybrid planner may try for ``rtn``, cheapest loss first: 8-bit per channel
    (near lossless), 4-bit g64, 3-bit g64, and the token embedding (with its tied head) at 8 or
    4 bits in groups of 32, which on small models with tied embeddings is where a fifth of the
    weights sit. Groups of 32 with symmetric grids are exactly GGUF's Q8_0 and Q4_0 blocks, the
    formats that pack an embedding. ``budget`` (a ``PlanBudget``) is not consulted: every set is
    sensible on any decoder model."""
    return [
        {"bits": 8, "group_size": -1},
        {"bits": 4, "group_size": 64},
        {"bits": 3, "group_size": 64},
        {"bits": 8, "group_size": 32, "targets": ["embed"], "ignore": [], "default": True},
        {"bits": 4, "group_size": 32, "targets": ["embed"], "ignore": []},
    ]


def plan_gptq(budget=None) -> list[dict]:
    """Option sets the hybrid planner may try for ``gptq``: 4-bit g64 with act-order (the usual
    sweet spot), 4-bit g32 (GGUF's Q4_0 block exactly), 3-bit g64 (smaller, with visible loss)
    and 8-bit g32 (near lossless, GGUF's Q8_0 block exactly: the default hybrid's decoder step).
    Each needs calibration data. ``budget`` is not consulted."""
    return [
        {"bits": 4, "group_size": 64, "act_order": True},
        {"bits": 4, "group_size": 32, "act_order": True},
        {"bits": 3, "group_size": 64, "act_order": True},
        {"bits": 8, "group_size": 32, "default": True},
    ]
