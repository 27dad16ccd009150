"""What validating a recipe reads, without yaml or lm_eval: the options of the ``lm-eval``
evaluator. The evaluator (:mod:`pocketlm_lmeval.lmeval`) imports them from here.
"""

from __future__ import annotations

from pydantic import Field

from pocketlm import Options


class LMEvalOptions(Options):
    tasks: list[str] = Field(min_length=1, description="lm-eval task names: from its registry, or local tasks in include_path")
    include_path: str | None = Field(None, description="folder of lm-eval task YAML files, relative to the recipe's folder")
    num_fewshot: int = Field(0, ge=0, description="few-shot examples per question")
    limit: int | None = Field(None, ge=1, description="evaluate at most this many documents per task (None: all)")
    batch_size: int = Field(8, ge=1, description="requests per forward pass")
    recovery: bool = Field(True, description="also evaluate the original model and report accuracy after / original")
