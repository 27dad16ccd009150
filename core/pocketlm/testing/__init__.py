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


def float_platform() -> str:
    """What decides float32 rounding here: torch's version, the thread count and a digest of
    matrix products and a long sum computed now. CPUs whose kernels differ (AVX2 against
    AVX-512, say) sum in other orders and differ in the last bits, so a digest of a float
    computation pinned on one machine only holds on a machine with the same platform string."""
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(*shape, generator=generator) for shape in ((67, 129), (129, 33), (1, 129), (4096,))]
    a, b, row, long = tensors
    results = [a @ b, row @ b, torch.nn.functional.linear(a, b.t()), long.sum().reshape(1), a.softmax(-1)]
    return f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), products {digest(results)[:8]}"


def assert_pinned(actual: str, recorded: dict[str, str]) -> None:
    """Check a pinned :func:`digest` against those ``recorded`` per :func:`float_platform`.

    On a recorded platform the digest must be that platform's. Elsewhere it passes when it equals
    any recorded digest (an older entry may have no platform string), and otherwise skips, naming
    this platform so that its digest can be recorded: the last bits of a float computation are
    the machine's, not the code's."""
    import pytest

    here = float_platform()
    if here in recorded:
        assert actual == recorded[here], f"digest {actual} differs from {recorded[here]}, recorded on {here}"
    elif actual not in recorded.values():
        pytest.skip(f"digest {actual}: no digest recorded for this float platform ({here}); "
                    f"recorded on: {'; '.join(recorded)}")


def free_port() -> int:
    """A TCP port free on this machine now, for a test that starts ``torchrun`` (a fixed port
    fails whenever another run holds it)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def export_counting_layers(source, fmt: str, out: Path, *, whole: bool = False):
    """Run ``pocketlm export SOURCE --format FMT -o OUT`` as a user would, and count, each time
    the export opens a decoder layer of a streamed model, how many decoder layers are in memory
    at that moment. Returns ``(result, opened)``: click's result (its ``exit_code`` and
    ``output``) and the list of ``(layer index, layers materialized)``; an exporter that streams
    gives ``[(0, 1), (1, 1), ...]``. ``whole``: load the model whole instead, as ``pocketlm
    export`` did before exporters streamed, for comparing the bytes the two write."""
    from click.testing import CliRunner

    from .. import streaming
    from ..cli import main
    from ..pipeline import Run

    opened = []
    original_open, original_load = streaming.LayerStream.open, Run.load

    def counting_open(self, index):
        layer = original_open(self, index)
        layers = streaming.get_module(self.model, self.layers_path)
        opened.append((index, sum(streaming.is_materialized(each) for each in layers)))
        return layer

    streaming.LayerStream.open = counting_open
    if whole:
        Run.load = lambda self, source, stream=False: original_load(self, source)
    try:
        result = CliRunner().invoke(main, ["export", str(source), "--format", fmt, "-o", str(out)])
    finally:
        streaming.LayerStream.open, Run.load = original_open, original_load
    return result, opened


def file_digests(folder: Path) -> dict[str, str]:
    """The sha256 of each file directly in ``folder``, by name: for tests that compare exports
    byte for byte."""
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir()) if p.is_file()}
