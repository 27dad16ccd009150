"""llama.cpp's k-quant types as data (names, bits, sub-block lengths, sizes), without numpy,
torch or gguf: registering the ``q2_k`` ... ``q6_k`` grid rules reads them. The fitting and
packing is :mod:`pocketlm_gguf.kquants`, which re-exports all of this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

QK_K = 256


@dataclass(frozen=True)
class KQuant:
    """One k-quant type: its bits per weight in the grid, sub-block length, largest sub-block
    scale used, and the type llama.cpp's quantizer falls back to for rows that are not a
    multiple of 256 (``llama-quant.cpp``); ``qtype`` is its ggml type."""

    name: str
    bits: int
    sub: int
    sc_max: int
    llama_fallback: str

    @property
    def d_bits(self) -> int:
        """Significant bits ``d`` may keep so that ``d * sc`` fits float16's 11 for every ``sc``."""
        return 11 - self.sc_max.bit_length()

    @property
    def qtype(self):
        """Its ``gguf.GGMLQuantizationType`` (``Q4_K`` for ``q4_k``; imports gguf)."""
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType[self.name.upper()]


KQUANTS = {
    "q2_k": KQuant("q2_k", 2, 16, 15, "iq4_nl"),
    "q3_k": KQuant("q3_k", 3, 16, 31, "iq4_nl"),
    "q4_k": KQuant("q4_k", 4, 32, 63, "q5_0"),
    "q5_k": KQuant("q5_k", 5, 32, 63, "q5_1"),
    "q6_k": KQuant("q6_k", 6, 16, 127, "q8_0"),
}
BY_BITS = {k.bits: k for k in KQUANTS.values()}


def block_bytes(kind: KQuant) -> int:
    return {"q2_k": 84, "q3_k": 110, "q4_k": 144, "q5_k": 176, "q6_k": 210}[kind.name]


def bits_per_weight(kind: KQuant) -> float:
    return block_bytes(kind) * 8 / QK_K


assert all(math.isclose(bits_per_weight(k), b) for k, b in zip(KQUANTS.values(), (2.625, 3.4375, 4.5, 5.5, 6.5625)))
