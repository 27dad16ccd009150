"""pocketlm-gguf: the ``gguf`` exporter (llama.cpp's single-file format) and the k-quant grid rules.

Quantized grids that match a ggml block format are written exactly, so a GPTQ, AWQ or RTN model
runs in llama.cpp with the optimized weights themselves: 4 bits or fewer with groups of 32 (or a
multiple of 32) as Q4_0 (symmetric) or Q4_1 (asymmetric), 5-bit symmetric as Q5_0, 6 and 8 bits
as Q8_0, and grids fitted by the ``q2_k`` ... ``q6_k`` grid rules as llama.cpp's k-quants."""

from __future__ import annotations

from pocketlm import GridRule, hookimpl

from . import kquants
from .export import EXPORTER, GGUFOptions, check, export_gguf

__version__ = "0.3.5"
POCKETLM_API = ">=1.5,<2"

__all__ = ["GGUFOptions", "check", "export_gguf", "register_exporters", "register_grid_rules"]


@hookimpl
def register_exporters(register):
    register(EXPORTER)


@hookimpl
def register_grid_rules(register):
    for name, kind in kquants.KQUANTS.items():
        register(GridRule(
            name=name, fit=kquants.grid_rule_fit(name), bits=(kind.bits,), group_sizes=(kind.sub,),
            symmetric=True, uses_importance=True,
            summary=f"llama.cpp's {name.upper()} grid ({kind.bits}-bit, sub-blocks of {kind.sub} under one float16 "
                    f"scale per 256 weights; {kquants.bits_per_weight(kind)} bits per weight), importance-weighted; "
                    "the gguf exporter writes it exactly"))
