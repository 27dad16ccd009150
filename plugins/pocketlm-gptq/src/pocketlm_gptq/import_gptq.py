"""GPTQ checkpoints as model sources, their integer grids kept exactly.

A folder written by AutoGPTQ, GPTQModel, transformers (optimum) or this plugin's ``gptq``
exporter (``config.json`` with ``quantization_config.quant_method = "gptq"``) loads with every
quantized linear as a :class:`pocketlm.weights.QuantizedLinear` holding the checkpoint's grid,
scales and zero points, not dequantized. Any exporter can then write it; one whose format holds
the grid writes it exactly (a symmetric 4-bit group-32 checkpoint becomes Q4_0 GGUF bit for bit).

The tensors (see :mod:`pocketlm_gptq.export_gptq` for the layout): ``qweight`` int32
``[in * bits / 32, out]`` packed along the input, ``qzeros`` int32 ``[groups, out * bits / 32]``
packed along the output (``checkpoint_format = "gptq"``, v1, stores zero - 1; ``gptq_v2`` stores
the zero as is), ``scales`` float16 ``[groups, out]``, ``g_idx`` int32 ``[in]`` (optional: the
group of each input row; act-order checkpoints permute it), ``bias``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pocketlm import LoadedModel, PocketError, load_quantized_folder
from pocketlm.quantized_sources import config_quantization
from pocketlm.weights import QuantizedLinear, group_index, unpack

# ``load_quantized_folder`` and ``config_quantization`` moved to the core (pocketlm.quantized_sources);
# importing them from here keeps working.
__all__ = ["config_quantization", "gptq_linear", "is_gptq_folder", "load_gptq", "load_quantized_folder",
           "quantization_config", "unpack_zeros"]


def quantization_config(folder: Path) -> dict | None:
    """The folder's GPTQ quantization config, or None when it is not a GPTQ checkpoint."""
    quant = config_quantization(folder)
    if not quant and (folder / "quantize_config.json").is_file():  # AutoGPTQ kept it beside
        beside = json.loads((folder / "quantize_config.json").read_text())
        # AutoAWQ writes a quantize_config.json too, with w_bit where AutoGPTQ writes bits
        quant = {"quant_method": "gptq", **beside} if "bits" in beside else {}
    return quant if str(quant.get("quant_method", "")).lower() == "gptq" else None


def is_gptq_folder(source: str) -> bool:
    folder = Path(source).expanduser()
    return folder.is_dir() and quantization_config(folder) is not None


def unpack_zeros(qzeros: torch.Tensor, bits: int, out_features: int, checkpoint_format: str) -> torch.Tensor:
    """Zero points ``[groups, out]`` from ``qzeros``; v1 stores zero - 1."""
    zeros = unpack(qzeros.contiguous(), bits, out_features).to(torch.int64)
    return zeros + (1 if checkpoint_format == "gptq" else 0)


def gptq_linear(tensors: dict[str, torch.Tensor], bits: int, group_size: int, symmetric: bool,
                checkpoint_format: str) -> QuantizedLinear:
    """One :class:`QuantizedLinear` from its GPTQ tensors (``qweight``, ``qzeros``, ``scales``,
    optional ``g_idx`` and ``bias``), grid bits unchanged."""
    packed_in, out_features = tensors["qweight"].shape
    in_features = packed_in * 32 // bits
    q = unpack(tensors["qweight"].t().contiguous(), bits, in_features)               # [out, in]
    zeros = unpack_zeros(tensors["qzeros"], bits, out_features, checkpoint_format)     # [groups, out]
    if int(zeros.max()) > 2**bits - 1:
        raise ValueError(f"a zero point of {int(zeros.max())} does not fit {bits} bits (a v1 checkpoint that "
                         "stored a zero of 0); re-export it as gptq_v2")
    scales = tensors["scales"].t().contiguous()                                        # [out, groups]
    g_idx = tensors.get("g_idx")
    if g_idx is not None and torch.equal(g_idx.long(), group_index(in_features, group_size)):
        g_idx = None  # the plain order: no permutation to keep
    symmetric = symmetric and bool((zeros == 2 ** (bits - 1)).all())
    return QuantizedLinear.from_grid(q, scales, zeros.t(), bits=bits, group_size=group_size, symmetric=symmetric,
                                     bias=tensors.get("bias"), g_idx=g_idx)


def load_gptq(source: str, options) -> LoadedModel:
    """Load a GPTQ checkpoint folder: the architecture from its config, the quantized linears as
    exact grids, everything else as stored (cast to the recipe's dtype)."""
    folder = Path(source).expanduser()
    quant = quantization_config(folder)
    bits, group_size = int(quant["bits"]), int(quant.get("group_size", -1))
    symmetric = bool(quant.get("sym", True))
    checkpoint_format = quant.get("checkpoint_format", "gptq")
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise PocketError(f"{folder}: GPTQ checkpoint_format {checkpoint_format!r} is not readable",
                          field="model.source", fix="re-save it as gptq or gptq_v2 (GPTQModel)")

    def grids(tensors: dict[str, torch.Tensor]) -> dict[str, QuantizedLinear]:
        modules = {}
        for name in sorted(n[: -len(".qweight")] for n in tensors if n.endswith(".qweight")):
            parts = {key: tensors.pop(f"{name}.{key}") for key in ("qweight", "qzeros", "scales", "g_idx", "bias")
                     if f"{name}.{key}" in tensors}
            try:
                modules[name] = gptq_linear(parts, bits, group_size, symmetric, checkpoint_format)
            except ValueError as error:
                raise PocketError(f"{folder}: cannot read the GPTQ grid of {name}: {error}",
                                  field="model.source") from None
        return modules

    return load_quantized_folder(folder, options, grids, what="GPTQ checkpoint")
