"""The ``compressed-tensors`` exporter: a ``pack-quantized`` checkpoint written through the
compressed-tensors library, which transformers (decompressing on load) and vLLM read.

Per quantized linear: ``weight_packed`` int32 ``[out, in * bits / 32]`` (signed values
``q - 2**(bits-1)`` offset back to unsigned and packed along the input dimension),
``weight_scale`` ``[out, groups]``, ``weight_zero_point`` (asymmetric only; packed along the
output dimension) and ``weight_shape``. ``config.json`` gets the ``quantization_config`` the
library's ``ModelCompressor`` writes from a ``QuantizationConfig``.

How: each quantized linear's integers are packed by the library's own ``pack_to_int32`` and
unpacked again to check that the packing holds pocketlm's grid exactly (the export is exact or it
fails); the ``quantization_config`` is the one the library's ``ModelCompressor`` writes. The model
is written a part at a time (``streaming.write_sharded``), so no dense copy of it is ever made,
whether it is in memory or streams from disk. The library is imported only when this exporter
runs (``pip install compressed-tensors``).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from pocketlm import PocketError, streaming
from pocketlm.weights import QuantizedLinear, is_linear, is_transposed

from .export_gptq import DTYPES, _quantized_linears
from .options import CTExportOptions  # noqa: F401  (kept importable from here)


def check_compressed_tensors(model: nn.Module, options: CTExportOptions) -> list[str]:
    linears = _quantized_linears(model)
    problems = []
    if not linears:
        problems.append("the model holds no quantized linear; run rtn or gptq first, or export with hf")
    conv = [n for n, m in linears.items() if is_transposed(m)]
    if conv:
        problems.append(f"compressed-tensors quantizes nn.Linear layers; {conv[0]} and {len(conv) - 1} more are "
                        "GPT-2 Conv1D layers: export with gptq or hf")
    partial = [n for n, m in linears.items() if m.group_size != -1 and m.in_features % m.group_size]
    if partial:
        problems.append(f"compressed-tensors needs whole groups; {partial[0]} has in={linears[partial[0]].in_features} "
                        f"and group_size {linears[partial[0]].group_size}: export with gptq")
    reordered = [n for n, m in linears.items() if m.storage.g_idx is not None]
    if reordered:
        problems.append(f"{reordered[0]} carries a column reordering (g_idx); export with gptq")
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        problems.append("the compressed-tensors library is not installed: pip install compressed-tensors")
    return problems


def _scheme_key(m: QuantizedLinear) -> tuple[int, int, bool]:
    return m.bits, m.group_size, m.symmetric


def _quantization_config(linears: dict[str, QuantizedLinear], dense_linears: list[str]):
    """The library's description of the schemes, one group per (bits, group size, symmetry),
    for packed tensors (status ``compressed``, as the library's compressor leaves it)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    by_scheme: dict[tuple, list[str]] = {}
    for name, module in linears.items():
        by_scheme.setdefault(_scheme_key(module), []).append(name)
    groups = {}
    for index, ((bits, group_size, symmetric), names) in enumerate(sorted(by_scheme.items())):
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric,
                                strategy="channel" if group_size == -1 else "group",
                                group_size=None if group_size == -1 else group_size,
                                scale_dtype=torch.float16)
        targets = ["Linear"] if len(by_scheme) == 1 else [f"re:^{re.escape(n)}$" for n in names]
        groups[f"group_{index}"] = QuantizationScheme(targets=targets, weights=args, format="pack-quantized")
    return QuantizationConfig(config_groups=groups, quantization_status="compressed", format="pack-quantized",
                              ignore=dense_linears)


def packed_tensors(module: QuantizedLinear, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One quantized linear in the pack-quantized layout, packed by the library's own function
    and checked against pocketlm's integers."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    storage, offset = module.storage, 2 ** (module.bits - 1)
    q = (storage.grid().to(torch.int16) - offset).to(torch.int8)
    packed = pack_to_int32(q, module.bits)
    shape = [module.out_features, module.in_features]
    if not torch.equal(unpack_from_int32(packed, module.bits, torch.Size(shape)), q):
        raise PocketError(f"compressed-tensors packed {prefix.rstrip('.')} to a different grid than pocketlm's",
                          exit_code=1, fix="report this as a bug in pocketlm-gptq")
    out = {prefix + "weight_packed": packed,
           # pocketlm's scales are float16 values; a float32 export stores them as float32 (exactly),
           # because transformers decompresses in the scale's dtype
           prefix + "weight_scale": storage.scales.to(torch.float32 if dtype == torch.float32 else torch.float16).contiguous(),
           prefix + "weight_shape": torch.tensor(shape, dtype=torch.int64)}
    if not module.symmetric:
        zero_point = (storage.zeros.to(torch.int16) - offset).to(torch.int8)
        out[prefix + "weight_zero_point"] = pack_to_int32(zero_point, module.bits, packed_dim=0)
    if module.bias is not None:
        out[prefix + "bias"] = module.bias.data.to(dtype)
    return out


def export_compressed_tensors(model: nn.Module, path: Path, options: CTExportOptions, context) -> None:
    problems = check_compressed_tensors(model, options)
    if problems:
        raise PocketError("cannot export as compressed-tensors: " + "; ".join(problems),
                          field="export.format", fix="see the problems above")
    from compressed_tensors.compressors import ModelCompressor

    path = Path(path)
    dtype = DTYPES[options.dtype]
    linears = _quantized_linears(model)

    def tensors_of(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
        quantized = {n: m for n, m in module.named_modules() if isinstance(m, QuantizedLinear)}
        out = streaming.dense_tensors(module, prefix, dtype, skip=frozenset(quantized))
        for name, linear in quantized.items():
            out.update(packed_tensors(linear, f"{prefix}{name}.", dtype))
        return out

    streaming.write_sharded(model, path, tensors_of)
    streaming.write_config(model, path, dtype)
    dense_linears = [n for n, m in model.named_modules() if is_linear(m) and n not in linears]
    ModelCompressor(quantization_config=_quantization_config(linears, dense_linears)).update_config(str(path))
    if context is not None and getattr(context, "tokenizer", None) is not None:
        context.tokenizer.save_pretrained(path)
