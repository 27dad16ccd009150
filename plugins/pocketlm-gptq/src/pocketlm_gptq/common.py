"""What rtn and gptq share: the options every weight quantizer takes, which modules a stage
quantizes, the up-front group-size check, the size effect and the planner's option sets.

Names in ``targets``/``ignore`` are module-name patterns (see ``pocketlm.modules.matches``).
Two aliases are resolved through the model's architecture table so a recipe works on every
family: ``"embed"`` is the token embedding (``model.embed_tokens``, ``transformer.wte`` ...) and
``"lm_head"`` the output head. Both are ignored by default; a stage quantizes them only when a
target names them (or ``"*"``) and ``ignore`` no longer lists them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field, field_validator
from torch import nn

from pocketlm import Options, PocketError, SizeEffect
from pocketlm.modules import get_module, matches, select_linears
from pocketlm.weights import linear_shape

GROUP_SIZES = (-1, 16, 32, 64, 128)
EMBED_ALIAS = "embed"


class QuantOptions(Options):
    """Options shared by the weight-only quantizers.

    * ``bits``: 2, 3, 4, 5, 6 or 8 bits per weight (5 and 6 are written by the ``gguf`` exporter
      only, as Q5_K/Q6_K or Q5_0/Q5_1 blocks).
    * ``group_size``: -1 (one scale per output channel) or 16/32/64/128 input columns per scale.
      The default 64 divides the widths of every built-in tiny model and of the reference model
      (576, 1536); 128 does not divide 576 and is refused there (see ``allow_partial_group``).
    * ``symmetric``: symmetric grid (zero point 2**(bits-1), the GPTQ/vLLM default) or asymmetric.
    * ``targets`` / ``ignore``: module-name patterns; ``"embed"`` and ``"lm_head"`` are aliases for
      the architecture's token embedding and head.
    * ``grid``: the registered grid rule that chooses each group's scale and zero point
      (``pocketlm plugins`` lists them): ``"minmax"`` (default), ``"weighted-mse"`` (weighted by the
      mean squared activation of each input channel), or a format's own grid such as the
      ``gguf`` plugin's ``"q4_k"``.
    * ``allow_partial_group``: accept a group size that does not divide a layer's input width
      (the last group is short). The ``gptq`` format can hold that; ``compressed-tensors`` and vLLM
      cannot, so it is off by default and such a layer is refused up front.
    """

    bits: Literal[2, 3, 4, 5, 6, 8] = Field(4, description="bits per weight (5 and 6: gguf export only)")
    group_size: Literal[-1, 16, 32, 64, 128] = Field(
        64, description="input columns sharing one scale; -1: one scale per output channel")
    symmetric: bool = Field(True, description="symmetric grid (zero point 2**(bits-1)); false: asymmetric")
    targets: list[str] = Field(["*"], description="module-name patterns to quantize; \"embed\" and \"lm_head\" "
                               "name the token embedding and the head")
    ignore: list[str] = Field(["lm_head", EMBED_ALIAS], description="module-name patterns left in float")
    allow_partial_group: bool = Field(False, description="accept a group size that does not divide a layer's "
                                      "input width (the gptq format holds it; compressed-tensors and vLLM do not)")
    grid: str = Field("minmax", description="grid rule choosing each group's scale and zero point "
                      "(minmax, weighted-mse, or one a plugin registers, such as q4_k)")

    @field_validator("targets")
    @classmethod
    def _some_target(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("targets is empty; give module-name patterns such as ['*'] or ['*.q_proj']")
        return value


# ----------------------------------------------------------------------------- selection


@dataclass
class Selection:
    """What a stage quantizes: decoder (and other) linears by name, and whether the token
    embedding (with its tied head, if tied) is included."""

    linears: dict[str, nn.Module]
    embed: str | None          # the embedding's module name when it is quantized
    tied: bool                 # the head shares the embedding's weight
    head: str                  # the head's module name


def _resolve(patterns: list[str], embed: str, head: str) -> list[str]:
    return [embed if p == EMBED_ALIAS else p for p in patterns]


def select(model: nn.Module, options: QuantOptions, architecture) -> Selection:
    """Resolve ``targets``/``ignore`` on ``model``. Tied embeddings are one weight: naming either
    the embedding or the head quantizes the shared grid, used by both."""
    embed, head = architecture.embed, architecture.lm_head
    targets = _resolve(options.targets, embed, head)
    ignore = _resolve(options.ignore, embed, head)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    linears = select_linears(model, targets, ignore)
    # An exact name in targets beats the default ignore: targets = ["embed"] is enough.
    want_embed = embed in targets or (matches(embed, targets) and not matches(embed, ignore))
    if head in targets:
        try:
            linears[head] = get_module(model, head)
        except AttributeError:
            pass
    want_head = head in linears
    if tied and (want_embed or want_head):
        linears.pop(head, None)
        want_embed = True
    try:
        get_module(model, embed)
    except AttributeError:
        want_embed = False
    return Selection(linears, embed if want_embed else None, tied, head)


def grid_rule(context, options: QuantOptions):
    """The registered ``GridRule`` named by ``options.grid``, looked up through the context's plugins."""
    plugins = getattr(context, "plugins", None)
    if plugins is None:
        from pocketlm.plugins import get_plugins

        plugins = get_plugins()
    rule = plugins.grid_rules.get(options.grid)
    if rule is None:
        raise PocketError(f"unknown grid rule {options.grid!r}", field="grid",
                          fix="installed grid rules: " + ", ".join(sorted(plugins.grid_rules)))
    problems = rule.problems(options.bits, options.group_size, options.symmetric)
    if problems:
        raise PocketError(f"grid rule {options.grid!r} needs " + ", ".join(problems), field="grid",
                          fix="change those options or choose another grid")
    return rule


# ------------------------------------------------------------------------ group-size check


def check_group_size(model: nn.Module, selection: Selection, options: QuantOptions, method: str) -> None:
    """Refuse, before any work, a group size that does not divide a selected layer's input width."""
    if options.group_size == -1 or options.allow_partial_group:
        return
    widths = {name: linear_shape(m)[1] for name, m in selection.linears.items()}
    if selection.embed is not None:
        widths[selection.embed] = get_module(model, selection.embed).weight.shape[1]
    bad = {name: w for name, w in widths.items() if w % options.group_size}
    if not bad:
        return
    working = [g for g in GROUP_SIZES if g == -1 or all(w % g == 0 for w in widths.values())]
    shown = ", ".join(f"{n} (in={w})" for n, w in list(bad.items())[:4])
    more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
    raise PocketError(
        f"{method}: group_size {options.group_size} does not divide the input width of "
        f"{len(bad)} layer(s): {shown}{more}",
        field="group_size",
        fix=f"use a group size that divides every width: {', '.join(map(str, working))}; or ignore "
        "those layers; or set allow_partial_group = true if your export format is gptq "
        "(compressed-tensors and vLLM need whole groups)",
    )


# ------------------------------------------------------------------------ effect and plan


def _embedding_names(target: str) -> bool:
    return target in (EMBED_ALIAS, "lm_head") or "embed" in target or target.endswith("wte")


def _covers(options: QuantOptions) -> str:
    """``"embedding"`` when only the embedding/head is named, ``"all"`` when the decoder and the
    embedding are both covered, else ``"decoder"``."""
    named = [t for t in options.targets if _embedding_names(t)]
    if named and len(named) == len(options.targets):
        return "embedding"
    if named or ("*" in options.targets and not ({EMBED_ALIAS, "lm_head"} <= set(options.ignore))):
        return "all"
    return "decoder"


def effect(options: QuantOptions) -> SizeEffect:
    """Bits per weight including the float16 scale (and, asymmetric, the zero point) per group
    (approximate: per channel the overhead is spread over a whole row and counted as nothing).
    A quantized token embedding is the ``"quantized-embedding"`` feature: only formats that pack
    it (GGUF) store it in fewer bits than float16."""
    per_group = 16 if options.symmetric else 32
    overhead = 0.0 if options.group_size == -1 else per_group / options.group_size
    covers = _covers(options)
    features = {"quantized"} | ({"quantized-embedding"} if covers in ("embedding", "all") else set())
    # stages that name their linears one by one (a mixed-precision allocation) may share a model
    exact = not any(ch in t for t in options.targets for ch in "*?[") and covers == "decoder"
    return SizeEffect(bits=options.bits + overhead, covers=covers, features=frozenset(features),
                      modules=frozenset(options.targets) if exact else None)
