"""pocketlm-lmeval: lm-evaluation-harness tasks as the ``lm-eval`` evaluator.

lm_eval itself is imported only when an evaluation runs, so listing plugins and validating
recipes stay fast."""

from __future__ import annotations

from pocketlm import Evaluator, hookimpl, lazy

from .options import LMEvalOptions

__version__ = "0.1.1"
POCKETLM_API = ">=1.8,<2"

__all__ = ["LMEvalOptions", "evaluate_tasks", "local_task_configs", "register_evaluators", "task_metrics"]


def __getattr__(name: str):
    # the evaluator's functions live in .lmeval (yaml), imported on first use (PEP 562)
    if name in ("evaluate_tasks", "local_task_configs", "task_metrics"):
        from . import lmeval

        return getattr(lmeval, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@hookimpl
def register_evaluators(register):
    register(Evaluator("lm-eval", LMEvalOptions, lazy("pocketlm_lmeval.lmeval:evaluate_tasks"),
                       "lm-evaluation-harness tasks (registry or local YAML + JSONL): accuracy and recovery"))
