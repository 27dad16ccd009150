"""What validating and planning a recipe reads, without torch: the options of the ``mixed``
method, its size effect and the budgets the planner may try. The measuring and allocating
(``mixed``) imports them from here; registration (``pocketlm_mixed.__init__``) names it lazily.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pocketlm import Options, SizeEffect

BITS = (2, 3, 4, 5, 6, 8)
EMBEDDING_BITS = (4, 8)


class MixedOptions(Options):
    """Options of the ``mixed`` method (one byte budget, the widths to choose from, the method
    that runs the allocation)."""

    bits_per_weight: float = Field(..., gt=1, le=16, description="the byte budget, as the average storage bits per "
                                   "weight (scales included) over the matrices that take part")
    bits: list[Literal[2, 3, 4, 5, 6, 8]] = Field(list(BITS), description="the widths a linear may take")
    quantizer: Literal["rtn", "gptq"] = Field("gptq", description="the method whose stages run the allocation")
    size_model: Literal["gguf", "grid"] = Field("gguf", description="how bytes are counted: the gguf file "
                                                "(k-quant grids) or bits + 16 / group_size (weighted-mse grids)")
    embedding_bits: list[Literal[4, 8]] = Field([], description="widths the token embedding (and a tied head) "
                                                "may take besides float16; empty: it is left as it is")
    targets: list[str] = Field(["*"], description="linears that take part (module-name patterns)")
    ignore: list[str] = Field(["lm_head"], description="linears left as they are")
    resolution: int = Field(4000, ge=10, le=1_000_000, description="budget units of the knapsack's table")

    @model_validator(mode="after")
    def _some_bits(self):
        if not self.bits:
            raise ValueError("bits is empty; list the widths a linear may take, such as [2, 3, 4, 5, 6, 8]")
        return self


def plan(budget=None) -> list[dict]:
    """Budgets the planner may try, allocated by GPTQ: 4.75 bits per weight counted as GGUF
    blocks (every matrix at least Q4_0's 4.5, the sensitive ones wider), and 3.5 counted as
    integer grids (below what GGUF's fallbacks for rows 256 does not divide can hold); the
    user's ``target_bits`` instead, where given."""
    target = getattr(budget, "target_bits", None)
    if target:
        target = round(float(target), 2)
        return [{"bits_per_weight": target} if target >= 4.75 else {"bits_per_weight": target, "size_model": "grid"}]
    return [{"bits_per_weight": 4.75}, {"bits_per_weight": 3.5, "size_model": "grid"}]


def effect(options: MixedOptions) -> SizeEffect:
    features = {"quantized"} | ({"quantized-embedding"} if options.embedding_bits else set())
    return SizeEffect(bits=options.bits_per_weight, covers="all" if options.embedding_bits else "decoder",
                      features=frozenset(features))
