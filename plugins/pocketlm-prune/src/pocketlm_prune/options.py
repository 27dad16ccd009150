"""What ``validate`` and ``plan`` read without a model: every method's options, size effect and
plans. This module imports no tensor library (only pydantic and pocketlm's light names), so
registering the plugin stays cheap; the methods' modules import their options from here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pocketlm import Options, SizeEffect

PATTERNS = {"2:4": (2, 4), "4:8": (4, 8)}


# ------------------------------------------------------------------ unstructured methods


class PruneOptions(Options):
    """Options every unstructured method takes.

    * ``sparsity``: fraction of each targeted weight matrix set to zero (unstructured);
    * ``pattern``: ``"2:4"`` or ``"4:8"``: keep N of every M consecutive weights along the input
      dimension (semi-structured; replaces ``sparsity``, which is then N/M);
    * ``targets`` / ``ignore``: module-name patterns (``lm_head`` is ignored by default: with tied
      embeddings, pruning the head would prune the input embedding too);
    * ``layer_sparsity``: ``"uniform"`` (every decoder layer gets ``sparsity``) or ``"owl"``
      (outlier-weighted layer-wise sparsity: layers with more activation outliers keep more
      weights, the mean over layers stays ``sparsity``); ``owl_threshold`` (M) and
      ``owl_lambda`` (largest deviation from the mean) are the OWL paper's defaults."""

    sparsity: float = Field(0.5, ge=0.0, lt=1.0, description="fraction of each targeted weight matrix set to zero")
    pattern: Literal["2:4", "4:8"] | None = Field(
        None, description='"2:4" or "4:8": keep N of every M consecutive weights along the input dimension '
        "(replaces sparsity, which is then N/M); None: unstructured")
    targets: list[str] = Field(["*"], description="module-name patterns of the layer linears to prune")
    ignore: list[str] = Field(["lm_head"], description="module-name patterns left dense (the head: with tied "
                              "embeddings, pruning it would prune the input embedding)")
    layer_sparsity: Literal["uniform", "owl"] = Field(
        "uniform", description='"uniform": every layer gets sparsity; "owl": layers with more activation '
        "outliers keep more weights, the mean stays sparsity")
    owl_threshold: float = Field(5.0, gt=0, description="OWL: a score above this many times the layer's mean "
                                 "counts as an outlier")
    owl_lambda: float = Field(0.08, ge=0, lt=0.5, description="OWL: largest deviation of a layer's sparsity "
                              "from the mean")

    @model_validator(mode="after")
    def _check(self):
        if self.pattern is not None and self.layer_sparsity != "uniform":
            raise ValueError("layer_sparsity='owl' varies sparsity per layer; an N:M pattern fixes it, "
                             "so use one or the other")
        if self.layer_sparsity == "owl" and self.sparsity - self.owl_lambda < 0:
            raise ValueError("owl_lambda must not exceed sparsity")
        return self

    @property
    def nm(self) -> tuple[int, int] | None:
        return PATTERNS[self.pattern] if self.pattern else None

    @property
    def target_sparsity(self) -> float:
        return 1 - self.nm[0] / self.nm[1] if self.nm else self.sparsity


def prune_effect(options: PruneOptions) -> SizeEffect:
    return SizeEffect(sparsity=options.target_sparsity, features=frozenset({"masked"}))


def sparsity_plan(budget=None) -> list[dict]:
    """Option sets the hybrid planner may try for an unstructured method."""
    return [{"sparsity": 0.5}, {"pattern": "2:4"}, {"sparsity": 0.3}]


class MagnitudeOptions(PruneOptions):
    scope: Literal["layer", "global"] = Field(
        "layer", description='"layer": rank each weight matrix on its own; "global": one threshold over every '
        "targeted weight of the model (layers with small weights lose more)")


class WandaOptions(PruneOptions):
    pass


class SparseGPTOptions(PruneOptions):
    block_size: int = Field(128, gt=0, description="columns whose mask is chosen together before their error "
                            "is spread over the columns to their right")
    damp: float = Field(0.01, gt=0, description="added to the Hessian's diagonal, as a fraction of its mean, so "
                        "it inverts stably")


# --------------------------------------------------------------------------- prune-width


class WidthOptions(Options):
    """Give ``mlp_ratio`` (fraction of MLP channels removed) or ``intermediate_size`` (channels
    kept), and/or ``head_ratio`` (fraction of key/value groups removed, each with its query
    heads) or ``kv_heads`` (groups kept)."""

    mlp_ratio: float | None = Field(None, ge=0, lt=1, description="fraction of MLP intermediate channels removed "
                                    "from every layer")
    intermediate_size: int | None = Field(None, gt=0, description="MLP intermediate channels kept in every layer "
                                          "(instead of mlp_ratio)")
    head_ratio: float | None = Field(None, ge=0, lt=1, description="fraction of key/value head groups removed "
                                     "from every layer, each with its query heads")
    kv_heads: int | None = Field(None, gt=0, description="key/value head groups kept in every layer (instead "
                                 "of head_ratio)")

    @model_validator(mode="after")
    def _check(self):
        if self.mlp_ratio is not None and self.intermediate_size is not None:
            raise ValueError("give mlp_ratio or intermediate_size, not both")
        if self.head_ratio is not None and self.kv_heads is not None:
            raise ValueError("give head_ratio or kv_heads, not both")
        if all(v is None for v in (self.mlp_ratio, self.intermediate_size, self.head_ratio, self.kv_heads)):
            raise ValueError("give at least one of mlp_ratio, intermediate_size, head_ratio, kv_heads")
        return self


def width_effect(options: WidthOptions) -> SizeEffect:
    # Estimate for a llama-shaped decoder: the MLP holds about 2/3 of a layer's weights.
    removed = (options.mlp_ratio or 0) * 2 / 3 + (options.head_ratio or 0) / 3
    return SizeEffect(params_removed=removed, features=frozenset({"restructured"}))


def width_plan(budget=None) -> list[dict]:
    return [{"mlp_ratio": 0.25}, {"mlp_ratio": 0.5}, {"mlp_ratio": 0.25, "head_ratio": 0.34}]


# --------------------------------------------------------------------------- prune-depth


SCORED_FIELDS = ("layers", "metric", "samples")


class DepthOptions(Options):
    """Remove the ``layers`` lowest-scoring layers by ``metric``, or the layers named by ``drop`` /
    ``keep`` (then nothing is scored and ``layers``, ``metric`` and ``samples`` stay unset)."""

    layers: int = Field(1, ge=1, description="how many layers to remove, the lowest-scoring ones by metric")
    metric: Literal["block-influence", "perplexity", "embedding"] = Field(
        "block-influence", description='how layers are scored: "block-influence" (1 - cos of a layer\'s input and '
        'output hidden state), "perplexity" (calibration-loss increase without the layer; causal LMs) or '
        '"embedding" (1 - cos of the sentence embedding with and without the layer; encoders)')
    samples: int = Field(8, ge=1, description="calibration windows per evaluation for metric = perplexity or "
                         "embedding")
    drop: list[int] | None = Field(None, description="zero-based indices of the layers to remove, chosen by hand "
                                   "(no scoring), e.g. [1, 3, 5]")
    keep: Literal["every-other"] | None = Field(
        None, description='"every-other": keep layers 0, 2, 4, ... and remove the odd ones, chosen by hand (a '
        "DistilBERT-style student)")

    @model_validator(mode="after")
    def _check(self):
        if self.drop is not None and self.keep is not None:
            raise ValueError("give drop or keep, not both")
        scored = sorted(set(SCORED_FIELDS) & self.model_fields_set)
        if self.chosen_by_hand and scored:
            raise ValueError(f"{', '.join(scored)} score layers, drop/keep choose them by hand: give one or the other")
        if self.drop is not None:
            if not self.drop:
                raise ValueError("drop names no layer")
            if min(self.drop) < 0:
                raise ValueError("drop takes zero-based layer indices (0 is the first layer)")
            if len(set(self.drop)) != len(self.drop):
                raise ValueError("drop names a layer twice")
        return self

    @property
    def chosen_by_hand(self) -> bool:
        return self.drop is not None or self.keep is not None


REFERENCE_DEPTH = 30  # used only to estimate the size effect before a model is known


def depth_effect(options: DepthOptions) -> SizeEffect:
    if options.keep == "every-other":
        removed = 0.5
    else:
        removed = min(1.0, (len(options.drop) if options.drop is not None else options.layers) / REFERENCE_DEPTH)
    return SizeEffect(params_removed=removed, features=frozenset({"restructured"}))


def depth_plan(budget=None) -> list[dict]:
    return [{"layers": 2}, {"layers": 4}, {"layers": 6}]
