"""pocketlm-gguf: the ``gguf`` exporter (llama.cpp's single-file format).

Quantized grids that match a ggml block format (4-bit or fewer with groups of 32 or a multiple
of 32: Q4_0 symmetric, Q4_1 asymmetric; 8-bit symmetric: Q8_0) are written exactly, so a GPTQ,
AWQ or RTN model runs in llama.cpp with the optimized weights themselves."""

from __future__ import annotations

from pocketlm import hookimpl

from .export import EXPORTER, GGUFOptions, check, export_gguf

__version__ = "0.2.0"
POCKETLM_API = ">=1.1,<2"

__all__ = ["GGUFOptions", "check", "export_gguf", "register_exporters"]


@hookimpl
def register_exporters(register):
    register(EXPORTER)
