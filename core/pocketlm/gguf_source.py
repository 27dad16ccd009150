"""GGUF files as a weight source: ``offload = "disk"`` on a ``.gguf`` model, and the demo cache.

A :class:`GGUFSource` offers what :class:`pocketlm.streaming.SafetensorsFolder` does: the tensors
of a model by their transformers names, read one at a time. The header and tensor table are read
by ``gguf.GGUFReader`` (a memory map: no tensor data is read then), and the file is mapped again
only while tensors are read. Each tensor is dequantized by gguf-py (F32, F16, BF16, Q4_0 ... Q8_0, the
k-quants and whatever else it knows) and converted to the compute dtype.

The names, and the one change llama.cpp's converter makes to the values (the rotary row order of
Llama's q/k projections), come from transformers' own GGUF loader
(``transformers.modeling_gguf_pytorch_utils``), so a tensor read here equals the one
``from_pretrained(folder, gguf_file=...)`` loads.

:func:`write_folder` turns a GGUF file into a float transformers folder one tensor at a time (the
demo models are GGUF files expanded this way).
"""

from __future__ import annotations

import copy
import json
import math
import struct
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch

from . import atomic
from .modules import build_shell, find_layers_path
from .tensorfiles import write_safetensors
from .errors import NotStreamable, PocketError

STREAMABLE = ("llama", "qwen2")
"""GGUF architectures whose tensors map one to one onto the transformers model's. transformers'
loader builds others (mixtures of experts, fused layouts) from several GGUF tensors at once, which
this source does not do."""

DEQUANTIZE_ELEMENTS = 1 << 22
"""Rows are dequantized this many elements at a time: gguf-py's temporaries (several times the
float result) stay small however large the tensor."""



class _Entry(NamedTuple):
    """Where one tensor is in the file and how it is stored."""

    gguf_name: str
    ggml_type: int
    shape: tuple[int, ...]      # the transformers shape (ggml lists dimensions the other way round)
    stored: tuple[int, ...]     # the stored array: for block types, bytes per row
    item: str                   # numpy dtype of the stored array
    offset: int                 # from the start of the file
    size: int                   # bytes


def _refuse(path: Path, problem: str, fix: str = "copy or download it again") -> PocketError:
    return PocketError(f"the GGUF file {path} {problem}", field="model.source", fix=fix, exit_code=1)


def open_reader(path: Path):
    """``gguf.GGUFReader`` of ``path``; a missing, truncated or damaged file is one clear error."""
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except FileNotFoundError:
        raise _refuse(path, "does not exist", "check model.source") from None
    except (ValueError, IndexError, KeyError, OSError, struct.error) as exc:
        if "magic" in str(exc):
            raise _refuse(path, "is not a GGUF file: it does not start with the bytes GGUF",
                          "check model.source") from None
        # gguf-py meets a cut-off file as a header it cannot parse or a tensor it cannot shape;
        # its own words for that (numpy's) would not help.
        raise _refuse(path, "is truncated or damaged: gguf-py cannot read its header and tensor table") from None


def parameter_count(path: Path) -> int:
    """Elements of every tensor in the file (read from its header)."""
    return sum(int(t.n_elements) for t in open_reader(Path(path)).tensors)


class GGUFSource:
    """The tensors of a GGUF model file by their transformers names; ``config`` is the
    transformers config transformers builds from the file."""

    def __init__(self, path: Path):
        self.folder = Path(path)  # SafetensorsFolder's name for where the weights are, used in messages
        reader = open_reader(self.folder)
        field = reader.fields.get("general.architecture")
        architecture = field.contents() if field is not None else None
        if architecture not in STREAMABLE:
            raise NotStreamable(f"offload = \"disk\" streams GGUF files of the architectures {', '.join(STREAMABLE)}; "
                              f"{self.folder.name} is {architecture!r}", field="model.offload",
                              fix="set offload = \"none\" in [model] to load it whole through transformers")
        self.config, self.processor, names = _transformers_view(self.folder, architecture)
        self.where = {names[t.name]: _entry(t) for t in reader.tensors if t.name in names}

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def nbytes(self, name: str, dtype: torch.dtype) -> int:
        return math.prod(self.where[name].shape) * torch.finfo(dtype).bits // 8

    def map(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """A copy: a GGUF tensor is dequantized or reordered before use, so it cannot stay
        file-backed as a safetensors tensor stored in the compute dtype can."""
        return self.read(name, dtype)

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.read_many([name], dtype)[name]

    def read_many(self, names: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Copies of ``names`` in ``dtype`` (float32 when None). The file is mapped for this call
        only: the pages a read touched would stay resident (file-backed) while it is mapped."""
        data = np.memmap(self.folder, mode="r", dtype=np.uint8)
        return {name: self._tensor(data, name, dtype) for name in names}

    def _tensor(self, data, name: str, dtype: torch.dtype | None) -> torch.Tensor:
        entry = self.where[name]
        stored = data[entry.offset:entry.offset + entry.size]
        if stored.size != entry.size:  # the file was cut short after it was opened
            raise _refuse(self.folder, f"is truncated: {entry.gguf_name} runs past the end of the file")
        values = _dequantize(stored.view(entry.item).reshape(entry.stored), entry.ggml_type, entry.shape)
        values = self.processor.process(weights=values, name=entry.gguf_name).weights
        tensor = torch.from_numpy(np.ascontiguousarray(values))
        return tensor if dtype is None else tensor.to(dtype)


def _entry(tensor) -> _Entry:
    return _Entry(tensor.name, int(tensor.tensor_type), tuple(int(d) for d in reversed(tensor.shape.tolist())),
                  tuple(tensor.data.shape), tensor.data.dtype.str, int(tensor.data_offset), int(tensor.n_bytes))


def _transformers_view(path: Path, architecture: str):
    """What transformers' GGUF loader makes of the file: the config, the tensor processor (which
    undoes llama.cpp's q/k permutation for Llama) and the map from GGUF to transformers names."""
    from transformers import CONFIG_MAPPING
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                          get_gguf_hf_weights_map, load_gguf_checkpoint)

    try:
        # The keys as transformers parses them: its processor reads them as they are (a file
        # without head_count_kv keeps Llama's q/k rows unpermuted), and the config is built from
        # them as AutoConfig.from_pretrained(gguf_file=...) builds it, without parsing the file
        # again (a large vocabulary takes seconds to parse).
        parsed = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
        config = CONFIG_MAPPING[parsed["model_type"]].from_dict(copy.deepcopy(parsed))
        processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed)
        names = get_gguf_hf_weights_map(build_shell(copy.deepcopy(config), torch.float32), processor)
    except Exception as exc:  # noqa: BLE001  (transformers' reasons vary; the file is what the user can act on)
        raise _refuse(path, f"cannot be read by transformers' GGUF loader: {type(exc).__name__}: {str(exc)[:300]}",
                      "check that the file is a complete GGUF model") from None
    return config, processor, names


def _dequantize(stored, ggml_type: int, shape: tuple[int, ...]):
    """gguf-py's float32 values of ``stored``, a block of rows at a time: the same values as all
    rows at once (every ggml block lies inside one row)."""
    from gguf.quants import dequantize

    rows = stored.reshape(-1, stored.shape[-1])
    out = np.empty((rows.shape[0], shape[-1]), dtype=np.float32)
    step = max(1, DEQUANTIZE_ELEMENTS // shape[-1])
    for start in range(0, rows.shape[0], step):
        out[start:start + step] = dequantize(rows[start:start + step], ggml_type)
    return out.reshape(shape)


# ------------------------------------------------------------------------- expanding to a folder


def write_folder(source: GGUFSource, folder: Path, dtype: torch.dtype = torch.float32) -> None:
    """The model of ``source`` as a transformers folder in ``dtype``: one safetensors shard for
    everything outside the decoder layers, then one per layer, ``model.safetensors.index.json``
    and ``config.json`` (and ``generation_config.json``), holding one tensor at a time. A tied head
    is not in the file, so not in the folder either (as ``save_pretrained`` leaves it out)."""
    from transformers import GenerationConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(source.config)
    shell = build_shell(config, dtype)
    groups = _by_layer(list(source.where), find_layers_path(shell))
    weight_map, total = {}, 0
    for number, names in enumerate(groups, 1):
        file = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        total += write_safetensors(folder / file, {n: (source.where[n].shape, dtype) for n in names},
                                   lambda name: source.read(name, dtype))
        weight_map.update(dict.fromkeys(names, file))
    atomic.write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total},
                                                                 "weight_map": weight_map})
    config.dtype = dtype
    config.architectures = [type(shell).__name__]  # as save_pretrained records the class it saved
    config.save_pretrained(folder)
    if shell.can_generate():
        GenerationConfig.from_model_config(config).save_pretrained(folder)


def _by_layer(names: list[str], layers_path: str) -> list[list[str]]:
    """``names`` in shards: everything outside the decoder layers first, then each layer's."""
    prefix = layers_path + "."
    rest = [n for n in names if not n.startswith(prefix)]
    layers: dict[int, list[str]] = {}
    for name in names:
        if name.startswith(prefix):
            layers.setdefault(int(name[len(prefix):].split(".", 1)[0]), []).append(name)
    return [rest] + [layers[index] for index in sorted(layers)]
