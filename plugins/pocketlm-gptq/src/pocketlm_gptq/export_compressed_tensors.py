"""The ``compressed-tensors`` exporter: a ``pack-quantized`` checkpoint written through the
compressed-tensors library, which transformers (decompressing on load) and vLLM read.

Per quantized linear: ``weight_packed`` int32 ``[out, in * bits / 32]`` (signed values
``q - 2**(bits-1)`` offset back to unsigned and packed along the input dimension),
``weight_scale`` ``[out, groups]``, ``weight_zero_point`` (asymmetric only; packed along the
output dimension) and ``weight_shape``. ``config.json`` gets the ``quantization_config`` the
library's ``ModelCompressor`` writes from a ``QuantizationConfig``.

How: a dense copy of the model (dequantized weights) gets the library's quantization schemes
attached (``apply_quantization_config``); the scales and zero points are set to pocketlm's grid
and the library packs (``ModelCompressor.compress_model``). The packed grid is then checked
against pocketlm's integers, so the export is exact or it fails. The library is imported only
when this exporter runs (``pip install compressed-tensors``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from pocketlm import Options, PocketError, is_streamed, streaming
from pocketlm.saving import densify
from pocketlm.modules import get_module
from pocketlm.weights import QuantizedLinear, is_linear, is_transposed

from .export_gptq import DTYPES, _quantized_linears


class CTExportOptions(Options):
    """``dtype``: dtype of the dense tensors (norms, embeddings, unquantized layers); scales are
    always stored in float16, the dtype pocketlm's grids hold them in."""

    dtype: Literal["float16", "bfloat16", "float32"] = Field("float16", description="dtype of scales and dense tensors")


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


def _quantization_config(linears: dict[str, QuantizedLinear], dense_linears: list[str], status: str = "frozen"):
    """The library's description of the schemes: one group per (bits, group size, symmetry).
    ``status = "compressed"`` describes packed tensors, as the library's compressor leaves it."""
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
        packed = {"format": "pack-quantized"} if status == "compressed" else {}
        groups[f"group_{index}"] = QuantizationScheme(targets=targets, weights=args, **packed)
    return QuantizationConfig(config_groups=groups, quantization_status=status, format="pack-quantized",
                              ignore=dense_linears)


def packed_tensors(module: QuantizedLinear, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One quantized linear in the pack-quantized layout, packed by the library's own function."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    storage, offset = module.storage, 2 ** (module.bits - 1)
    q = (storage.grid().to(torch.int16) - offset).to(torch.int8)
    out = {prefix + "weight_packed": pack_to_int32(q, module.bits),
           prefix + "weight_scale": storage.scales.to(torch.float16).contiguous(),
           prefix + "weight_shape": torch.tensor([module.out_features, module.in_features], dtype=torch.int64)}
    if not module.symmetric:
        zero_point = (storage.zeros.to(torch.int16) - offset).to(torch.int8)
        out[prefix + "weight_zero_point"] = pack_to_int32(zero_point, module.bits, packed_dim=0)
    if module.bias is not None:
        out[prefix + "bias"] = module.bias.data.to(dtype)
    return out


def _export_streamed(model: nn.Module, path: Path, dtype: torch.dtype, linears: dict, context) -> None:
    from compressed_tensors.compressors import ModelCompressor

    def tensors_of(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
        quantized = {n: m for n, m in module.named_modules() if isinstance(m, QuantizedLinear)}
        out = streaming.dense_tensors(module, prefix, dtype, skip=frozenset(quantized))
        for name, linear in quantized.items():
            out.update(packed_tensors(linear, f"{prefix}{name}.", dtype))
        return out

    streaming.write_sharded(model, path, tensors_of)
    streaming.write_config(model, path, dtype)
    dense_linears = [n for n, m in model.named_modules() if is_linear(m) and n not in linears]
    ModelCompressor(quantization_config=_quantization_config(linears, dense_linears, "compressed")).update_config(str(path))
    if context is not None and getattr(context, "tokenizer", None) is not None:
        context.tokenizer.save_pretrained(path)


def export_compressed_tensors(model: nn.Module, path: Path, options: CTExportOptions, context) -> None:
    problems = check_compressed_tensors(model, options)
    if problems:
        raise PocketError("cannot export as compressed-tensors: " + "; ".join(problems),
                          field="export.format", fix="see the problems above")
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import apply_quantization_config

    path = Path(path)
    dtype = DTYPES[options.dtype]
    linears = _quantized_linears(model)
    if is_streamed(model):  # written layer by layer, never the whole model
        _export_streamed(model, path, dtype, linears, context)
        return
    dense = densify(model).to(dtype)
    if hasattr(dense.config, "quantization_config"):
        del dense.config.quantization_config
    config = _quantization_config(linears, [n for n, m in dense.named_modules() if is_linear(m) and n not in linears])
    apply_quantization_config(dense, config, show_progress=False)

    expected = {}
    for name, module in linears.items():
        target = get_module(dense, name)
        storage = module.storage
        offset = 2 ** (module.bits - 1)
        with torch.no_grad():
            target.weight.copy_(module.dequantize().to(dtype))
            target.weight_scale.copy_(storage.scales.to(target.weight_scale.dtype).view_as(target.weight_scale))
            zero_point = (storage.zeros.to(torch.int16) - offset).to(torch.int8)
            if hasattr(target, "weight_zero_point"):
                target.weight_zero_point.copy_(zero_point.view_as(target.weight_zero_point))
        expected[name] = (storage.grid().to(torch.int16) - offset).to(torch.int8)

    compressor = ModelCompressor.from_pretrained_model(dense, quantization_format="pack-quantized")
    compressor.compress_model(dense)
    for name, q in expected.items():  # the library re-derives the grid; it must be ours exactly
        target = get_module(dense, name)
        packed = unpack_from_int32(target.weight_packed.data, linears[name].bits, target.weight_shape.tolist())
        if not torch.equal(packed, q):
            raise PocketError(f"compressed-tensors packed {name} to a different grid than pocketlm's "
                              f"({int((packed != q).sum())} values differ)", exit_code=1,
                              fix="report this as a bug in pocketlm-gptq")
    dense.save_pretrained(path)
    compressor.update_config(str(path))
    if context is not None and getattr(context, "tokenizer", None) is not None:
        context.tokenizer.save_pretrained(path)

