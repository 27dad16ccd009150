"""The context a working hook receives: everything a stage may use besides the model."""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from . import atomic, calibration, data, distributed
from .components import Architecture, LoadedModel
from .errors import PocketError
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
    #: windows the original model writes itself, after the text's (the recipe's ``generated``)
    generated: int = 0
    #: the temperature those windows are sampled at (the recipe's ``generated_temperature``)
    generated_temperature: float = 1.0


#: Where a run keeps the windows its original model wrote (``[calibration] generated``).
GENERATED_FILE = "calibration-generated.safetensors"


@dataclass
class Context:
    """What ``compress``, ``evaluate`` and ``export`` get besides the model.

    * ``tokenizer``: the model's tokenizer; ``plugins``: the loaded :class:`pocketlm.plugins.Plugins`.
    * ``calibration``: a :class:`CalibrationSpec`, or None where the recipe has none.
    * ``calibration_windows()``: the calibration token windows ``[samples + generated, seq_len]``:
      the text's, then those the original model wrote (``[calibration] generated``).
    * ``walk(model, handler)``: the layer-wise calibration service (:mod:`pocketlm.calibration`).
    * ``layers(model)``: each decoder layer in turn, for work that needs no calibration (a model
      streamed from disk materializes one at a time and keeps the changes made to it).
    * ``architecture(model)``: the registered :class:`Architecture` of ``model``.
    * ``teacher()``: the model as it was before the recipe's first stage (never modify it).
    * ``load_model(source)``: load another model, such as a named teacher.
    * ``stage_dir``: a folder this stage may write scratch files and resumable state into.
    * ``run_dir``: the run folder; ``log(message)`` writes to the run log; ``progress``.
    * ``seed``: the recipe's seed; ``recipe``: the resolved recipe as a dict.
    * ``recipe_folder``: the recipe file's folder, from which a relative path in a stage's options
      is taken, as ``[calibration] text`` is (None: the recipe is no file; the working directory).
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
    recipe_folder: Path | None = None
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
            windows = data.calibration_windows(self.tokenizer, spec.text, spec.samples, spec.seq_len, spec.seed,
                                               around=spec.around)
            if spec.generated:
                windows = torch.cat([windows, self._generated_windows(spec)])
            self._windows = windows
        return self._windows

    def _generated_windows(self, spec: CalibrationSpec) -> torch.Tensor:
        """The ``spec.generated`` windows the original model writes (:func:`data.generate_windows`),
        kept in the run folder so that every stage, and a resumed run, reads the same ones."""
        from safetensors.torch import save_file

        if spec.around is not None:
            raise PocketError("[calibration] generated has the model write text, and an encoder writes none",
                              field="calibration.generated", fix="set generated = 0 (or leave it out) for an encoder")
        path = Path(self.run_dir) / GENERATED_FILE if self.run_dir is not None else None
        settings = {"count": spec.generated, "seq_len": spec.seq_len, "seed": spec.seed,
                    "model": (self.recipe.get("model") or {}).get("source")}
        if spec.generated_temperature != 1.0:   # files written at temperature 1 before the option existed still match
            settings["temperature"] = spec.generated_temperature
        described = json.dumps(settings)
        found = None
        if distributed.is_writer():
            found = self._read_generated(path, described)
            if found is None:
                found = self._write_generated(spec)
                if path is not None:
                    with atomic.file(path) as temporary:
                        save_file({"windows": found.contiguous()}, str(temporary), metadata={"described": described})
        distributed.barrier()   # the other processes read what the writer saved
        return found if found is not None else self._read_generated(path, described, required=True)

    def _read_generated(self, path: Path | None, described: str, required: bool = False):
        from safetensors import safe_open

        if path is not None and path.is_file():
            with safe_open(str(path), framework="pt") as handle:
                if (handle.metadata() or {}).get("described") == described:
                    windows = handle.get_tensor("windows")
                    self.log(f"calibration: reusing the {windows.shape[0]} windows the original model wrote "
                             f"({GENERATED_FILE})")
                    return windows
        if required:
            raise RuntimeError(f"the writing process saved no generated windows in {path}")
        return None

    def _write_generated(self, spec: CalibrationSpec) -> torch.Tensor:
        fresh = self._teacher is None
        if fresh and self.teacher_factory is None:
            raise RuntimeError("[calibration] generated needs the original model, and this context has none")
        model = self._teacher if not fresh else self.teacher_factory()
        if not hasattr(model, "generate"):
            raise PocketError(f"[calibration] generated has the model write text, and {type(model).__name__} "
                              "cannot generate", field="calibration.generated",
                              fix="set generated = 0, or use a transformers causal LM")
        if fresh and self.device is not None and self.offload == "none":
            model = model.to(self.device)
        vocabulary = model.get_input_embeddings().num_embeddings
        if self.tokenizer is not None:   # padded embedding rows are no token a text can hold
            vocabulary = min(vocabulary, len(self.tokenizer))
        began = time.perf_counter()
        windows = data.generate_windows(model, spec.generated, spec.seq_len, vocabulary, spec.seed,
                                        temperature=spec.generated_temperature)
        at = f" at temperature {spec.generated_temperature:g}" if spec.generated_temperature != 1.0 else ""
        self.log(f"calibration: the original model wrote {windows.shape[0]} windows of {spec.seq_len} tokens{at} in "
                 f"{time.perf_counter() - began:.0f} s ({GENERATED_FILE})")
        return windows

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
