"""Safetensors files written and read one tensor at a time: stage checkpoints, the layer shards
of a model streamed from disk, and the weights such a model streams from.

:func:`write_safetensors` holds one tensor in memory while it writes (safetensors' own writer
builds the whole file first); :func:`read_header` checks that a file holds every byte its header
announces; :class:`SafetensorsFolder` reads the tensors of a transformers folder one at a time.
"""

from __future__ import annotations

import contextlib
import json
import math
import struct
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import PocketError

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}

MADV_PAGEOUT = 21  # Linux 5.4+: reclaim these pages now (Python's mmap module does not name it)


def write_safetensors(file: Path, layout: dict[str, tuple[tuple[int, ...], torch.dtype]],
                      read: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """A safetensors file of the tensors ``layout`` names (``name -> (shape, dtype)``), each got
    from ``read(name)``, converted to its dtype and written before the next is read: memory holds
    one tensor, where safetensors' own writer builds the whole file in memory first. Returns the
    bytes of tensor data."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, (shape, dtype) in layout.items():
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(file, "wb") as out:
        out.write(struct.pack("<Q", len(blob)) + blob)
        for name, (shape, dtype) in layout.items():
            tensor = read(name).to(dtype).contiguous()
            if tuple(tensor.shape) != tuple(shape):
                raise PocketError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(shape)}", exit_code=1)
            out.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
            del tensor
    return offset


def save_tensors(tensors: dict[str, torch.Tensor], file: Path, metadata: dict[str, str] | None = None) -> int:
    """:func:`write_safetensors` of tensors already at hand; a tensor held under several names
    (a tied head) is stored once, under the first."""
    seen: set[tuple] = set()
    layout = {}
    for name, tensor in tensors.items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        layout[name] = (tuple(tensor.shape), tensor.dtype)
    return write_safetensors(Path(file), layout, tensors.__getitem__, metadata)


def join_safetensors(files: list[Path], out: Path) -> None:
    """One safetensors file of the tensors of ``files``, in order: byte for byte what
    :func:`save_tensors` writes for their tensors gathered in one dict (each file written by it).
    The headers are merged and the data copied a chunk at a time, so memory holds no tensor."""
    header: dict = {}
    ranges, offset = [], 0
    for file in files:
        part = read_header(Path(file))
        header.setdefault("__metadata__", part.get("__metadata__", {"format": "pt"}))
        size = 0
        for name, info in part.items():
            if name != "__metadata__":
                first, last = info["data_offsets"]
                header[name] = {"dtype": info["dtype"], "shape": info["shape"],
                                "data_offsets": [offset + first, offset + last]}
                size = max(size, last)
        with open(file, "rb") as handle:
            ranges.append((8 + struct.unpack("<Q", handle.read(8))[0], size))
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # as write_safetensors pads it
    with open(out, "wb") as sink:
        sink.write(struct.pack("<Q", len(blob)) + blob)
        for file, (start, size) in zip(files, ranges):
            with open(file, "rb") as source:
                source.seek(start)
                while size:
                    chunk = source.read(min(size, 1 << 24))
                    if not chunk:
                        raise PocketError(f"{file} ended early while joining shards", exit_code=1)
                    sink.write(chunk)
                    size -= len(chunk)


def read_header(file: Path) -> dict:
    """The header of a safetensors file, after checking that the file holds every byte it
    announces (a truncated download or copy is caught here, naming the file)."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            length = struct.unpack("<Q", handle.read(8))[0]
            if length > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(handle.read(length))
    except FileNotFoundError:
        raise PocketError(f"the weight file {file} is missing", field="model.source",
                          fix="copy or download the model folder again; every shard its index names must be there",
                          exit_code=1) from None
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise PocketError(f"the weight file {file} is not a readable safetensors file ({exc})", field="model.source",
                          fix="copy or download it again", exit_code=1) from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end > size:
        raise PocketError(f"the weight file {file} is truncated: it holds {size:,} bytes of the "
                          f"{8 + length + end:,} its header announces", field="model.source",
                          fix="copy or download it again", exit_code=1)
    return header


class SafetensorsFolder:
    """The tensors of a transformers folder: one ``*.safetensors`` file, or shards named by
    ``model.safetensors.index.json``; or only the ``files`` named (a stage checkpoint's
    ``model.safetensors``, apart from its masks). Tensors are read one at a time."""

    def __init__(self, folder: Path, files: list[str] | None = None):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if files is not None:
            files = list(files)
        elif index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if not files:
            raise PocketError(f"{self.folder} holds no safetensors weights; offload = \"disk\" streams only "
                              "safetensors", field="model.offload",
                              fix="convert the weights to safetensors, or set offload = \"none\"")
        self.where: dict[str, tuple[Path, dict]] = {}
        self.data_start: dict[Path, int] = {}
        for name in files:
            header = read_header(self.folder / name)
            with open(self.folder / name, "rb") as handle:
                self.data_start[self.folder / name] = 8 + struct.unpack("<Q", handle.read(8))[0]
            for key, info in header.items():
                if key != "__metadata__":
                    self.where[key] = (self.folder / name, info)
        self._maps: dict[Path, Any] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def nbytes(self, name: str, dtype: torch.dtype) -> int:
        return math.prod(self.where[name][1]["shape"]) * torch.finfo(dtype).bits // 8

    def map(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """``name`` as a tensor backed by the file itself (copy-on-write pages: file-backed memory,
        read only where touched) when it is stored in ``dtype``; else a converted copy."""
        import mmap

        file, info = self.where[name]
        if _DTYPES.get(info["dtype"]) != dtype:
            return self.read(name, dtype)
        if file not in self._maps:
            with open(file, "rb") as handle:
                self._maps[file] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        start, end = info["data_offsets"]
        size = torch.finfo(dtype).bits // 8
        if (self.data_start[file] + start) % size:
            return self.read(name, dtype)
        flat = torch.frombuffer(self._maps[file], dtype=dtype, count=(end - start) // size,
                                offset=self.data_start[file] + start)
        return flat.view(info["shape"])

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.read_many([name], dtype)[name]

    def page_out(self) -> None:
        """Drop the pages of the mapped tensors (the embedding, the head) from resident memory
        after a pass that read them whole (saving, exporting). They are clean copies of the file
        (or the process's own changes, which the kernel keeps), read back when touched again."""
        for mapping in self._maps.values():
            with contextlib.suppress(OSError, ValueError):
                mapping.madvise(MADV_PAGEOUT)

    def read_many(self, names: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Copies of ``names``, each file opened once and closed again: an open file stays mapped,
        and the pages a copy read would stay resident (file-backed) for as long as it is open."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.where[name][0], []).append(name)
        out = {}
        for file, members in by_file.items():
            handle = safe_open(str(file), framework="pt")
            for name in members:
                tensor = handle.get_tensor(name)
                out[name] = tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype)
            del handle
        return out
