"""The evaluator check: a flat dict of finite numbers, the model left as it was found;
``EvaluatorConformance``."""

from __future__ import annotations

import math
from typing import Any, Mapping

from torch import nn

from ...components import Evaluator
from .. import make_context
from ._shared import _component, _plugins, _raise, state_hash, tiny, windows


def check_evaluator(name: str, options: Mapping[str, Any] | None = None, *, model: nn.Module | None = None,
                    family: str = "llama", tokenizer=None, plugins=None) -> dict[str, float]:
    """Evaluator ``name`` returns a non-empty flat dict of finite numbers and leaves the model
    (weights and train/eval mode) as it found it."""
    plugins = _plugins(plugins)
    evaluator: Evaluator = _component(plugins, "evaluators", name)
    built = evaluator.options(**dict(options or {}))
    if tokenizer is None:
        from ..models import tiny_tokenizer

        tokenizer = tiny_tokenizer()
    model = tiny(family, vocab_size=len(tokenizer)) if model is None else model
    problems = []
    before = state_hash(model)
    for mode in (False, True):
        model.train(mode)
        context = make_context(windows(), tokenizer=tokenizer, plugins=plugins)
        result = plugins.hook.evaluate(model=model, evaluator=evaluator, options=built, context=context)
        if model.training != mode:
            problems.append(f"it left the model in {'train' if model.training else 'eval'} mode "
                            f"(it was handed it in {'train' if mode else 'eval'} mode)")
        if not isinstance(result, dict) or not result:
            problems.append(f"it returned {result!r}; expected a non-empty dict of metric name to number")
            break
        for key, value in result.items():
            if not isinstance(key, str):
                problems.append(f"key {key!r} is not a string")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                problems.append(f"{key} = {value!r} is not a float (convert tensors with .item())")
            elif not math.isfinite(value):
                problems.append(f"{key} = {value} is not finite")
    model.eval()
    if state_hash(model) != before:
        problems.append("evaluating changed the model")
    _raise(f"evaluator {name!r}", problems)
    return result


class EvaluatorConformance:
    """Subclass as ``TestSomething``; set ``evaluator`` and ``options``."""

    evaluator: str = ""
    options: dict = {}

    def test_evaluator_contract(self):
        check_evaluator(self.evaluator, self.options)
