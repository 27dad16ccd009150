"""What registration, ``validate`` and ``plan`` read without a model: the options of
``activation-sparsity`` and of the ``dynamic`` exporter, the method's size effect and plans, and
how the loader recognises a ``dynamic`` export. This module imports no tensor library, so
registering the plugin stays cheap; :mod:`.sparsity` and :mod:`.export` import from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from pocketlm import Options, SizeEffect

#: The sidecar a ``dynamic`` export writes beside the weights: the thresholds.
SIDECAR = "activation-thresholds.json"
#: The second sidecar, where thresholded linears carry a low-rank correction: its factors.
LOW_RANK_SIDECAR = "activation-low-rank.safetensors"


class ActivationSparsityOptions(Options):
    """Options of ``activation-sparsity``.

    * ``sparsity``: model-wide fraction of input channels skipped, weighted by the weight bytes
      each channel's column holds (what decoding saves); 0 is the dense model.
    * ``allocation``: ``uniform`` (every thresholded input at ``sparsity``), ``greedy`` (TEAL's
      block-wise greedy allocation on each decoder layer's output error; each layer still reaches
      ``sparsity``) or ``greedy-proxy`` (the same search on each linear's own output error: no
      layer reruns, cheaper, less faithful).
    * ``mode``: ``teal`` (every linear's input) or ``cats`` (the MLP gate activation only).
    * ``targets`` / ``ignore``: module-name patterns of the linears to threshold (``teal``) or
      of the down projections whose gate activation is thresholded (``cats``).
    * ``low_rank``: rank of a correction for what the skipped inputs would have added (the idea
      of R-Sparse, Zhang et al., 2025): each thresholded linear ``W`` also computes
      ``A (B (x - x_kept))`` with ``A B`` the rank-``low_rank`` truncated SVD of ``W``, so the
      small inputs still act through ``W``'s main directions. Decoding reads the ``A`` and ``B``
      rows besides the surviving columns (``rank * (out + in)`` weights at most per linear); 0:
      no correction (TEAL as published)."""

    sparsity: float = Field(0.4, description="model-wide fraction of input channels skipped, in [0, 0.95]")
    allocation: Literal["uniform", "greedy", "greedy-proxy"] = Field(
        "uniform", description="uniform: every input at `sparsity`; greedy: TEAL's block-wise greedy allocation "
                               "on each layer's output error; greedy-proxy: the same on each linear's own error")
    mode: Literal["teal", "cats"] = Field(
        "teal", description="teal: threshold every linear's input; cats: threshold the MLP gate activation only")
    targets: list[str] = Field(["*"], description="module-name patterns of the linears to threshold")
    ignore: list[str] = Field(["lm_head"], description="module-name patterns left dense (the head by default)")
    low_rank: int = Field(0, ge=0, description="rank of the truncated-SVD correction of the skipped inputs' "
                                                "contribution per thresholded linear (R-Sparse's idea); 0: none")

    @model_validator(mode="after")
    def _check(self):
        if not 0.0 <= self.sparsity <= 0.95:
            raise ValueError(f"sparsity must lie in [0, 0.95] (a fraction of input channels skipped), "
                             f"not {self.sparsity}")
        if self.mode == "cats" and self.allocation != "uniform":
            raise ValueError("mode='cats' has one threshold per decoder layer (the gate activation), so there "
                             "is nothing to allocate within a layer: use allocation='uniform'")
        if self.mode == "cats" and self.low_rank:
            raise ValueError("low_rank corrects the skipped inputs of thresholded linears (mode='teal'); "
                             "mode='cats' thresholds the gate activation: remove low_rank or use mode='teal'")
        return self


def effect(options: ActivationSparsityOptions) -> SizeEffect:
    # Nothing is stored smaller: the size effect is zero. The speed effect is at run time
    # (about 1/(1 - sparsity) fewer weight bytes read per decoded token on the thresholded
    # linears), which only an exporter that keeps the thresholds preserves.
    return SizeEffect(features=frozenset({"thresholds"}) if options.sparsity > 0 else frozenset())


def plan(budget) -> list[dict]:
    """Proposed beside weight methods: size unchanged, decoding faster (TEAL's 40%)."""
    return [{"sparsity": 0.4, "allocation": "greedy"}]


class DynamicExportOptions(Options):
    base: str = Field("auto", description="exporter that writes the weights (hf, gguf, compressed-tensors, ...); "
                                          "auto: the installed one that packs most of the model")
    base_options: dict[str, Any] = Field(default_factory=dict, description="options of the base exporter")


def is_dynamic_export(source: str) -> bool:
    return (Path(source) / SIDECAR).is_file()
