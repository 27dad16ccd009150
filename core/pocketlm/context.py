"""The context a working hook receives: everything a stage may use besides the model."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from . import calibration, data, distributed
from .components import Architecture, LoadedModel
from .modules import find_architecture
from .progress import Progress


@dataclass(frozen=True)
class CalibrationSpec:
    """Where calibration windows come from (the recipe's ``[calibration]`` section)."""

    text: Path
    samples: int = 32
    seq_len: int = 512
    seed: int = 0
    batch_size: int = 8
    #: token ids that open and close every window: an encoder's ``[CLS]`` and ``[SEP]``, which
    #: its real inputs always carry (None: plain windows of the text, as a causal LM reads it)
    around: tuple[int, int] | None = None


@dataclass
class Context:
    """What ``compress``, ``evaluate`` and ``export`` get besides the model.

    * ``tokenizer``: the model's tokenizer; ``plugins``: the loaded :class:`pocketlm.plugins.Plugins`.
    * ``calibration``: a :class:`CalibrationSpec`, or None where the recipe has none.
    * ``calibration_windows()``: the calibration token windows ``[samples, seq_len]``.
    * ``walk(model, handler)``: the layer-wise calibration service (:mod:`pocketlm.calibration`).
    * ``layers(model)``: each decoder layer in turn, for work that needs no calibration (a model
      streamed from disk materializes one at a time and keeps the changes made to it).
    * ``architecture(model)``: the registered :class:`Architecture` of ``model``.
    * ``teacher()``: the model as it was before the recipe's first stage (never modify it).
    * ``load_model(source)``: load another model, such as a named teacher.
    * ``stage_dir``: a folder this stage may write scratch files and resumable state into.
    * ``run_dir``: the run folder; ``log(message)`` writes to the run log; ``progress``.
    * ``seed``: the recipe's seed; ``recipe``: the resolved recipe as a dict.
    * ``device``: where layer computation runs (the recipe's ``[model] device``; None: where the
      model is); ``offload``: where weights wait (``"none"``: on ``device``; ``"cpu"``).
    * ``all_reduce(tensor)``: sum a statistic over the processes of a data-parallel run, in place
      (the identity in one process); ``all_reduce_count(n, device)`` the same for a number.
      In such a run ``walk`` gives each process its shard of the windows.
    """

    tokenizer: Any = None
    plugins: Any = None
    calibration: CalibrationSpec | None = None
    architectures: tuple[Architecture, ...] = ()
    run_dir: Path | None = None
    stage_dir: Path | None = None
    seed: int = 0
    recipe: dict = field(default_factory=dict)
    progress: Progress = field(default_factory=Progress)
    logger: Callable[[str], None] = print
    teacher_factory: Callable[[], nn.Module] | None = None
    model_loader: Callable[[str], LoadedModel] | None = None
    export_path: Path | None = None
    device: torch.device | None = None
    offload: str = "none"
    _windows: torch.Tensor | None = field(default=None, repr=False)
    _teacher: nn.Module | None = field(default=None, repr=False)

    def log(self, message: str) -> None:
        self.logger(message)

    def architecture(self, model: nn.Module) -> Architecture:
        architectures = self.architectures or (self.plugins.architectures if self.plugins else ())
        return find_architecture(model, architectures)

    def calibration_windows(self) -> torch.Tensor:
        if self._windows is None:
            if self.calibration is None or self.tokenizer is None:
                raise RuntimeError("this stage needs calibration data, but the context has none")
            spec = self.calibration
            self._windows = data.calibration_windows(self.tokenizer, spec.text, spec.samples, spec.seq_len, spec.seed,
                                                      around=spec.around)
        return self._windows

    @property
    def processes(self) -> int:
        """How many processes share the calibration windows (1 unless launched data-parallel)."""
        return distributed.world_size()

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the processes of a data-parallel run, in place."""
        return distributed.all_reduce(tensor)

    def all_reduce_count(self, count: float, device: torch.device | None = None) -> float:
        """A number (tokens seen, say) summed over the processes; ``device``: where the
        statistic it goes with lives (NCCL reduces on CUDA)."""
        return distributed.all_reduce_count(count, device)

    def walk(self, model: nn.Module, handler: calibration.LayerHandler, *, sequential: bool = True,
             windows: torch.Tensor | None = None, description: str = "calibrating") -> None:
        """Run ``handler`` over ``model``'s decoder layers on the calibration windows (this
        process's shard of them in a data-parallel run)."""
        windows = distributed.shard(self.calibration_windows() if windows is None else windows)
        architecture = self.architecture(model)
        batch_size = self.calibration.batch_size if self.calibration else 8
        layer_count = len(calibration.decoder_layers(model, architecture))
        with self.progress.task(description, layer_count) as advance:
            calibration.walk_layers(model, architecture, windows, handler, sequential=sequential,
                                    batch_size=batch_size, progress=lambda done, total: advance(1),
                                    device=self.device)

    def layers(self, model: nn.Module) -> Iterator[tuple[int, nn.Module]]:
        """``(index, layer)`` for every decoder layer of ``model``, in order. Change a layer only
        while it is the one yielded: a streamed model writes it back and frees it afterwards."""
        from . import streaming

        yield from streaming.each_layer(model, self.architecture(model).layers)

    def teacher(self) -> nn.Module:
        """The model before the recipe's first stage, loaded once, frozen, in eval mode."""
        if self._teacher is None:
            if self.teacher_factory is None:
                raise RuntimeError("this context has no teacher")
            teacher = self.teacher_factory()
            teacher.eval()
            for parameter in teacher.parameters():
                parameter.requires_grad_(False)
            self._teacher = teacher
        return self._teacher

    def load_model(self, source: str) -> LoadedModel:
        if self.model_loader is None:
            raise RuntimeError("this context cannot load models")
        return self.model_loader(source)
