"""The ``awq`` exporter: an AutoAWQ "GEMM" checkpoint that transformers (through gptqmodel or
autoawq), vLLM and GPTQModel read.

Per quantized linear ``name`` (``in`` inputs, ``out`` outputs, groups of ``g`` inputs):

* ``name.qweight`` int32 ``[in, out / 8]``: the 4-bit grid transposed to ``[in, out]`` and
  packed eight values a word along the **output** dimension; word ``c`` holds outputs
  ``8c + AWQ_ORDER[i]`` in bits ``4i .. 4i+3`` (``AWQ_ORDER = 0, 2, 4, 6, 1, 3, 5, 7``);
* ``name.qzeros`` int32 ``[in / g, out / 8]``: the integer zero points, packed the same way;
* ``name.scales`` float16 ``[in / g, out]``; ``name.bias`` float16 where the layer has one.

``w[o, i] = (q - zero) * scale`` with the group of input ``i``: exactly pocketlm's grid, so the
export is bit-exact with the model in memory. ``config.json`` carries
``quantization_config = {quant_method: "awq", bits: 4, group_size, zero_point: true,
version: "gemm", modules_to_not_convert}``. A symmetric grid is written with its constant zero
point (``2**(bits-1)``), which the format represents exactly. The other tensors (embeddings,
norms, dense layers) are written in ``dtype`` (float16 by default, what AWQ kernels run in).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from pocketlm import streaming
from pocketlm import weights as W

from .options import AWQExportOptions  # noqa: F401  (kept importable from here)

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
PACK = 8  # 4-bit values per int32 word


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit integers ``[rows, cols]`` (``cols`` a multiple of 8) along ``cols`` into int32
    ``[rows, cols / 8]`` in AWQ's interleaved order."""
    rows, cols = values.shape
    if cols % PACK:
        raise ValueError(f"{cols} columns do not pack into 8-value words")
    grouped = values.to(torch.int64).reshape(rows, cols // PACK, PACK)[..., list(AWQ_ORDER)]
    words = torch.zeros(rows, cols // PACK, dtype=torch.int64)
    for i in range(PACK):
        words |= (grouped[..., i] & 0xF) << (4 * i)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def awq_tensors(module: W.QuantizedLinear) -> dict[str, torch.Tensor]:
    """``qweight``, ``qzeros``, ``scales`` (and ``bias``) of one quantized linear."""
    grid = module.storage.grid().to(torch.int64)  # [out, in]
    return {
        "qweight": pack_awq(grid.t().contiguous()),
        "qzeros": pack_awq(module.storage.zeros.to(torch.int64).t().contiguous()),
        "scales": module.storage.scales.t().contiguous().half(),
        **({"bias": module.bias.detach().half().contiguous()} if module.bias is not None else {}),
    }


def check(model: nn.Module, options: AWQExportOptions) -> list[str]:
    """Why ``model`` cannot be written as an AWQ GEMM checkpoint (empty: it can)."""
    problems: list[str] = []
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, W.QuantizedLinear)}
    if not quantized:
        return ["the model has no quantized linear layers; run a 4-bit quantizer (awq, gptq, rtn) first"]
    settings = {(m.bits, m.group_size) for m in quantized.values()}
    if len(settings) > 1:
        problems.append(f"the AWQ format holds one bits/group_size for the whole model, found {sorted(settings)}")
    for name, module in quantized.items():
        if module.bits != 4:
            problems.append(f"{name}: {module.bits}-bit; the AWQ GEMM format is 4-bit only "
                            "(use the compressed-tensors exporter for 3- or 8-bit)")
        elif module.group_size == -1:
            problems.append(f"{name}: per-channel grid (group_size -1); AWQ GEMM needs a group size "
                            "(use the compressed-tensors exporter)")
        elif module.in_features % module.group_size:
            problems.append(f"{name}: input width {module.in_features} is not a multiple of group size {module.group_size}")
        if module.out_features % PACK:
            problems.append(f"{name}: output width {module.out_features} is not a multiple of 8")
        if module.storage.g_idx is not None:
            problems.append(f"{name}: act-order grid (g_idx); AWQ has no input permutation (use the gptq exporter)")
        if module.transposed:
            problems.append(f"{name}: a GPT-2 Conv1D layer; AWQ loaders only replace nn.Linear modules")
        if len(problems) >= 8:
            problems.append("...")
            break
    for name, module in model.named_modules():
        if isinstance(module, W.QuantizedEmbedding):
            problems.append(f"{name}: a quantized embedding has no AWQ representation")
    return problems


def awq_part(module: nn.Module, prefix: str, dtype: torch.dtype, tied: bool) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of ``module`` (the whole model, or one decoder layer of a streamed
    one), names prefixed: AWQ tensors for each quantized linear, the rest in ``dtype``."""
    tensors: dict[str, torch.Tensor] = {}
    quantized = {n: m for n, m in module.named_modules() if isinstance(m, W.QuantizedLinear)}
    for name, linear in quantized.items():
        for key, value in awq_tensors(linear).items():
            tensors[f"{prefix}{name}.{key}"] = value
    skip_prefixes = tuple(n + "." for n in quantized)
    seen: set[int] = set()
    for key, value in module.state_dict().items():
        if key.startswith(skip_prefixes):
            continue
        if tied and value.data_ptr() in seen:
            continue  # the tied head: transformers re-ties it from the embedding
        seen.add(value.data_ptr())
        tensors[prefix + key] = (value.to(dtype) if value.is_floating_point() else value).contiguous().clone()
    return tensors


def export_awq(model: nn.Module, path: Path, options: AWQExportOptions, context) -> None:
    path = Path(path)
    dtype = getattr(torch, options.dtype)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    # a part at a time: a streamed model never holds two layers, one in memory never two copies
    streaming.write_sharded(model, path, lambda module, prefix: awq_part(module, prefix, dtype, tied))
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, W.QuantizedLinear)}
    dense = sorted(n for n, m in model.named_modules() if W.is_linear(m) and n not in quantized)
    bits, group_size = next((m.bits, m.group_size) for m in quantized.values())
    config = copy.deepcopy(model.config)
    config.quantization_config = {"quant_method": "awq", "bits": bits, "group_size": group_size,
                                  "zero_point": True, "version": "gemm",
                                  "modules_to_not_convert": dense or None}
    config.dtype = options.dtype
    config.save_pretrained(path)
    (path / "quantize_config.json").write_text(json.dumps(
        {"zero_point": True, "q_group_size": group_size, "w_bit": bits, "version": "GEMM"}, indent=1))
    if context is not None and getattr(context, "tokenizer", None) is not None:
        context.tokenizer.save_pretrained(path)
