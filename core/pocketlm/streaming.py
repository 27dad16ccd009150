"""Streaming: models larger than memory, one decoder layer at a time (``[model] offload = "disk"``).

A streamed model is an ordinary transformers model whose decoder layers hold no data: their
parameters live on the ``meta`` device, with the right shapes, dtypes and module types (a layer a
stage quantized holds ``QuantizedLinear`` modules with meta buffers). Everything outside the
layers (embedding, final norm, head, rotary tables) is in memory. A :class:`LayerStream` attached
to the model knows where the current version of each layer lives:

* the source files (a safetensors folder, one file or shards with an index, or a GGUF file:
  :mod:`pocketlm.gguf_source`), read tensor by tensor and converted from their storage dtype (or
  dequantized) to the compute dtype;
* or a stage checkpoint written by an earlier stage, one safetensors shard per layer.

``open(index)`` loads one layer's tensors into its place; ``close(index)`` writes it (when a stage
is writing) as its own shard, atomically, and puts it back on the meta device. The layer walker
(:mod:`pocketlm.calibration`), ``Context.layers``, the evaluators and the ``hf`` exporter go
through this one seam, so methods never learn the mode.

Memory: about one decoder layer in the compute dtype, plus what the method keeps for it, plus the
calibration activations (moved to a disk-backed memmap above :data:`ACTIVATIONS_IN_MEMORY`
bytes), plus the embedding and the head.

Streamed stage checkpoint (a stage folder)::

    layers/layer-00000.safetensors   one per decoder layer: its tensors, masks as "__mask__.NAME",
                                     and its quantized modules in the metadata ("pocketlm-modules")
    rest/                            everything else, as a regular checkpoint (config, tokenizer,
                                     manifest, model.safetensors, masks.safetensors)
    stage.json                       written last: the stage is finished when it appears
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from . import atomic
from .errors import NotStreamable, PocketError  # noqa: F401
from .module_types import describe_modules, rebuild_module
from .modules import build_shell, find_layers_path, get_module, parameters_on_meta, set_module  # noqa: F401
from .tensorfiles import SafetensorsFolder, join_safetensors, read_header, save_tensors, write_safetensors  # noqa: F401
from .weights import MASK_BUFFER, QuantizedEmbedding, QuantizedLinear, is_transposed, linear_weight

AUTO_DISK_SHARE = 0.5
"""``offload = "auto"`` streams from disk when the model's float size (in the compute dtype)
exceeds this share of the available memory: the rest is left for activations, the method's
statistics and the operating system's page cache."""

LAYER_WORKING_FACTOR = 3
"""A layer at work needs about this many times its float size: its weights, the compressed copy
being built, and the method's per-layer buffers (Hessians, dequantized copies)."""

ACTIVATIONS_IN_MEMORY = 1 << 30
"""Calibration activations between layers larger than this (bytes) wait in a disk-backed memmap
in the stage's scratch folder instead of anonymous memory."""

STREAM_ATTRIBUTE = "_pocketlm_stream"
MODULES_KEY = "pocketlm-modules"
MASK_PREFIX = "__mask__."

# ------------------------------------------------------------------------- memory figures


def available_memory() -> int:
    """Bytes of memory available to a new allocation (``MemAvailable``)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def _mb(n: int) -> str:
    return f"{n / 1e6:,.0f} MB"


# ------------------------------------------------------------------------- source files


# ------------------------------------------------------------------------- the shell


@contextlib.contextmanager
def without_layers(model: nn.Module, layers_path: str) -> Iterator[nn.Module]:
    """``model`` with its decoder layers taken out for the duration: the rest of the model."""
    layers = get_module(model, layers_path)
    set_module(model, layers_path, nn.ModuleList())
    try:
        yield model
    finally:
        set_module(model, layers_path, layers)


def _assign(module: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load ``state`` into ``module`` (whose tensors may be on meta), in each target's dtype."""
    targets = dict(module.state_dict(keep_vars=True))
    missing = sorted(set(targets) - set(state))
    unexpected = sorted(set(state) - set(targets))
    if missing or unexpected:
        raise PocketError(f"{where} does not match the model: missing tensors {missing[:4]}, unexpected "
                          f"tensors {unexpected[:4]}", fix="check that the weight files belong to this config",
                          exit_code=1)
    state = {k: v.to(targets[k].dtype) if v.is_floating_point() else v for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=True)


def _free(module: nn.Module) -> None:
    """Put every parameter and persistent buffer of ``module`` on the meta device, drop masks."""
    for sub in module.modules():
        for name, parameter in list(sub._parameters.items()):
            if parameter is not None:
                sub._parameters[name] = nn.Parameter(parameter.to("meta"), requires_grad=parameter.requires_grad)
        for name, buffer in list(sub._buffers.items()):
            if name == MASK_BUFFER:
                del sub._buffers[name]
                sub._non_persistent_buffers_set.discard(name)
            elif buffer is not None and name not in sub._non_persistent_buffers_set:
                sub._buffers[name] = buffer.to("meta")


def return_freed_memory() -> None:
    """Hand the heap's free pages back to the system. glibc keeps freed blocks under 32 MB in its
    arenas for reuse, which spares the layer's elementwise temporaries fresh page faults; but
    the hidden states, weights and statistics of a finished step would otherwise stay resident
    into the next. Called when a streamed layer closes and before each solve (where the peak
    is), it keeps the heap's reuse within a step and its memory out of the next."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def is_materialized(layer: nn.Module) -> bool:
    return not any(t.is_meta for t in layer.state_dict().values())


# ------------------------------------------------------------------------- layer shards


def layer_file(folder: Path, index: int) -> Path:
    return Path(folder) / f"layer-{index:05d}.safetensors"


def describe_layer(layer: nn.Module) -> dict:
    return describe_modules(layer)


def write_layer(layer: nn.Module, file: Path) -> None:
    """One decoder layer as its own shard, written to a temporary name and renamed into place."""
    tensors = {k: v.contiguous() for k, v in layer.state_dict().items()}
    for name, sub in layer.named_modules():
        mask = sub._buffers.get(MASK_BUFFER)
        if mask is not None:
            tensors[MASK_PREFIX + name] = mask.contiguous()
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.parent / f".{file.name}.{os.getpid()}.tmp"
    save_tensors(tensors, tmp, metadata={MODULES_KEY: json.dumps(describe_layer(layer), sort_keys=True)})
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, file)


def rebuild_layer_modules(layer: nn.Module, manifest: dict) -> None:
    """Give ``layer`` the module types ``manifest`` records (on meta, no memory)."""
    for name, spec in manifest.items():
        current = get_module(layer, name)
        if isinstance(current, (QuantizedLinear, QuantizedEmbedding)):
            continue
        with torch.device("meta"):
            set_module(layer, name, rebuild_module(spec, layer))


def read_layer_manifest(file: Path) -> dict:
    header = read_header(file)
    return json.loads(header.get("__metadata__", {}).get(MODULES_KEY, "{}"))


def load_layer_shard(layer: nn.Module, file: Path) -> None:
    from safetensors.torch import load_file

    read_header(file)
    rebuild_layer_modules(layer, read_layer_manifest(file))
    tensors = load_file(str(file))
    masks = {k[len(MASK_PREFIX):]: tensors.pop(k) for k in list(tensors) if k.startswith(MASK_PREFIX)}
    _assign(layer, tensors, f"the layer shard {file}")
    for name, mask in masks.items():
        get_module(layer, name).register_buffer(MASK_BUFFER, mask, persistent=False)


# ------------------------------------------------------------------------- the stream


class LayerStream:
    """Where each decoder layer of a streamed model lives, and the open/close seam.

    * ``source``: the original weights (HF names): a :class:`SafetensorsFolder` or a
      :class:`pocketlm.gguf_source.GGUFSource`, or None; a whole-model stage checkpoint's
      ``model.safetensors`` (its layers' quantized modules already rebuilt on meta), with
      ``masks`` its ``masks.safetensors``;
    * ``store``: a folder of layer shards from the last finished stage, or None (then ``source``);
    * ``sink``: while a stage runs, the folder its layer shards go to; a layer written there is
      read back from there;
    * ``scratch``: the stage's scratch folder (activations saved for resuming, memmaps).

    ``shard_per_part``: exports through :func:`write_sharded` hold one shard per part (rest,
    each layer). False for a stream over a whole-model checkpoint: its exports keep the shards
    of the model exported from memory, so they are the same files whichever way it was loaded."""

    def __init__(self, model: nn.Module, layers_path: str, source: SafetensorsFolder | None = None,
                 store: Path | None = None, masks: SafetensorsFolder | None = None, shard_per_part: bool = True):
        self.model, self.layers_path = model, layers_path
        self.source, self.store, self.masks = source, store, masks
        self.shard_per_part = shard_per_part
        self.sink: Path | None = None
        self.scratch: Path | None = None
        self.open_layers: set[int] = set()
        self._loaded: dict[int, list[nn.Module]] = {}
        self.most_open = 0                  # the most layers materialized at once (a structural check)
        self.walks = 0                      # walks started in the current stage

    def __len__(self) -> int:
        return len(get_module(self.model, self.layers_path))

    def layer(self, index: int) -> nn.Module:
        return get_module(self.model, self.layers_path)[index]

    def _where(self, index: int) -> Path | None:
        for folder in (self.sink, self.store):
            if folder is not None and layer_file(folder, index).is_file():
                return layer_file(folder, index)
        return None

    def open(self, index: int) -> nn.Module:
        """Materialize decoder layer ``index`` from its latest version and return it."""
        layer = self.layer(index)
        if index not in self.open_layers:
            file = self._where(index)
            if file is not None:
                load_layer_shard(layer, file)
            elif self.source is not None:
                prefix = f"{self.layers_path}.{index}."
                names = list(layer.state_dict())
                absent = [n for n in names if prefix + n not in self.source]
                if absent:
                    raise PocketError(f"the weights in {self.source.folder} lack {prefix + absent[0]}"
                                      f"{f' and {len(absent) - 1} more' if len(absent) > 1 else ''}",
                                      field="model.source", fix="check that the folder is complete", exit_code=1)
                tensors = self.source.read_many([prefix + n for n in names])
                _assign(layer, {n: tensors.pop(prefix + n) for n in names}, f"layer {index} of {self.source.folder}")
                self._load_masks(layer, prefix)
            else:
                raise PocketError(f"no stored copy of decoder layer {index} was found", exit_code=1,
                                  fix="rerun without --resume")
            self.open_layers.add(index)
            self.most_open = max(self.most_open, len(self.open_layers))
            # Every module that received tensors: a method may replace one (a linear by its
            # quantized form) and still hold the old one; closing frees them all the same.
            self._loaded[index] = list(layer.modules())
        return layer

    def _load_masks(self, layer: nn.Module, prefix: str) -> None:
        """The masks ``self.masks`` holds for the layer at ``prefix`` (a checkpoint's), as buffers."""
        if self.masks is None:
            return
        names = [name for name in self.masks.where if name.startswith(prefix)]
        for name, mask in self.masks.read_many(names).items():
            get_module(layer, name[len(prefix):]).register_buffer(MASK_BUFFER, mask, persistent=False)

    def close(self, index: int, *, write: bool = True) -> None:
        """Write layer ``index`` to the sink (when a stage is writing and ``write``) and free it."""
        layer = self.layer(index)
        if write and self.sink is not None:
            write_layer(layer, layer_file(self.sink, index))
        for module in [layer, *self._loaded.pop(index, [])]:
            _free(module)
        self.open_layers.discard(index)
        return_freed_memory()

    def each(self, *, write: bool = False) -> Iterator[tuple[int, nn.Module]]:
        """Every layer in order, materialized one at a time."""
        for index in range(len(self)):
            layer = self.open(index)
            try:
                yield index, layer
            finally:
                self.close(index, write=write)

    # -------------------------------------------------------------- stages

    def begin_stage(self, folder: Path, scratch: Path) -> None:
        self.sink, self.scratch, self.walks = Path(folder) / "layers", Path(scratch), 0

    def end_stage(self, folder: Path) -> None:
        """The stage has finished: its layers are read from ``folder`` from now on, and the
        walk's own scratch (activation memmaps, progress, saved inputs) is removed."""
        if self.scratch is not None:
            for pattern in ("activations-*.bin", "inputs-*.safetensors", "stream-progress.json"):
                for file in self.scratch.glob(pattern):
                    file.unlink(missing_ok=True)
        self.store, self.sink, self.scratch = Path(folder) / "layers", None, None

    def begin_walk(self) -> int:
        """Count a pass over the layers; returns its number in the stage (0 for the first)."""
        number = self.walks
        self.walks += 1
        if self.scratch is not None:
            atomic.write_json(self.scratch / "stream-progress.json", {"walks_started": self.walks})
        return number

    def discard_from(self, start: int) -> None:
        """Forget layer shards the sink holds from ``start`` on (left by a killed attempt)."""
        if self.sink is None:
            return
        for index in range(start, len(self)):
            with contextlib.suppress(FileNotFoundError):
                layer_file(self.sink, index).unlink()

    # -------------------------------------------------------------- resuming inside a stage

    def resume_point(self) -> int:
        """How many leading layers of the first walk are already in the sink, with the inputs
        of the next one saved (0 when there is nothing to resume)."""
        if self.sink is None or self.scratch is None:
            return 0
        done = 0
        while layer_file(self.sink, done).is_file():
            done += 1
        while done and not (self.scratch / f"inputs-{done:05d}.safetensors").is_file():
            done -= 1
        return done

    def save_inputs(self, index: int, hidden: list[torch.Tensor]) -> None:
        """Keep the inputs of layer ``index`` (before its predecessor's shard is written)."""
        from safetensors.torch import save_file

        file = self.scratch / f"inputs-{index:05d}.safetensors"
        tmp = file.parent / f".{file.name}.tmp"
        save_file({str(i): h.contiguous() for i, h in enumerate(hidden)}, str(tmp))
        os.replace(tmp, file)

    def drop_inputs(self, index: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.scratch / f"inputs-{index:05d}.safetensors").unlink()

    def load_inputs(self, index: int) -> list[torch.Tensor]:
        from safetensors.torch import load_file

        saved = load_file(str(self.scratch / f"inputs-{index:05d}.safetensors"))
        return [saved[str(i)] for i in range(len(saved))]

    def prepare_resume(self) -> None:
        """A stage killed after its first walk cannot continue mid-walk (the method's state from
        the first walk is gone): its layer shards are discarded and the stage starts over."""
        progress = self.scratch / "stream-progress.json"
        started = json.loads(progress.read_text())["walks_started"] if progress.is_file() else 0
        if started > 1 and self.sink is not None and self.sink.exists():
            shutil.rmtree(self.sink)

    def park(self, hidden: list[torch.Tensor], index: int) -> list[torch.Tensor]:
        """Calibration activations wait in memory, or in a disk-backed memmap when large."""
        total = sum(h.numel() * h.element_size() for h in hidden)
        if total <= ACTIVATIONS_IN_MEMORY or self.scratch is None or not hidden or hidden[0].device.type != "cpu":
            return hidden
        import numpy as np

        file = self.scratch / f"activations-{index % 2}.bin"  # two alternate: inputs and outputs of a layer
        dtype = {torch.float32: np.float32, torch.float16: np.float16}.get(hidden[0].dtype)
        if dtype is None:
            return hidden
        count = sum(h.numel() for h in hidden)
        memory = np.memmap(file, dtype=dtype, mode="w+", shape=(count,))
        parked, start = [], 0
        for h in hidden:
            view = torch.from_numpy(memory[start:start + h.numel()]).view(h.shape)
            view.copy_(h)
            parked.append(view)
            start += h.numel()
        return parked


def stream_of(model: nn.Module) -> LayerStream | None:
    return getattr(model, STREAM_ATTRIBUTE, None)


def is_streamed(model: nn.Module) -> bool:
    """True for a model whose decoder layers stream from disk (``offload = "disk"``)."""
    return stream_of(model) is not None


def page_out(model: nn.Module) -> None:
    """Drop from resident memory the pages of the source tensors a streamed model maps (its
    embedding and head), after a pass that read them whole."""
    stream = stream_of(model)
    if stream is not None and hasattr(stream.source, "page_out"):
        stream.source.page_out()


def require_whole_model(model: nn.Module, what: str, fix: str) -> None:
    """Refuse, with one clear message, work that needs every layer in memory at once."""
    if is_streamed(model):
        raise PocketError(f"{what} needs the whole model in memory at once; this model streams its layers from "
                          "disk (offload = \"disk\")", field="model.offload", fix=fix)


def attach(model: nn.Module, stream: LayerStream) -> nn.Module:
    object.__setattr__(model, STREAM_ATTRIBUTE, stream)
    return model


def each_layer(model: nn.Module, layers_path: str, *, write: bool = True) -> Iterator[tuple[int, nn.Module]]:
    """Each decoder layer of ``model``, materialized one at a time when it streams; changes made
    to a yielded layer are kept (a streamed layer is written back when the next is asked for)."""
    stream = stream_of(model)
    if stream is None:
        yield from enumerate(get_module(model, layers_path))
        return
    stream.begin_walk()
    if stream.walks == 1:
        stream.discard_from(0)
    yield from stream.each(write=write)


# ------------------------------------------------------------------------- loading


def _rest_state(model: nn.Module, layers_path: str) -> dict[str, torch.Tensor]:
    with without_layers(model, layers_path):
        return dict(model.state_dict(keep_vars=True))


def _layer_nbytes(shell: nn.Module, layers_path: str, dtype: torch.dtype) -> int:
    layer = get_module(shell, layers_path)[0]
    return sum(t.numel() for t in layer.state_dict().values()) * torch.finfo(dtype).bits // 8


def check_memory(shell: nn.Module, layers_path: str, dtype: torch.dtype) -> None:
    """Refuse, before any work, a machine that cannot hold one decoder layer at work plus the
    parts of the model that stay in memory (embedding, head)."""
    layer = _layer_nbytes(shell, layers_path, dtype)
    rest = sum(t.numel() for t in _rest_state(shell, layers_path).values()) * torch.finfo(dtype).bits // 8
    need, have = LAYER_WORKING_FACTOR * layer + rest, available_memory()
    if need > have:
        raise PocketError(
            f"not enough memory for one decoder layer: a layer is {_mb(layer)} in {str(dtype).replace('torch.', '')}, "
            f"it needs about {_mb(need)} at work (with the embedding and head), and {_mb(have)} is available",
            field="model.dtype",
            fix='set dtype = "bfloat16" in [model] to halve it, free memory, or use a machine with more memory')


def is_gguf(path: Path) -> bool:
    return str(path).lower().endswith(".gguf")


def open_source(path: Path):
    """The weights of ``path`` (a :class:`SafetensorsFolder`, or a GGUF file's
    :class:`pocketlm.gguf_source.GGUFSource`) and the transformers config of its model."""
    if is_gguf(path):
        from .gguf_source import GGUFSource

        source = GGUFSource(path)
        return source, source.config
    from transformers import AutoConfig

    source = SafetensorsFolder(path)
    return source, AutoConfig.from_pretrained(path)


def model_float_bytes(folder: Path, dtype: torch.dtype) -> int:
    """The model's size in ``dtype``: its float tensors, or for a GGUF file every tensor (its
    header gives the element counts, whatever the storage)."""
    if is_gguf(folder):
        from .gguf_source import parameter_count

        return parameter_count(folder) * torch.finfo(dtype).bits // 8
    source = SafetensorsFolder(folder)
    return sum(source.nbytes(n, dtype) for n, (_, info) in source.where.items()
               if info["dtype"] in ("F64", "F32", "F16", "BF16"))


def choose_offload(offload: str, folder: Path, dtype: torch.dtype) -> str:
    """``auto``: ``disk`` when the float model is more than :data:`AUTO_DISK_SHARE` of the
    available memory, else ``none``. Other values pass through."""
    if offload != "auto":
        return offload
    return "disk" if model_float_bytes(folder, dtype) > AUTO_DISK_SHARE * available_memory() else "none"


def _shell_of(folder: Path, dtype: torch.dtype, layers_path_of):
    """The weights of ``folder``, its model's shell on meta, and where its decoder layers are.
    A damaged weight file is reported as it is; a config that builds no shell (an unknown
    architecture, or one that needs the folder's own code) is :class:`NotStreamable`."""
    try:
        source, config = open_source(folder)
        shell = build_shell(config, dtype)
        return source, config, shell, layers_path_of(shell)
    except PocketError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever transformers raises for an unknown model
        raise NotStreamable(f"offload = \"disk\" cannot build the model of {folder} without its weights: "
                            f"{type(exc).__name__}: {str(exc)[:300]}", field="model.offload",
                            fix='set offload = "none" in [model] to load the model whole') from None


def load_streamed(folder: Path, dtype: torch.dtype, layers_path_of=find_layers_path) -> nn.Module:
    """The shell of the transformers model in ``folder`` (or a GGUF file): every part but the
    decoder layers loaded (converted to ``dtype``), the layers streaming from the files."""
    source, config, shell, layers_path = _shell_of(folder, dtype, layers_path_of)
    check_memory(shell, layers_path, dtype)
    with without_layers(shell, layers_path):
        names = list(shell.state_dict())
        tied = bool(getattr(config, "tie_word_embeddings", False))
        # The embedding and the head stay file-backed where the files hold the compute dtype: a
        # lookup touches only the rows it reads, and calibration never touches the head.
        present = {n: source.map(n, dtype) for n in names if n in source}
        absent = [n for n in names if n not in present]
        head = shell.get_output_embeddings()
        head_names = [n for n in absent if head is not None and n.endswith("weight")
                      and get_module(shell, n.rsplit(".", 1)[0]) is head]
        if tied:
            absent = [n for n in absent if n not in head_names]
            for name in head_names:
                present[name] = present.get(_input_embedding_name(shell) + ".weight")
        if absent:
            raise PocketError(f"the weights in {folder} lack {absent[0]}", field="model.source",
                              fix="check that the folder is complete", exit_code=1)
        _assign(shell, present, f"the weights in {folder}")
        if tied:
            shell.tie_weights()
    return attach(shell, LayerStream(shell, layers_path, source=source))


def _input_embedding_name(model: nn.Module) -> str:
    embedding = model.get_input_embeddings()
    return next(n for n, m in model.named_modules() if m is embedding)


# ------------------------------------------------------------------------- dense export


def dense_tensors(module: nn.Module, prefix: str, dtype: torch.dtype | None,
                  skip: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """The dense state dict of ``module`` (quantized modules dequantized), names prefixed;
    modules named in ``skip`` (relative names) are left out with everything inside them."""
    out: dict[str, torch.Tensor] = {}
    done: set[str] = set(skip)
    for name, sub in module.named_modules():
        if name in skip or any(name.startswith(s + ".") for s in done):
            continue
        full = f"{prefix}{name}." if name else prefix
        if isinstance(sub, (QuantizedLinear, QuantizedEmbedding)):
            done.add(name)
            weight = sub.dequantize() if isinstance(sub, QuantizedEmbedding) else linear_weight(sub)
            out[full + "weight"] = weight.t() if is_transposed(sub) else weight
            if getattr(sub, "bias", None) is not None:
                out[full + "bias"] = sub.bias.data
            continue
        for key, tensor in sub._parameters.items():
            if tensor is not None:
                out[full + key] = tensor.data
        for key, tensor in sub._buffers.items():
            if tensor is not None and key not in sub._non_persistent_buffers_set:
                out[full + key] = tensor
    if dtype is not None:
        out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in out.items()}
    return {k: v.contiguous() for k, v in out.items()}


# An in-memory model's export is written in shards of at most this many bytes: what the writer
# holds beyond the model itself (packed or converted tensors of one shard), and transformers'
# own limit for one file in older releases. A model whose export fits is one model.safetensors.
MAX_SHARD_BYTES = 2 * 2**30


def write_sharded(model: nn.Module, path: Path, tensors_of, max_shard_bytes: int | None = None) -> None:
    """Write ``model`` as safetensors, a part at a time: everything outside the decoder layers,
    then each layer. ``tensors_of(module, prefix)`` gives a part's tensors to store, full names.
    A tied head is left out (transformers ties it again on load).

    An in-memory model's parts are gathered into shards of at most ``max_shard_bytes`` (default
    :data:`MAX_SHARD_BYTES`; one ``model.safetensors`` when the export fits), so the writer never
    holds a converted copy of the whole model, as ``save_pretrained`` of a dense copy would. A
    streamed model's layers are materialized in turn, each part written to its own shard as it
    comes; these stay the export's shards, with ``model.safetensors.index.json``, or (a stream
    without ``shard_per_part``) are joined into the in-memory model's shards, the same files."""
    stream = stream_of(model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    max_shard_bytes = MAX_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes
    layers_path = stream.layers_path if stream is not None else find_layers_path(model)
    shards: list[tuple[str, list[str]]] = []   # (temporary file, tensor names)
    sizes: list[int] = []                      # a streamed model's: the bytes of each part
    pending: dict[str, torch.Tensor] = {}
    total = 0

    def flush() -> None:
        nonlocal pending
        if pending:
            name = f".shard-{len(shards):05d}.tmp"
            save_tensors(pending, path / name)
            shards.append((name, list(pending)))
            pending = {}

    def add(tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if stream is not None or (pending and sum(t.numel() * t.element_size() for t in pending.values())
                                  + size > max_shard_bytes):
            flush()
        pending.update(tensors)
        total += size
        if stream is not None:
            if pending:            # flush writes a shard of it
                sizes.append(size)
            flush()

    with without_layers(model, layers_path):
        rest = tensors_of(model, "")
        if getattr(model.config, "tie_word_embeddings", False):
            head = model.get_output_embeddings()
            head_name = next(n for n, m in model.named_modules() if m is head)
            rest = {k: v for k, v in rest.items() if not k.startswith(head_name + ".")}
        add(rest)
        del rest
    page_out(model)
    for index, layer in (stream.each() if stream is not None else enumerate(get_module(model, layers_path))):
        add(tensors_of(layer, f"{layers_path}.{index}."))
    flush()
    if stream is not None and not stream.shard_per_part:
        shards = _join_parts(path, shards, sizes, max_shard_bytes)
    if len(shards) == 1 and (stream is None or not stream.shard_per_part):
        os.replace(path / shards[0][0], path / "model.safetensors")
        return
    weight_map = {}
    for number, (temporary, names) in enumerate(shards, start=1):
        final = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        os.replace(path / temporary, path / final)
        weight_map.update({name: final for name in names})
    atomic.write_json(path / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def _join_parts(path: Path, parts: list[tuple[str, list[str]]], sizes: list[int],
                max_shard_bytes: int) -> list[tuple[str, list[str]]]:
    """The part shards of a streamed model joined into the shards :func:`write_sharded` gathers
    for a model in memory: a part starts a new shard where the shard would pass the limit."""
    groups: list[list[int]] = []
    held = 0
    for number, size in enumerate(sizes):
        if not groups or (held and held + size > max_shard_bytes):
            groups.append([])
            held = 0
        groups[-1].append(number)
        held += size
    shards = []
    for members in groups:
        if len(members) == 1:
            shards.append(parts[members[0]])
            continue
        name = f".joined-{len(shards):05d}.tmp"
        join_safetensors([path / parts[m][0] for m in members], path / name)
        for m in members:
            (path / parts[m][0]).unlink()
        shards.append((name, [n for m in members for n in parts[m][1]]))
    return shards


def write_config(model: nn.Module, path: Path, dtype: torch.dtype | None) -> None:
    """``config.json`` (without quantization_config) and, for a generative model,
    ``generation_config.json``, for an export written a part at a time. ``dtype`` None: the
    model's own floating dtype."""
    if dtype is None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    config = model.config.to_dict()
    for key in ("quantization_config", "torch_dtype", "_name_or_path"):  # the last: where it was loaded from
        config.pop(key, None)
    config["dtype"] = str(dtype).replace("torch.", "")
    atomic.write_json(Path(path) / "config.json", config)
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(model, "can_generate", lambda: False)():
        generation.save_pretrained(path)


def sum_over_parts(model: nn.Module, measure) -> list:
    """``measure`` applied to the rest of a streamed model, then to each layer in turn."""
    stream = stream_of(model)
    with without_layers(model, stream.layers_path):
        results = [measure(model)]
    for _, layer in stream.each():
        results.append(measure(layer))
    return results
