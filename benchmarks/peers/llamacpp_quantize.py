"""llama.cpp's own quantizer (``llama_model_quantize`` through llama-cpp-python), run in the
environment that holds llama-cpp-python (never a pocketlm dependency):

  LLAMA_PYTHON benchmarks/peers/llamacpp_quantize.py IN.gguf OUT.gguf TYPE [--threads 2] [--imatrix FILE]

``TYPE``: a llama.cpp file type name without its ``LLAMA_FTYPE_MOSTLY_`` prefix (``Q4_K_M``,
``Q3_K_M``, ``Q4_0``, ...). llama.cpp chooses each tensor's block type by its own rules (for
``Q4_K_M``: Q6_K for half of ``attn_v`` and ``ffn_down`` and for a tied embedding, Q4_K
elsewhere, Q5_0/IQ4_NL fallbacks for rows 256 does not divide).

``--imatrix FILE``: an importance matrix (tensor name -> mean squared activation of each input
column, the statistic llama.cpp's ``llama-imatrix`` tool collects) in a flat little-endian
layout: uint32 entries; per entry uint32 name length, the name's bytes, uint32 value count, that
many float32 values. It is passed as ``llama_model_quantize_params.imatrix``, a C array of
``llama_model_imatrix_data`` ended by an entry without a name. Prints a JSON line with the
version, the type, the bytes and whether an importance matrix was used.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import struct


def read_importance_matrix(path: str) -> list[tuple[str, bytes, int]]:
    """``[(tensor name, float32 bytes, value count)]`` from the flat file."""
    entries = []
    with open(path, "rb") as handle:
        (count,) = struct.unpack("<I", handle.read(4))
        for _ in range(count):
            (length,) = struct.unpack("<I", handle.read(4))
            name = handle.read(length).decode()
            (size,) = struct.unpack("<I", handle.read(4))
            entries.append((name, handle.read(4 * size), size))
    return entries


def imatrix_array(llama_cpp, entries):
    """The C array llama.cpp reads (kept alive by the returned buffers)."""
    array = (llama_cpp.llama_model_imatrix_data * (len(entries) + 1))()
    buffers = []
    for i, (name, data, size) in enumerate(entries):
        values = (ctypes.c_float * size).from_buffer_copy(data)
        label = ctypes.create_string_buffer(name.encode())
        buffers += [values, label]
        array[i].name = ctypes.cast(label, ctypes.c_char_p)
        array[i].data = ctypes.cast(values, ctypes.POINTER(ctypes.c_float))
        array[i].size = size
    array[len(entries)].name = None   # the end
    return array, buffers


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("source")
    parser.add_argument("target")
    parser.add_argument("type")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--imatrix", help="importance matrix file (see the module docstring)")
    args = parser.parse_args()

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{args.type.upper()}")
    params.nthread = args.threads
    if args.imatrix:
        array, buffers = imatrix_array(llama_cpp, read_importance_matrix(args.imatrix))
        params.imatrix = ctypes.cast(array, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    code = llama_cpp.llama_model_quantize(args.source.encode(), args.target.encode(), ctypes.byref(params))
    if code != 0:
        raise SystemExit(f"llama_model_quantize returned {code}")
    print(json.dumps({"llama_cpp_version": llama_cpp.__version__, "type": args.type.upper(),
                      "imatrix": bool(args.imatrix), "bytes": os.path.getsize(args.target)}))


if __name__ == "__main__":
    main()
