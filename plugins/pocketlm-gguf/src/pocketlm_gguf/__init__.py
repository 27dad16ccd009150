"""pocketlm-gguf: the ``gguf`` exporter (llama.cpp's single-file format) and the k-quant grid rules.

Quantized grids that match a ggml block format are written exactly, so a GPTQ, AWQ or RTN model
runs in llama.cpp with the optimized weights themselves: 4 bits or fewer with groups of 32 (or a
multiple of 32) as Q4_0 (symmetric) or Q4_1 (asymmetric), 5-bit symmetric as Q5_0, 6 and 8 bits
as Q8_0, and grids fitted by the ``q2_k`` ... ``q6_k`` grid rules as llama.cpp's k-quants."""

from __future__ import annotations

from pocketlm import Exporter, GridRule, hookimpl, lazy

from .kquant_types import KQUANTS, bits_per_weight
from .options import GGUFOptions

__version__ = "0.3.6"
POCKETLM_API = ">=1.8,<2"

__all__ = ["GGUFOptions", "check", "export_gguf", "register_exporters", "register_grid_rules"]

# Registration reads only the options and the k-quant table; the writer and the fits (numpy,
# torch, gguf) are imported when an export or a fit first runs (``pocketlm.lazy``).
EXPORTER = Exporter(
    name="gguf",
    options=GGUFOptions,
    export=lazy("pocketlm_gguf.export:export_gguf"),
    represents=frozenset({"dense", "masked", "quantized", "quantized-embedding", "restructured"}),
    packs=frozenset({"quantized", "quantized-embedding"}),  # token_embd is stored as Q8_0/Q4_0/Q4_1
    check=lazy("pocketlm_gguf.export:check"),
    streams=True,
    library="gguf",
    summary="one llama.cpp .gguf file (Llama/Mistral/Qwen2): exact Q2_K-Q6_K, Q4_0/Q4_1/Q5_0/Q8_0 from pocketlm "
            "grids, F16/F32 or round-to-nearest for dense layers, tokenizer and provenance metadata",
)


def __getattr__(name: str):
    # check and export_gguf live with the writer, imported on first use (PEP 562)
    if name in ("check", "export_gguf"):
        from . import export

        return getattr(export, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@hookimpl
def register_exporters(register):
    register(EXPORTER)


@hookimpl
def register_grid_rules(register):
    for name, kind in KQUANTS.items():
        register(GridRule(
            name=name, fit=lazy(f"pocketlm_gguf.kquants:fit_{name}"), bits=(kind.bits,), group_sizes=(kind.sub,),
            symmetric=True, uses_importance=True,
            summary=f"llama.cpp's {name.upper()} grid ({kind.bits}-bit, sub-blocks of {kind.sub} under one float16 "
                    f"scale per 256 weights; {bits_per_weight(kind)} bits per weight), importance-weighted; "
                    "the gguf exporter writes it exactly"))
