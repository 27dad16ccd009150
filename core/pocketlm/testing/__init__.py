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


def digest(tensors) -> str:
    """A short sha256 over the bytes, dtypes and shapes of ``tensors`` (a name -> tensor mapping,
    taken in sorted order, or a sequence): for tests that pin results bit for bit."""
    import hashlib

    items = sorted(tensors.items()) if isinstance(tensors, dict) else enumerate(tensors)
    h = hashlib.sha256()
    for name, t in items:
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def model_digest(model) -> str:
    """:func:`digest` of a model's state dict and its sparsity masks (quantized grids included)."""
    from ..weights import masks

    state = dict(model.state_dict())
    state.update({f"{name}.weight_mask": mask for name, mask in masks(model).items()})
    return digest(state)


def free_port() -> int:
    """A TCP port free on this machine now, for a test that starts ``torchrun`` (a fixed port
    fails whenever another run holds it)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
