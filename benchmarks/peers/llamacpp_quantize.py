"""llama.cpp's own quantizer (``llama_model_quantize`` through llama-cpp-python), run in the
environment that holds llama-cpp-python (never a pocketlm dependency):

  LLAMA_PYTHON benchmarks/peers/llamacpp_quantize.py IN.gguf OUT.gguf TYPE [--threads 2]

``TYPE``: a llama.cpp file type name without its ``LLAMA_FTYPE_MOSTLY_`` prefix (``Q4_K_M``,
``Q4_0``, ``Q5_K_M``, ...). llama.cpp chooses each tensor's block type by its own rules (for
``Q4_K_M``: Q6_K for half of ``attn_v`` and ``ffn_down`` and for a tied embedding, Q4_K
elsewhere, Q5_0/IQ4_NL fallbacks for rows 256 does not divide). No importance matrix: the
Python binding cannot pass one. Prints a JSON line with the version, the type and the bytes.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("source")
    parser.add_argument("target")
    parser.add_argument("type")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import llama_cpp

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{args.type.upper()}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = args.threads
    code = llama_cpp.llama_model_quantize(args.source.encode(), args.target.encode(), ctypes.byref(params))
    if code != 0:
        raise SystemExit(f"llama_model_quantize returned {code}")
    print(json.dumps({"llama_cpp_version": llama_cpp.__version__, "type": args.type.upper(),
                      "bytes": os.path.getsize(args.target)}))


if __name__ == "__main__":
    main()
