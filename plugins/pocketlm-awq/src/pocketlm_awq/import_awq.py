"""AutoAWQ "GEMM" checkpoints as model sources, their integer grids kept exactly.

A folder written by AutoAWQ, transformers, llm-awq's converters or this plugin's ``awq`` exporter
(``config.json`` with ``quantization_config.quant_method = "awq"``, or AutoAWQ's
``quantize_config.json`` beside it) loads with every quantized linear as a
:class:`pocketlm.weights.QuantizedLinear` holding the checkpoint's grid, scales and zero points,
not dequantized. Any exporter whose format holds the grid then writes it exactly (the ``gptq``
and ``compressed-tensors`` exporters do; see the README for GGUF).

The tensors (see :mod:`pocketlm_awq.export_awq`): ``qweight`` int32 ``[in, out / 8]`` and
``qzeros`` int32 ``[in / g, out / 8]``, both packed along the output in ``AWQ_ORDER``;
``scales`` float16 ``[in / g, out]``; ``bias``. ``w[o, i] = (q - zero) * scale``.

Only the GEMM layout with 4-bit grids and zero points is read. Another version (GEMV,
GEMV_fast, Marlin, exllama, IPEX pack differently), another bit width, ``zero_point = false`` or
tensors whose shapes disagree with the config are refused with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pocketlm import LoadedModel, PocketError, load_quantized_folder
from pocketlm.quantized_sources import config_quantization, exact_float16
from pocketlm.weights import QuantizedLinear

from .export_awq import AWQ_ORDER, PACK

BITS = 4  # the GEMM layout packs 4-bit values only


def quantization_config(folder: Path) -> dict | None:
    """The folder's AWQ quantization config in transformers' keys (``bits``, ``group_size``,
    ``zero_point``, ``version``), or None when it is not an AWQ checkpoint."""
    quant = config_quantization(folder)
    if not quant and (folder / "quantize_config.json").is_file():  # AutoAWQ kept it beside
        try:
            beside = json.loads((folder / "quantize_config.json").read_text())
        except json.JSONDecodeError:
            return None
        if not isinstance(beside, dict) or "w_bit" not in beside:
            return None  # AutoGPTQ's writes bits, not w_bit
        quant = {"quant_method": "awq", "bits": beside["w_bit"], "group_size": beside.get("q_group_size", -1),
                 "zero_point": beside.get("zero_point", True), "version": beside.get("version", "gemm")}
    return quant if str(quant.get("quant_method", "")).lower() == "awq" else None


def is_awq_folder(source: str) -> bool:
    folder = Path(source).expanduser()
    return folder.is_dir() and quantization_config(folder) is not None


def unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """The 4-bit integers ``[rows, cols * 8]`` (int64) of int32 words ``[rows, cols]`` packed
    in AWQ's interleaved order: the exact inverse of :func:`pocketlm_awq.export_awq.pack_awq`."""
    rows, cols = words.shape
    shifts = torch.arange(0, 32, 4, device=words.device)
    nibbles = (words.to(torch.int64)[..., None] >> shifts) & 0xF  # [rows, cols, 8]: nibble i of each word
    values = torch.empty_like(nibbles)
    values[..., list(AWQ_ORDER)] = nibbles  # nibble i holds output AWQ_ORDER[i]
    return values.reshape(rows, cols * PACK)


def _check_shapes(tensors: dict[str, torch.Tensor], group_size: int) -> tuple[int, int]:
    """``(in, out)`` of one layer's tensors, or ValueError naming what disagrees."""
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise ValueError(f"qweight and qzeros must be int32, not {qweight.dtype} and {qzeros.dtype}")
    in_features, out_features = qweight.shape[0], qweight.shape[1] * PACK
    size = in_features if group_size == -1 else group_size
    if in_features % size:
        raise ValueError(f"input width {in_features} is not a multiple of the config's group_size {group_size}")
    groups = in_features // size
    if tuple(scales.shape) != (groups, out_features):
        raise ValueError(f"scales are {list(scales.shape)}, but qweight {list(qweight.shape)} and group_size "
                         f"{group_size} make them [{groups}, {out_features}]")
    if tuple(qzeros.shape) != (groups, out_features // PACK):
        raise ValueError(f"qzeros are {list(qzeros.shape)}, but qweight {list(qweight.shape)} and group_size "
                         f"{group_size} make them [{groups}, {out_features // PACK}]")
    return in_features, out_features


def awq_linear(tensors: dict[str, torch.Tensor], group_size: int) -> QuantizedLinear:
    """One :class:`QuantizedLinear` from its GEMM tensors (``qweight``, ``qzeros``, ``scales``,
    optional ``bias``), grid bits unchanged; symmetric when every zero point is ``2**(bits-1)``."""
    _check_shapes(tensors, group_size)
    q = unpack_awq(tensors["qweight"]).t().contiguous()        # [out, in]
    zeros = unpack_awq(tensors["qzeros"]).t().contiguous()     # [out, groups]
    scales = exact_float16(tensors["scales"]).t().contiguous()  # [out, groups]
    symmetric = bool((zeros == 2 ** (BITS - 1)).all())
    return QuantizedLinear.from_grid(q, scales, zeros, bits=BITS, group_size=group_size, symmetric=symmetric,
                                     bias=tensors.get("bias"))


def _refuse_layout(folder: Path, quant: dict) -> None:
    """A :class:`PocketError` for a config whose grids the GEMM reader cannot keep exactly."""
    fix = ("load a GEMM checkpoint of the model (AutoAWQ's default: version \"gemm\", w_bit 4, zero_point true), "
           "or quantize the original model with method = \"awq\"")
    version = str(quant.get("version", "gemm")).lower()
    if version != "gemm":
        raise PocketError(f"{folder}: AWQ version {quant.get('version')!r} packs its grids differently; "
                          "pocketlm reads the GEMM layout", field="model.source", fix=fix)
    if int(quant.get("bits", BITS)) != BITS:
        raise PocketError(f"{folder}: {quant.get('bits')}-bit AWQ grids; the GEMM layout is 4-bit",
                          field="model.source", fix=fix)
    if not quant.get("zero_point", True):
        raise PocketError(f"{folder}: an AWQ checkpoint without zero points (zero_point = false); pocketlm reads "
                          "grids with zero points", field="model.source", fix=fix)


def load_awq(source: str, options) -> LoadedModel:
    """Load an AWQ GEMM checkpoint folder: the architecture from its config, the quantized
    linears as exact grids, everything else as stored (cast to the recipe's dtype)."""
    folder = Path(source).expanduser()
    quant = quantization_config(folder)
    _refuse_layout(folder, quant)
    group_size = int(quant.get("group_size", -1))

    def grids(tensors: dict[str, torch.Tensor]) -> dict[str, QuantizedLinear]:
        modules = {}
        for name in sorted(n[: -len(".qweight")] for n in tensors if n.endswith(".qweight")):
            parts = {key: tensors.pop(f"{name}.{key}") for key in ("qweight", "qzeros", "scales", "bias")
                     if f"{name}.{key}" in tensors}
            try:
                modules[name] = awq_linear(parts, group_size)
            except (ValueError, KeyError) as error:
                message = f"missing {error}" if isinstance(error, KeyError) else str(error)
                raise PocketError(f"{folder}: cannot read the AWQ grid of {name}: {message}", field="model.source",
                                  fix="the tensors do not match config.json's quantization_config; re-export the "
                                      "checkpoint, or use the config.json it was written with") from None
        return modules

    return load_quantized_folder(folder, options, grids, what="AWQ checkpoint")
