"""What a plugin registers: methods, loaders, evaluators, exporters, architectures and grid rules.

A plugin builds these objects and hands them to the ``register`` callback of the matching
registration hook (see :mod:`pocketlm.hookspecs`). The core owns ordering, duplicate detection
and error reporting; these classes only describe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from .context import Context

Kind = Literal["quantize", "prune", "distill", "transform"]
KINDS: tuple[str, ...] = ("quantize", "prune", "distill", "transform")


class Options(BaseModel):
    """Base class for option models: typed, closed (unknown keys are errors) and validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoOptions(Options):
    """For components that take no options."""


#: Every feature a method's size effect may declare (see ``SizeEffect.features``).
FEATURES = frozenset({"quantized", "quantized-embedding", "masked", "restructured", "thresholds"})

# A feature any exporter that represents its parent can write, though not every one packs it.
REFINEMENTS = {"quantized-embedding": "quantized"}


def unrepresented(features, represents) -> set[str]:
    """The ``features`` an exporter that ``represents`` these cannot write."""
    missing = set(features) - {"dense"} - set(represents)
    return {f for f in missing if REFINEMENTS.get(f) not in represents}


@dataclass(frozen=True)
class SizeEffect:
    """What a method does to the model's size, estimated from its options alone.

    * ``bits``: bits per stored weight of the layers it targets (None: unchanged);
    * ``sparsity``: fraction of targeted weights set to zero (None: unchanged);
    * ``params_removed``: fraction of the decoder's parameters physically removed;
    * ``covers``: which weights the effect applies to: ``"decoder"`` (the linears of the
      decoder layers), ``"embedding"`` (token embedding and tied head) or ``"all"``.
    * ``features``: what the result holds that an exporter must represent, from
      ``{"quantized", "masked", "restructured"}``, plus ``"quantized-embedding"`` when the token
      embedding is quantized. That one is a refinement of ``"quantized"``: every exporter that
      represents ``"quantized"`` can write it (dense, if it must), and only an exporter that
      lists it in ``packs`` stores it compactly, which is what the planner's size estimate and
      ``format = "auto"`` look at. ``"thresholds"``: the model applies activation thresholds at
      run time (dynamic sparsity); only an exporter that lists it keeps them, so recipes refuse
      the others rather than export a model that would run dense.
    * ``modules``: the exact module names the stage acts on, where it names them one by one
      (None: every layer it ``covers``). Two ``exclusive`` stages of one kind may share a model
      only when both name their modules and the names are disjoint (a per-matrix bit
      allocation: one stage per width)."""

    bits: float | None = None
    sparsity: float | None = None
    params_removed: float = 0.0
    covers: Literal["decoder", "embedding", "all"] = "decoder"
    features: frozenset[str] = frozenset()
    modules: frozenset[str] | None = None


@dataclass(frozen=True)
class Method:
    """A compression method.

    * ``compress(model, options, context)`` changes ``model`` in place (or returns a
      replacement). It must not modify anything else it is handed: the teacher, the calibration
      tensors, other models.
    * ``phase`` places it in the canonical hybrid order (lower runs first); use the
      ``PHASE_*`` constants.
    * ``not_after`` names kinds that must not come before it (pruning refuses to run after a
      quantizer, for example).
    * ``exclusive``: at most one stage of this method's kind may target a layer (weight
      quantizers set this).
    * ``plan(budget)``: optional; the option sets the planner may try, as dicts, given a
      ``PlanBudget``. Methods without it are never proposed by the planner."""

    name: str
    kind: Kind
    options: type[Options]
    compress: Callable[["nn.Module", Any, "Context"], "nn.Module | None"]
    summary: str = ""
    needs_calibration: bool = False
    effect: Callable[[Any], SizeEffect] = field(default=lambda options: SizeEffect())
    phase: int = 50
    not_after: frozenset[str] = frozenset()
    exclusive: bool = False
    plan: Callable[[Any], list[dict]] | None = None


# Canonical hybrid order: structured pruning, distillation, unstructured pruning, quantization.
PHASE_RESTRUCTURE = 10
PHASE_TRAIN = 20
PHASE_SPARSIFY = 30
PHASE_TRANSFORM = 35
PHASE_QUANTIZE = 40


@dataclass(frozen=True)
class LoadedModel:
    """What a loader returns: the model, its tokenizer and where it came from."""

    model: Any
    tokenizer: Any
    source: str
    revision: str | None = None  # the commit a versioned source resolved to (a Hub model's hash)


@dataclass(frozen=True)
class Loader:
    """Turns a model source string into a :class:`LoadedModel`.

    ``matches(source)`` says whether this loader understands ``source``; loaders are tried in
    registration order and the first match loads. ``load(source, options)`` receives the
    recipe's ``[model]`` section."""

    name: str
    matches: Callable[[str], bool]
    load: Callable[[str, Any], LoadedModel]
    summary: str = ""


@dataclass(frozen=True)
class Evaluator:
    """A metric. ``evaluate(model, options, context)`` returns a flat dict of numbers whose
    keys are the metric's names (``{"perplexity": 28.1}``)."""

    name: str
    options: type[Options]
    evaluate: Callable[[Any, Any, "Context"], dict[str, float]]
    summary: str = ""


@dataclass(frozen=True)
class Exporter:
    """Writes a model to ``path``.

    ``export(model, path, options, context)`` writes into ``path``, a fresh temporary folder the
    core renames into place when it returns, so an export is never seen half-written.
    ``represents`` is the set of model features it can write (``"dense"``, ``"quantized"``,
    ``"masked"``, ``"restructured"``). ``check(model, options, context)`` optionally returns a
    list of problems that stop the export before anything is written; ``context`` is the run's
    (``context.architecture(model)`` says where the layers are). A check written for API 1.3 and
    before, ``check(model, options)``, keeps working: :meth:`problems` passes the context only to
    a check that accepts a third argument. ``packs`` is the subset of
    ``represents`` it stores compactly (a quantized grid as integers, not dequantized floats);
    the planner exports quantized candidates with an exporter that packs them (see
    ``SizeEffect.features`` for ``"quantized-embedding"``)."""

    name: str
    options: type[Options]
    export: Callable[[Any, Path, Any, "Context"], None]
    represents: frozenset[str] = frozenset({"dense", "masked", "restructured"})
    packs: frozenset[str] = frozenset()
    check: Callable[..., list[str]] | None = None
    summary: str = ""
    streams: bool = False   # writes a model streamed from disk layer by layer (pocketlm.streaming)
    library: str = "transformers"   # what reads the export: the model card's Hub library_name

    def problems(self, model, options, context=None) -> list[str]:
        """What ``check`` finds wrong (empty: the export can go ahead), passing ``context`` to a
        check that takes one. Call this rather than ``check`` itself."""
        if self.check is None:
            return []
        return self.check(model, options, *context_arguments(self.check, context))


def context_arguments(check: Callable, context) -> tuple:
    """The arguments after ``(model, options)`` that ``check`` takes: ``(context,)`` where it
    accepts a third (``check(model, options, context)``, a defaulted ``context=None``,
    ``*args``), else none, so a check written as ``check(model, options)`` is called as it
    always was. A keyword-only third parameter is not filled in."""
    import inspect

    try:
        inspect.signature(check).bind(None, None, None)
    except (TypeError, ValueError):   # no third parameter, or no signature to inspect (a builtin)
        return ()
    return (context,)


@dataclass(frozen=True)
class Smooth:
    """A pair a scale can be folded through: ``prev``'s output channels feed ``linears``'s
    input channels. ``prev`` is a norm or a linear; ``block`` is the module whose output
    measures the error of a change (None: the linears themselves). ``prev_rows`` selects the
    output rows of a fused ``prev`` that feed ``linears`` (``"second_half"`` for Phi-3's
    ``gate_up_proj``)."""

    prev: str
    linears: tuple[str, ...]
    block: str | None = None
    prev_rows: Literal["all", "second_half"] = "all"


@dataclass(frozen=True)
class Architecture:
    """Where things are in a model family, as names relative to the model (or to a layer for
    the per-layer fields).

    * ``sequential``: the linears of a decoder layer, grouped in execution order; a group's
      members read the same input.
    * ``smooth``: scale-folding pairs (norm → q/k/v, norm → gate/up, up → down, v → o).
    * ``mlp_in``/``mlp_out``: the linears that read the hidden state into the MLP's
      intermediate width and the one that writes it back (for width pruning).
    * ``attention``: names for q, k, v and o projections (fused: ``qkv``) and the config keys
      that hold head counts.
    * ``encoder``: the layers attend in both directions (the BERT family). The model makes
      sentence embeddings rather than next-token predictions, so it is evaluated by embeddings
      (``embedding-fidelity``, ``retrieval``), not perplexity. ``lm_head`` names the masked-LM
      head's output linear, or is ``""`` when the model has none; ``final_norm`` is ``""`` for
      post-norm families.

    Several architectures may share a model type when their modules sit at different paths (a
    bare ``BertModel`` and a ``BertForMaskedLM``): the first whose ``layers`` exists in the model
    is used."""

    name: str
    model_types: tuple[str, ...]
    layers: str
    embed: str
    lm_head: str
    final_norm: str
    sequential: tuple[tuple[str, ...], ...]
    smooth: tuple[Smooth, ...] = ()
    mlp_in: tuple[str, ...] = ()
    mlp_out: str = ""
    mlp_fused_gate_up: bool = False
    attention: dict[str, str] = field(default_factory=dict)
    extra_embeddings: tuple[str, ...] = ()
    layer_count_key: str = "num_hidden_layers"
    intermediate_size_key: str = "intermediate_size"
    encoder: bool = False


@dataclass(frozen=True)
class GridRule:
    """How a weight quantizer chooses each group's grid (scale and zero point).

    ``fit(W, bits, group_size, symmetric, importance=None) -> (scales, zeros)``: a pure function
    of ``W`` (``[rows, cols]`` float32) returning float32 ``scales`` (float16-representable values)
    and integer-valued ``zeros``, both ``[rows, groups]`` (``group_size = -1``: one group per row;
    a last group shorter than ``group_size`` covers the remaining columns), for the grid
    ``w = (q - zero) * scale`` with ``q`` in ``[0, 2**bits - 1]``. ``importance`` is an optional
    ``[cols]`` weight per input channel (the mean squared activation: the diagonal of a layer
    Hessian); a rule that ignores it leaves ``uses_importance`` False. Every tensor it makes
    lives on ``W``'s device.

    ``bits``, ``group_sizes`` and ``symmetric`` restrict the settings a rule supports (None: any);
    recipes that ask a rule for others are refused before anything runs. Quantizers take the
    rule's name in an option called ``grid``."""

    name: str
    fit: Callable[..., tuple[Any, Any]]
    summary: str = ""
    bits: tuple[int, ...] | None = None
    group_sizes: tuple[int, ...] | None = None
    symmetric: bool | None = None
    uses_importance: bool = False

    def problems(self, bits: int, group_size: int, symmetric: bool) -> list[str]:
        """Why this rule cannot fit grids of these settings (empty: it can)."""
        found = []
        if self.bits is not None and bits not in self.bits:
            found.append(f"bits = {' or '.join(map(str, self.bits))} (not {bits})")
        if self.group_sizes is not None and group_size not in self.group_sizes:
            found.append(f"group_size = {' or '.join(map(str, self.group_sizes))} (not {group_size})")
        if self.symmetric is not None and symmetric != self.symmetric:
            found.append(f"symmetric = {str(self.symmetric).lower()}")
        return found
