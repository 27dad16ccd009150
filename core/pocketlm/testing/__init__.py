"""The conformance kit and tiny-model fixtures for plugin authors (a pytest plugin)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..context import Context


def make_context(windows: torch.Tensor | None = None, *, tokenizer=None, teacher=None,
                 stage_dir: Path | None = None, seed: int = 0, plugins=None) -> Context:
    """A :class:`pocketlm.Context` for calling a method directly in a test: calibration
    ``windows`` are used as given; ``teacher`` (a model) is what ``context.teacher()`` returns."""
    from ..plugins import get_plugins

    context = Context(tokenizer=tokenizer, plugins=plugins or get_plugins(), stage_dir=stage_dir, seed=seed,
                      logger=lambda message: None)
    context._windows = windows
    if teacher is not None:
        context.teacher_factory = lambda: teacher
    return context
