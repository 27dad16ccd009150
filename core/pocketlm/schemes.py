"""The quantization scheme every weight quantizer shares, and what it does to the size.

Options and size effects are read whenever a recipe is validated or planned, so this module
imports neither torch nor the quantizer kit (:mod:`pocketlm.quant`, which re-exports all of it).
"""

from __future__ import annotations

from typing import Literal, get_args, get_origin

from pydantic import Field, field_validator

from .components import Options, SizeEffect

BITS = (2, 3, 4, 5, 6, 7, 8)
GROUP_SIZES = (-1, 16, 32, 64, 128)
EMBED_ALIAS = "embed"
HEAD_ALIAS = "lm_head"


class QuantScheme(Options):
    """The options every weight quantizer shares; a method's options model subclasses it (and
    may narrow a field, such as the bits it supports, by redeclaring it).

    * ``bits``: 2, 3, 4, 5, 6, 7 or 8 bits per weight (5, 6 and 7 only where an installed
      exporter stores them; an exporter's check refuses the rest). 7-bit codes centred on their
      zero point fit in int8 within 64 of zero, which integer kernels without VNNI multiply exactly.
    * ``group_size``: -1 (one scale per output channel) or 16/32/64/128 input columns per scale.
    * ``symmetric``: zero point ``2**(bits-1)`` (an exact zero stays zero) or a fitted one.
    * ``targets`` / ``ignore``: module-name patterns (``pocketlm.modules.matches``); ``"embed"``
      and ``"lm_head"`` name the architecture's token embedding and head. Both are ignored by
      default; a stage quantizes them only when a target names them (or ``"*"``) and ``ignore``
      no longer lists them.
    * ``allow_partial_group``: accept a group size that does not divide a layer's input width
      (the last group is short).
    """

    bits: Literal[BITS] = Field(4, description="bits per weight (5, 6 and 7: only exporters that store them)")
    group_size: Literal[-1, 16, 32, 64, 128] = Field(
        64, description="input columns sharing one scale; -1: one scale per output channel")
    symmetric: bool = Field(True, description="symmetric grid (zero point 2**(bits-1)); false: asymmetric")
    targets: list[str] = Field(["*"], description="module-name patterns to quantize; \"embed\" and \"lm_head\" "
                               "name the token embedding and the head")
    ignore: list[str] = Field([HEAD_ALIAS, EMBED_ALIAS], description="module-name patterns left in float")
    allow_partial_group: bool = Field(False, description="accept a group size that does not divide a layer's "
                                      "input width (an export format must hold a short last group; vLLM kernels do not)")

    @field_validator("targets")
    @classmethod
    def _some_target(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("targets is empty; give module-name patterns such as ['*'] or ['*.q_proj']")
        return value


def allowed_group_sizes(scheme: QuantScheme) -> tuple[int, ...]:
    """The group sizes ``scheme``'s options model accepts (a method may narrow the field)."""
    annotation = type(scheme).model_fields["group_size"].annotation
    return tuple(get_args(annotation)) if get_origin(annotation) is Literal else GROUP_SIZES


def packed_bits_per_weight(bits: int, group_size: int, symmetric: bool) -> float:
    """Bits one weight costs in the packed layout every quantized export writes: the grid value,
    a float16 scale per group and, for an asymmetric grid, a ``bits``-bit zero point per group
    (a symmetric format implies its zero point). With one group per output channel
    (``group_size = -1``) the scale and zero point are spread over a whole row and counted as
    nothing."""
    if group_size == -1:
        return float(bits)
    return bits + (16 + (0 if symmetric else bits)) / group_size


def _names_embedding(target: str) -> bool:
    return target in (EMBED_ALIAS, HEAD_ALIAS) or "embed" in target or target.endswith("wte")


def covers(scheme: QuantScheme) -> str:
    """``"embedding"`` when only the embedding/head is named, ``"all"`` when the decoder and the
    embedding are both covered, else ``"decoder"``."""
    named = [t for t in scheme.targets if _names_embedding(t)]
    if named and len(named) == len(scheme.targets):
        return "embedding"
    if named or ("*" in scheme.targets and not ({EMBED_ALIAS, HEAD_ALIAS} <= set(scheme.ignore))):
        return "all"
    return "decoder"


def size_effect(scheme: QuantScheme) -> SizeEffect:
    """What quantizing with ``scheme`` does to the size: bits per weight of the packed layout
    (:func:`~pocketlm.weights.packed_bits_per_weight`), what it covers, and the
    ``"quantized-embedding"`` feature where the token embedding is quantized (only formats that
    pack it, GGUF, store it in fewer bits than float16)."""
    covered = covers(scheme)
    features = {"quantized"} | ({"quantized-embedding"} if covered in ("embedding", "all") else set())
    # stages that name their linears one by one (a per-matrix bit allocation) may share a model
    exact = not any(ch in t for t in scheme.targets for ch in "*?[") and covered == "decoder"
    return SizeEffect(bits=packed_bits_per_weight(scheme.bits, scheme.group_size, scheme.symmetric),
                      covers=covered, features=frozenset(features),
                      modules=frozenset(scheme.targets) if exact else None,
                      targets=frozenset(scheme.targets), ignore=frozenset(scheme.ignore))
