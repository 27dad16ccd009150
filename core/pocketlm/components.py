"""What a plugin registers: methods, loaders, evaluators, exporters, architectures, grid rules and
recipe translators.

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


#: Every model feature, with its meaning: what ``SizeEffect.features`` declares and what an
#: exporter ``represents`` and ``packs``. The plugin reference (``pocketlm.reference``) prints it.
FEATURE_DOCS: dict[str, str] = {
    "dense": "plain floating-point weights, as no stage changed them; exporters list it in `represents`, "
             "no method declares it",
    "quantized": "weights on a quantization grid (`QuantizedLinear`, a `PackedGrid` storage)",
    "quantized-embedding": "the token embedding (and a tied head) quantized too; a refinement of "
                           "`quantized`: any exporter that represents `quantized` writes it (dense, if it "
                           "must), only one that lists it in `packs` stores it compactly",
    "masked": "weights set to zero by a mask that later stages keep at zero",
    "restructured": "layers, heads or MLP channels physically removed: the config's shapes changed",
    "thresholds": "activation thresholds applied at run time (dynamic sparsity); an exporter that "
                  "does not list it would write a model that runs dense, so recipes refuse it",
}

#: Every feature a method's size effect may declare (see ``SizeEffect.features``).
FEATURES = frozenset(FEATURE_DOCS) - {"dense"}

# A feature any exporter that represents its parent can write, though not every one packs it.
REFINEMENTS = {"quantized-embedding": "quantized"}


def _field(doc: str, **kwargs) -> Any:
    """A dataclass field with its meaning in ``metadata["doc"]``: the plugin reference's tables
    (``python -m pocketlm.reference``) are rendered from it. ``shown`` is how the reference
    writes a default that is a function."""
    metadata = {"doc": doc}
    if "shown" in kwargs:
        metadata["shown"] = kwargs.pop("shown")
    return field(metadata=metadata, **kwargs)


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
      allocation: one stage per width).
    * ``targets`` and ``ignore`` (API 1.10): the module-name patterns the stage selects by and
      those it leaves alone (``targets`` None: not declared). Two ``exclusive`` stages of one
      kind may also share a model when every pattern one selects by is one the other ignores
      (``targets = ["k_proj", "v_proj"]`` at 5 bits, then ``ignore = ["lm_head", "k_proj",
      "v_proj"]`` at 4)."""

    bits: float | None = _field("bits per stored weight of the layers it targets (None: unchanged)",
                                default=None)
    sparsity: float | None = _field("fraction of the targeted weights set to zero, 0 to 1 (None: unchanged)",
                                    default=None)
    params_removed: float = _field("fraction of the decoder's parameters physically removed, 0 to 1",
                                   default=0.0)
    covers: Literal["decoder", "embedding", "all"] = _field(
        "which weights the effect applies to: the decoder layers' linears, the token embedding and tied "
        "head, or all", default="decoder")
    features: frozenset[str] = _field("what the result holds that an exporter must represent (see the "
                                      "features table)", default=frozenset())
    modules: frozenset[str] | None = _field("the exact module names the stage acts on (None: every layer it "
                                            "covers); lets two exclusive stages share a model", default=None)
    targets: frozenset[str] | None = _field("the module-name patterns the stage selects by (None: not "
                                            "declared); two exclusive stages share a model when every pattern one "
                                            "selects by is one the other ignores (API 1.10)", default=None)
    ignore: frozenset[str] = _field("the module-name patterns the stage leaves as they are (API 1.10)",
                                   default=frozenset())
    recovers: float = _field("the share of the earlier stages' loss this stage is expected to win back, 0 to 1 "
                             "(training after compression); a prior the planner ranks by", default=0.0)


@dataclass(frozen=True)
class Method:
    """A compression method.

    * ``compress(model, options, context)`` changes ``model`` in place (or returns a
      replacement). It must not modify anything else it is handed: the teacher, the calibration
      tensors, other models.
    * ``phase`` places it in the canonical hybrid order (lower runs first); use the
      ``PHASE_*`` constants.
    * ``not_after`` names kinds that must not come before it (pruning refuses to run after a
      quantizer, for example); ``needs_before`` names kinds one of which must (a method that
      trains what a quantizer made needs a quantize stage first).
    * ``exclusive``: at most one stage of this method's kind may target a layer (weight
      quantizers set this).
    * ``plan(budget)``: optional; the option sets the planner may try, as dicts, given a
      ``PlanBudget``. Methods without it are never proposed by the planner."""

    name: str = _field("what recipes write in `method = ...`")
    kind: Kind = _field("`quantize`, `prune`, `distill` or `transform`")
    options: type[Options] = _field("the options model (a `pocketlm.Options` subclass); a stage's keys other "
                                    "than `method` are validated against it")
    compress: Callable[[nn.Module, Any, Context], nn.Module | None] = _field(
        "`compress(model, options, context)`: changes the model in place or returns a replacement")
    summary: str = _field("one line for `pocketlm methods`", default="")
    needs_calibration: bool = _field("the pipeline provides `context.calibration_windows()`", default=False)
    effect: Callable[[Any], SizeEffect] = _field(
        "`effect(options) -> SizeEffect`: the size effect, from the options alone", default=lambda options: SizeEffect(),
        shown="lambda options: SizeEffect()")
    phase: int = _field("place in the canonical hybrid order, lower first (the `PHASE_*` constants)", default=50)
    not_after: frozenset[str] = _field("kinds that must not come before this method", default=frozenset())
    needs_before: frozenset[str] = _field("kinds one of which must come before this method (empty: none)",
                                          default=frozenset())
    exclusive: bool = _field("at most one stage of this kind may target a layer (weight quantizers)",
                             default=False)
    plan: Callable[[Any], list[dict]] | None = _field(
        "`plan(budget) -> list[dict]`: option sets the planner may try (None: never proposed)", default=None)


# Canonical hybrid order: structured pruning, distillation, unstructured pruning, quantization.
PHASE_RESTRUCTURE = 10
PHASE_TRAIN = 20
PHASE_SPARSIFY = 30
PHASE_TRANSFORM = 35
PHASE_QUANTIZE = 40


@dataclass(frozen=True)
class LoadedModel:
    """What a loader returns: the model, its tokenizer and where it came from."""

    model: Any = _field("the model, in eval mode")
    tokenizer: Any = _field("its tokenizer")
    source: str = _field("the source string it was loaded from")
    revision: str | None = _field("the commit a versioned source resolved to (a Hub model's hash); the "
                                  "pipeline records it", default=None)


@dataclass(frozen=True)
class Loader:
    """Turns a model source string into a :class:`LoadedModel`.

    ``matches(source)`` says whether this loader understands ``source``; loaders are tried in
    registration order and the first match loads. ``load(source, options)`` receives the
    recipe's ``[model]`` section. A loader with ``resolves`` only fetches: the core hands the
    local copy to the first other loader that matches it, so a quantized checkpoint on the Hub
    goes to the loader of its format."""

    name: str = _field("the loader's name, shown in errors and `pocketlm plugins`")
    matches: Callable[[str], bool] = _field("`matches(source) -> bool`: whether it understands the source")
    load: Callable[[str, Any], LoadedModel] = _field(
        "`load(source, options) -> LoadedModel`, `options` being the recipe's `[model]` section")
    summary: str = _field("one line saying what it does", default="")
    resolves: Callable[[str, Any], tuple[str, str | None]] | None = _field(
        "`resolves(source, options) -> (local path, revision)`: the source names a copy to fetch (a Hub id); "
        "the other loaders then load the local path, so its format decides (None: `load` loads it)", default=None)


@dataclass(frozen=True)
class Evaluator:
    """A metric. ``evaluate(model, options, context)`` returns a flat dict of numbers whose
    keys are the metric's names (``{"perplexity": 28.1}``)."""

    name: str = _field("what recipes list in `[evaluate] metrics`")
    options: type[Options] = _field("the options model, set in the recipe's `[evaluate.NAME]` table")
    evaluate: Callable[[Any, Any, Context], dict[str, float]] = _field(
        "`evaluate(model, options, context) -> dict[str, float]`: a flat dict of finite numbers")
    summary: str = _field("one line saying what it does", default="")


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

    name: str = _field("what recipes write in `[export] format`")
    options: type[Options] = _field("the options model, set in the recipe's `[export]` table")
    export: Callable[[Any, Path, Any, Context], None] = _field(
        "`export(model, path, options, context)`: writes into `path`, a fresh temporary folder")
    represents: frozenset[str] = _field("the model features it can write (see the features table)",
                                        default=frozenset({"dense", "masked", "restructured"}))
    packs: frozenset[str] = _field("the part of `represents` it stores compactly (a grid as integers); the "
                                   "planner's size estimate and `format = \"auto\"` look at it", default=frozenset())
    check: Callable[..., list[str]] | None = _field(
        "`check(model, options)` or `check(model, options, context) -> list[str]`: problems that stop the "
        "export before anything is written", default=None)
    summary: str = _field("one line saying what it does", default="")
    streams: bool = _field("writes a model streamed from disk layer by layer (`pocketlm.streaming`); "
                           "`pocketlm export` then reads a stage checkpoint's, a safetensors folder's or a `.gguf` "
                           "file's layers one at a time for it",
                           default=False)
    library: str = _field("what reads the export: the model card's Hub `library_name`", default="transformers")

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

    prev: str = _field("the norm or linear whose output channels feed `linears`")
    linears: tuple[str, ...] = _field("the linears whose input channels the scale divides")
    block: str | None = _field("the module whose output measures a change's error (None: the linears)",
                               default=None)
    prev_rows: Literal["all", "second_half"] = _field(
        "which output rows of a fused `prev` feed `linears` (`second_half`: Phi-3's `gate_up_proj`)", default="all")


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

    name: str = _field("the family's name")
    model_types: tuple[str, ...] = _field("the `config.model_type` values it covers")
    layers: str = _field("the module list of the decoder (or encoder) layers")
    embed: str = _field("the token embedding")
    lm_head: str = _field("the output head (an encoder's masked-LM head, or `\"\"` when it has none)")
    final_norm: str = _field("the norm before the head (`\"\"` for post-norm families)")
    sequential: tuple[tuple[str, ...], ...] = _field(
        "a layer's linears grouped in execution order; a group's members read the same input")
    smooth: tuple[Smooth, ...] = _field("scale-folding pairs (`Smooth`)", default=())
    mlp_in: tuple[str, ...] = _field("the linears that read the hidden state into the MLP's width", default=())
    mlp_out: str = _field("the linear that writes the MLP's output back (width pruning)", default="")
    mlp_fused_gate_up: bool = _field("`mlp_in` is one fused gate-and-up linear (Phi-3)", default=False)
    attention: dict[str, str] = _field(
        "the q, k, v and o projections (fused: `qkv`) and the config keys of the head counts (`heads_key`, "
        "`kv_heads_key`)", default_factory=dict, shown="{}")
    extra_embeddings: tuple[str, ...] = _field("other embedding tables (positions, token types)", default=())
    layer_count_key: str = _field("the config key of the layer count", default="num_hidden_layers")
    intermediate_size_key: str = _field("the config key of the MLP's width", default="intermediate_size")
    encoder: bool = _field("the layers attend both ways (BERT): measured by embeddings, not perplexity",
                           default=False)


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

    name: str = _field("what quantizers take in their `grid` option")
    fit: Callable[..., tuple[Any, Any]] = _field(
        "`fit(W, bits, group_size, symmetric, importance=None) -> (scales, zeros)`, both `[rows, groups]`")
    summary: str = _field("one line saying what it does", default="")
    bits: tuple[int, ...] | None = _field("the bit widths it fits (None: any)", default=None)
    group_sizes: tuple[int, ...] | None = _field("the group sizes it fits (None: any)", default=None)
    symmetric: bool | None = _field("the only symmetry it fits (None: either)", default=None)
    uses_importance: bool = _field("`fit` reads `importance`, the per-input-channel weight", default=False)

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


@dataclass(frozen=True)
class Translator:
    """Turns one modifier of another tool's recipe (llm-compressor, SparseML) into pocketlm
    stages, for ``pocketlm import-recipe``.

    ``translate(modifier, siblings)`` receives a :class:`pocketlm.translate.Modifier` (class
    name, arguments, stage, line) and the modifiers after it in the same stage, and returns a
    :class:`pocketlm.translate.Translation` (stage tables, notes, the siblings it covers). An
    argument or a whole modifier with no counterpart raises
    :class:`pocketlm.translate.Untranslatable` with the reason: nothing is dropped silently.
    :class:`pocketlm.translate.Arguments` and :func:`pocketlm.translate.quantization_schemes`
    read the arguments that llm-compressor's modifiers share."""

    name: str = _field("the modifier's class name as recipes write it (`GPTQModifier`)")
    translate: Callable[..., Any] = _field(
        "`translate(modifier, siblings) -> Translation`; raises `Untranslatable` with the reason")
    summary: str = _field("one line saying what it becomes", default="")
    tool: str = _field("the tool whose recipes hold the modifier", default="llm-compressor")
