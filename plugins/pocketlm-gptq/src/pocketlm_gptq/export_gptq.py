"""The ``gptq`` exporter: the GPTQ checkpoint convention read by transformers (through
gptqmodel/optimum), GPTQModel and vLLM.

Per quantized linear ``name`` (weights seen as ``[out, in]``; GPT-2 ``Conv1D`` too):

* ``name.qweight`` int32 ``[in * bits / 32, out]``: the grid packed along the *input* dimension,
  each column of 32 consecutive input rows one little-endian bit stream over ``bits`` words
  (4-bit: 8 values a word, value ``j`` of a word in bits ``4j..4j+3``; 3-bit: 32 values in 3
  words, values straddling word boundaries);
* ``name.qzeros`` int32 ``[groups, out * bits / 32]``: zero points packed the same way along the
  *output* dimension. ``checkpoint_format = "gptq"`` (v1, what vLLM and most loaders assume)
  stores ``zero - 1``; loaders add the 1 back (GPTQModel's v1->v2 conversion adds 1 to every
  packed field *without* masking, so a zero point of 0 would carry into its neighbour: such a
  grid is refused for v1 and needs ``gptq_v2``, which stores the zero point as is);
* ``name.scales`` float16 ``[groups, out]``; ``name.g_idx`` int32 ``[in]`` (group of each
  input row; plain ``i // group_size`` for pocketlm's static-group act-order); ``name.bias``.

``quantize_config.json`` and ``config.json``'s ``quantization_config`` hold ``quant_method:
"gptq"``, ``bits``, ``group_size``, ``desc_act``, ``sym``, ``checkpoint_format``, ``lm_head``.
Tensors that are not quantized (norms, a quantized embedding, which GPTQ cannot hold, written
dequantized) are stored in ``dtype``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from pocketlm import streaming
from pocketlm.weights import QuantizedEmbedding, QuantizedLinear, group_index, is_linear, pack, tied_heads

from . import __version__
from .options import GPTQExportOptions  # noqa: F401  (kept importable from here)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _quantized_linears(model: nn.Module) -> dict[str, QuantizedLinear]:
    """Quantized linears that own their grid (a tied head shares the embedding's)."""
    tied = tied_heads(model)
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear) and n not in tied}


def gptq_tensors(module: QuantizedLinear, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """The GPTQ tensors of one quantized linear (names relative to the module)."""
    storage = module.storage
    bits, cols = storage.bits, storage.cols
    if cols % 32:
        raise ValueError(f"input width {cols} is not a multiple of 32")
    offset = 1 if checkpoint_format == "gptq" else 0
    zeros = (storage.zeros.to(torch.int64) - offset) & (2**bits - 1)        # [out, groups]
    g_idx = storage.g_idx if storage.g_idx is not None else group_index(cols, storage.group_size)
    tensors = {
        "qweight": storage.qweight.t().contiguous(),                         # [in*bits/32, out]
        "qzeros": pack(zeros.t().contiguous(), bits),                        # [groups, out*bits/32]
        "scales": storage.scales.t().contiguous().half(),                    # [groups, out]
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }
    if module.bias is not None:
        tensors["bias"] = module.bias.data.half()
    return tensors


def _scheme(model: nn.Module) -> tuple[int, int, bool, bool] | None:
    linears = _quantized_linears(model)
    if not linears:
        return None
    first = next(iter(linears.values()))
    desc_act = any(m.storage.g_idx is not None for m in linears.values())
    return first.bits, first.group_size, first.symmetric, desc_act


def check_gptq(model: nn.Module, options: GPTQExportOptions) -> list[str]:
    """Problems that stop a GPTQ export before anything is written."""
    linears = _quantized_linears(model)
    if not linears:
        return ["the model holds no quantized linear; run rtn or gptq first, or export with hf"]
    problems = []
    schemes = {(m.bits, m.group_size, m.symmetric) for m in linears.values()}
    if len(schemes) > 1:
        problems.append(f"the gptq format holds one (bits, group_size, symmetric) per model; found {sorted(schemes)}")
    odd = sorted({m.bits for m in linears.values()} - {2, 3, 4, 8})
    if odd:
        problems.append(f"gptq kernels read 2, 3, 4 or 8 bits, not {odd[0]}: export {odd[0]}-bit grids with gguf")
    narrow = [f"{n} ({m.out_features}x{m.in_features})" for n, m in linears.items()
              if m.in_features % 32 or m.out_features % 32]
    if narrow:
        problems.append(f"gptq packing needs widths that are multiples of 32: {', '.join(narrow[:4])}")
    zero_zero = _zero_point_zero(linears) if options.checkpoint_format == "gptq" else []
    if zero_zero:
        problems.append(_zero_problem(zero_zero))
    dense = [n for n, m in model.named_modules()
             if is_linear(m) and not isinstance(m, QuantizedLinear) and n.rpartition(".")[2] != "lm_head"]
    if dense:
        problems.append(f"gptq loaders quantize every decoder linear, but {len(dense)} are dense "
                        f"(e.g. {dense[0]}); quantize them too or export with compressed-tensors")
    return problems


def _zero_point_zero(linears: dict[str, QuantizedLinear]) -> list[str]:
    """Asymmetric layers with a zero point of 0, which gptq v1 (zero - 1) cannot store."""
    return [n for n, m in linears.items()
            if not m.symmetric and not m.storage.zeros.is_meta and bool((m.storage.zeros == 0).any())]


def _zero_problem(names: list[str]) -> str:
    return (f"{len(names)} layer(s) have a zero point of 0 (e.g. {names[0]}), which gptq v1 (zero - 1) cannot "
            "store; export with checkpoint_format = \"gptq_v2\"")


def gptq_part(module: nn.Module, prefix: str, options: GPTQExportOptions) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of ``module`` (the whole model, or one decoder layer of a streamed
    one), names prefixed: GPTQ tensors for each quantized linear, everything else in ``dtype``,
    a quantized embedding dequantized (GPTQ cannot hold it), a tensor shared twice written once."""
    from pocketlm import PocketError

    dtype = DTYPES[options.dtype]
    linears = _quantized_linears(module)
    zero_zero = _zero_point_zero(linears) if options.checkpoint_format == "gptq" else []
    if zero_zero:  # a streamed model's grids are first read here, layer by layer
        raise PocketError("cannot export as gptq: " + _zero_problem([prefix + n for n in zero_zero]),
                          field="export.format", fix="see the problem above")
    tensors: dict[str, torch.Tensor] = {}
    for name, linear in linears.items():
        for key, value in gptq_tensors(linear, options.checkpoint_format).items():
            tensors[f"{prefix}{name}.{key}"] = value
    seen: set[int] = set()
    for name, sub in module.named_modules():
        where = f"{prefix}{name}." if name else prefix
        if isinstance(sub, QuantizedEmbedding):
            tensors[where + "weight"] = sub.dequantize().to(dtype)
        if isinstance(sub, (QuantizedLinear, QuantizedEmbedding)) or any(name.startswith(q + ".") for q in linears):
            continue
        for key, value in list(sub.named_parameters(recurse=False)) + list(sub.named_buffers(recurse=False)):
            full = where + key
            if value is None or full in tensors or key in sub._non_persistent_buffers_set or value.data_ptr() in seen:
                continue
            seen.add(value.data_ptr())
            tensors[full] = value.detach().to(dtype if value.is_floating_point() else value.dtype).contiguous()
    return tensors


def export_gptq(model: nn.Module, path: Path, options: GPTQExportOptions, context) -> None:
    path = Path(path)
    problems = check_gptq(model, options)
    if problems:
        from pocketlm import PocketError

        raise PocketError("cannot export as gptq: " + "; ".join(problems), field="export.format",
                          fix="see the problems above")
    # a part at a time: a streamed model never holds two layers, one in memory never two copies
    streaming.write_sharded(model, path, lambda module, prefix: gptq_part(module, prefix, options))
    bits, group_size, symmetric, desc_act = _scheme(model)
    linears = _quantized_linears(model)
    head = getattr(model, "lm_head", None)
    quant = {
        "quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act,
        "sym": symmetric, "checkpoint_format": options.checkpoint_format,
        "lm_head": isinstance(head, QuantizedLinear) and "lm_head" in linears,
        "true_sequential": True, "static_groups": False,
        "meta": {"quantizer": [f"pocketlm-gptq:{__version__}"]},
    }
    config = copy.deepcopy(model.config)
    config.quantization_config = quant
    config.dtype = options.dtype
    config.save_pretrained(path)
    (path / "quantize_config.json").write_text(json.dumps(quant, indent=2))
    if context is not None and getattr(context, "tokenizer", None) is not None:
        context.tokenizer.save_pretrained(path)
