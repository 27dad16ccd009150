"""compressed-tensors checkpoints (llm-compressor's format) as model sources, grids kept exactly.

A folder whose ``config.json`` has ``quantization_config.quant_method = "compressed-tensors"``
with ``format = "pack-quantized"`` (integer weights, what llm-compressor's W4A16/W8A16 presets
and the ``compressed-tensors`` exporter write) loads with every quantized linear as a
:class:`pocketlm.weights.QuantizedLinear`: ``weight_packed`` (signed values ``q - 2**(bits-1)``
packed along the input), ``weight_scale`` ``[out, groups]``, ``weight_zero_point`` (asymmetric
only, packed along the output), ``weight_g_idx`` (act-order ``group``), ``weight_shape``.

A grid pocketlm cannot hold exactly is refused with the reason, never rounded: a strategy other
than ``channel`` or ``group`` (``tensor``, ``block``, ``tensor_group``), a float or activation
quantization scheme, or scales that float16 (pocketlm's scale dtype) cannot represent
bit for bit (llm-compressor stores scales in the model's dtype: a bfloat16 scale with more range
or fewer mantissa bits than float16 may not fit).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from pocketlm import LoadedModel, PocketError, load_quantized_folder
from pocketlm.quantized_sources import config_quantization, exact_float16
from pocketlm.weights import QuantizedLinear, group_index


def quantization_config(folder: Path) -> dict | None:
    """The folder's compressed-tensors quantization config, or None when it is not one."""
    quant = config_quantization(folder)
    return quant if str(quant.get("quant_method", "")).lower() == "compressed-tensors" else None


def is_compressed_tensors_folder(source: str) -> bool:
    folder = Path(source).expanduser()
    return folder.is_dir() and quantization_config(folder) is not None


def _targets(target: str, name: str) -> bool:
    """Whether a compressed-tensors target (``re:PATTERN``, a module name, or a class name such
    as ``Linear``, which every quantized tensor here belongs to) covers module ``name``."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or target == "Linear"


def scheme_of(name: str, quant: dict) -> dict:
    """The ``weights`` arguments of the config group that targets ``name``."""
    for group in (quant.get("config_groups") or {}).values():
        if any(_targets(t, name) for t in group.get("targets", [])):
            return group
    raise ValueError("no config group targets it")


def ct_linear(tensors: dict[str, torch.Tensor], group: dict) -> QuantizedLinear:
    """One :class:`QuantizedLinear` from its pack-quantized tensors and its config group."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    weights = group.get("weights") or {}
    if group.get("input_activations") or group.get("output_activations"):
        raise ValueError("the scheme quantizes activations too, which pocketlm's weight-only grids do not hold")
    if weights.get("type", "int") != "int":
        raise ValueError(f"weight type {weights.get('type')!r} is not an integer grid")
    strategy, bits = weights.get("strategy"), int(weights["num_bits"])
    if strategy not in ("channel", "group"):
        raise ValueError(f"strategy {strategy!r} has no pocketlm grid (channel and group do)")
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"{bits}-bit grids are not held (2, 3, 4 and 8 are)")
    group_size = int(weights["group_size"]) if strategy == "group" else -1
    shape = tuple(int(v) for v in tensors["weight_shape"].tolist())
    offset = 2 ** (bits - 1)
    q = unpack_from_int32(tensors["weight_packed"], bits, torch.Size(shape)).to(torch.int64) + offset
    scales = exact_float16(tensors["weight_scale"].reshape(shape[0], -1))
    symmetric = bool(weights.get("symmetric", True))
    if symmetric:
        zeros = torch.full(scales.shape, offset, dtype=torch.int64)
    else:
        zeros = unpack_from_int32(tensors["weight_zero_point"], bits, torch.Size(scales.shape), packed_dim=0)
        zeros = zeros.to(torch.int64) + offset
    g_idx = tensors.get("weight_g_idx")
    if g_idx is not None and (g_idx < 0).any():
        g_idx = None  # llm-compressor writes -1 when no reordering applies
    if g_idx is not None and torch.equal(g_idx.long(), group_index(shape[1], group_size)):
        g_idx = None
    return QuantizedLinear.from_grid(q, scales, zeros, bits=bits, group_size=group_size, symmetric=symmetric,
                                     bias=tensors.get("bias"), g_idx=g_idx)


def load_compressed_tensors(source: str, options) -> LoadedModel:
    folder = Path(source).expanduser()
    quant = quantization_config(folder)
    fmt = quant.get("format")
    if fmt != "pack-quantized":
        raise PocketError(f"{folder}: compressed-tensors format {fmt!r} is not read exactly",
                          field="model.source", fix="pocketlm reads pack-quantized (integer weight) checkpoints; "
                          "load a dense or float-quantized checkpoint through transformers and compress it again")

    def grids(tensors: dict[str, torch.Tensor]) -> dict[str, QuantizedLinear]:
        modules = {}
        for name in sorted(n[: -len(".weight_packed")] for n in tensors if n.endswith(".weight_packed")):
            parts = {key: tensors.pop(f"{name}.{key}") for key in
                     ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape", "bias")
                     if f"{name}.{key}" in tensors}
            try:
                modules[name] = ct_linear(parts, scheme_of(name, quant))
            except (ValueError, KeyError) as error:
                raise PocketError(f"{folder}: cannot keep the grid of {name} exactly: {error}", field="model.source",
                                  fix="only integer channel or group grids with float16-exact scales load as grids") from None
        return modules

    return load_quantized_folder(folder, options, grids, what="compressed-tensors checkpoint")
