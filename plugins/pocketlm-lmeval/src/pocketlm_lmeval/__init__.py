"""pocketlm-lmeval: lm-evaluation-harness tasks as the ``lm-eval`` evaluator.

lm_eval itself is imported only when an evaluation runs, so listing plugins and validating
recipes stay fast."""

from __future__ import annotations

from pocketlm import Evaluator, hookimpl

from .lmeval import LMEvalOptions, evaluate_tasks, local_task_configs, task_metrics

__version__ = "0.1.0"
POCKETLM_API = ">=1.0,<2"

__all__ = ["LMEvalOptions", "evaluate_tasks", "local_task_configs", "register_evaluators", "task_metrics"]


@hookimpl
def register_evaluators(register):
    register(Evaluator("lm-eval", LMEvalOptions, evaluate_tasks,
                       "lm-evaluation-harness tasks (registry or local YAML + JSONL): accuracy and recovery"))
