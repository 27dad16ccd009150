"""What every part of the conformance kit shares: the tiny models and windows, the error type,
finding a registered component, hashing and comparing tensors, and scratch folders."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Mapping

import torch
from torch import nn

from ...weights import QuantizedLinear, masks
from ..models import tiny_model, tiny_windows

#: The architectures every method is run on (the four families with distinct layouts:
#: llama-style GQA, qwen2 with q/k/v biases, GPT-2's transposed fused Conv1D, OPT).
FAMILIES = ("llama", "qwen2", "gpt2", "opt")
#: Calibration windows × tokens per window: small, so each check takes a second or two.
WINDOWS, SEQ_LEN = 4, 16
#: Tolerance on logits after a save-and-reload round trip.
ATOL = 1e-4


class ConformanceError(AssertionError):
    """One or more contract violations, each on its own line."""

    def __init__(self, what: str, problems: list[str]):
        self.what, self.problems = what, list(problems)
        super().__init__(f"{what}:\n  - " + "\n  - ".join(self.problems))

    def __reduce__(self):  # picklable (pytest-xdist sends failures between processes)
        return (type(self), (self.what, self.problems))


def _raise(what: str, problems: list[str]) -> None:
    if problems:
        raise ConformanceError(what, problems)


# --------------------------------------------------------------------------- fixtures


def tiny(family: str = "llama", *, seed: int = 0, **sizes) -> nn.Module:
    """A tiny random model of ``family`` (see :func:`pocketlm.testing.models.tiny_model`)."""
    return tiny_model(family, seed=seed, **sizes)


def windows(n: int = WINDOWS, seq_len: int = SEQ_LEN, *, seed: int = 0) -> torch.Tensor:
    """Calibration token windows ``[n, seq_len]`` for the tiny models."""
    return tiny_windows(n, seq_len, seed=seed)


def _plugins(plugins=None):
    if plugins is not None:
        return plugins
    from ...plugins import get_plugins

    return get_plugins()


def _component(plugins, table: str, name: str):
    found = getattr(plugins, table)
    if table == "loaders":
        found = {loader.name: loader for loader in found}
    if name not in found:
        problems = "; ".join(f"{p.name}: {p.reason}" for p in plugins.problems)
        raise ConformanceError(f"{table[:-1]} {name!r}", [
            f"is not registered (installed {table}: {', '.join(sorted(found)) or 'none'})"
            + (f"; skipped plugins: {problems}" if problems else "")
            + "; is the plugin installed (pip install -e .) and its entry point in the 'pocketlm' group?"])
    return found[name]


# ---------------------------------------------------------------------------- hashing


def tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor that defines ``model``: its state dict plus the sparsity masks (which are
    non-persistent buffers and so not in the state dict)."""
    found = {k: v.detach() for k, v in model.state_dict().items()}
    found.update({f"{name}#mask": mask for name, mask in masks(model).items()})
    return found


def _bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return flat.view(torch.uint8).numpy().tobytes()


def state_hash(model_or_tensor) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of a model's tensors (or of one tensor)."""
    digest = hashlib.sha256()
    items = ({"": model_or_tensor} if isinstance(model_or_tensor, torch.Tensor)
             else tensors(model_or_tensor))
    for name in sorted(items):
        tensor = items[name]
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(_bytes(tensor))
    return digest.hexdigest()


def _differences(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], limit: int = 5) -> list[str]:
    names = sorted(set(a) | set(b))
    diff = []
    for name in names:
        if name not in a or name not in b:
            diff.append(f"{name} only in {'the first' if name in a else 'the second'}")
        elif a[name].shape != b[name].shape or a[name].dtype != b[name].dtype:
            diff.append(f"{name}: {tuple(a[name].shape)}/{a[name].dtype} vs {tuple(b[name].shape)}/{b[name].dtype}")
        elif not torch.equal(a[name], b[name]):
            delta = (a[name].double() - b[name].double()).abs().max().item() if a[name].is_floating_point() else "?"
            diff.append(f"{name}: differs (max |Δ| {delta})")
    return diff[:limit] + ([f"... and {len(diff) - limit} more"] if len(diff) > limit else [])


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = model(input_ids=ids, use_cache=False).logits.float()
    model.train(was_training)
    return out


def nonfinite(model: nn.Module, ids: torch.Tensor | None = None) -> list[str]:
    """Names of tensors (and logits) of ``model`` holding NaN or inf."""
    bad = [name for name, t in tensors(model).items() if t.is_floating_point() and not torch.isfinite(t).all()]
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear) and not torch.isfinite(module.dequantize()).all():
            bad.append(f"{name} (dequantized)")
    if ids is not None and not torch.isfinite(logits(model, ids)).all():
        bad.append("logits")
    return bad


# ---------------------------------------------------------------------------- folders


@contextlib.contextmanager
def _folder(folder: Path | None) -> Iterator[Path]:
    if folder is not None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        yield Path(folder)
        return
    with tempfile.TemporaryDirectory(prefix="pocketlm-conformance-") as tmp:
        yield Path(tmp)


@contextlib.contextmanager
def _cwd(path: Path) -> Iterator[None]:
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def _pytest():
    import pytest

    return pytest
