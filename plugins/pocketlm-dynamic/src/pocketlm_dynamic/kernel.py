"""The compiled gather kernel (``gather.c``), built on first use with the system C compiler.

PyTorch's ``index_select`` copies the surviving rows before the product, which costs more than
it saves on a CPU (measured: see docs/bench/dynamic.md), so the decode path calls a small C loop
that reads each surviving row once and accumulates it in place. It is compiled once into the
pocketlm cache (``$POCKETLM_CACHE`` or ``~/.cache/pocketlm``) and loaded with ctypes; where no
compiler is found, :func:`load` returns None and the decode path uses PyTorch operations.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("gather.c")
_LOADED: dict[str, object] = {}


def _cache() -> Path:
    return Path(os.environ.get("POCKETLM_CACHE") or Path.home() / ".cache" / "pocketlm") / "dynamic"


def load():
    """The compiled library (``gather_matvec`` and ``gather_matvec_low_rank``), or None where
    it cannot be built."""
    if "lib" in _LOADED:
        return _LOADED["lib"]
    lib = None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler:
        text = SOURCE.read_bytes()
        library = _cache() / f"gather-{hashlib.sha256(text).hexdigest()[:12]}.so"
        try:
            if not library.exists():
                library.parent.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
                    built = Path(tmp) / library.name
                    subprocess.run([compiler, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", str(SOURCE),
                                    "-o", str(built)], check=True, capture_output=True)
                    built.replace(library)  # atomic: another process may be building it too
            lib = ctypes.CDLL(str(library))
            lib.gather_matvec.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 2 + [ctypes.c_float, ctypes.c_int]
            lib.gather_matvec_low_rank.argtypes = ([ctypes.c_void_p] * 5 + [ctypes.c_long] * 3
                                                   + [ctypes.c_float, ctypes.c_int])
            lib.gather_matvec.restype = lib.gather_matvec_low_rank.restype = None
        except (OSError, subprocess.CalledProcessError):
            lib = None
    _LOADED["lib"] = lib
    return lib


def gather_matvec(lib, x: torch.Tensor, weight_t: torch.Tensor, threshold: float) -> torch.Tensor:
    """``sparsify(x) @ weight_t`` through the compiled kernel (float32, contiguous, CPU)."""
    rows, columns = weight_t.shape
    y = torch.empty(columns, dtype=torch.float32)
    x = x.contiguous()
    lib.gather_matvec(x.data_ptr(), weight_t.data_ptr(), y.data_ptr(), rows, columns, threshold,
                      torch.get_num_threads())
    return y


def gather_matvec_low_rank(lib, x: torch.Tensor, weight_t: torch.Tensor, low_rank_b_t: torch.Tensor,
                           low_rank_a_t: torch.Tensor, threshold: float) -> torch.Tensor:
    """``sparsify(x) @ weight_t + ((x - sparsify(x)) @ low_rank_b_t) @ low_rank_a_t`` through the
    compiled kernel (float32, contiguous, CPU; ``low_rank_b_t`` is ``[in, rank]``,
    ``low_rank_a_t`` ``[rank, out]``)."""
    rows, columns = weight_t.shape
    y = torch.empty(columns, dtype=torch.float32)
    x = x.contiguous()
    lib.gather_matvec_low_rank(x.data_ptr(), weight_t.data_ptr(), low_rank_b_t.data_ptr(), low_rank_a_t.data_ptr(),
                               y.data_ptr(), rows, columns, low_rank_b_t.shape[1], threshold, torch.get_num_threads())
    return y
