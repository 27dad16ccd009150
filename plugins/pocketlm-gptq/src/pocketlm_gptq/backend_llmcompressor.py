"""``backend = "llmcompressor"``: run llm-compressor's GPTQModifier on the same model and the
same calibration windows, in llm-compressor's own Python environment, and load its result back
as pocketlm ``QuantizedLinear`` grids.

llm-compressor is never a dependency of pocketlm: it pins its own transformers, so it lives in
its own environment, whose Python ``POCKETLM_LLMCOMPRESSOR_PYTHON`` names. The worker
(``llmc_worker.py``, shipped here) runs there through :mod:`pocketlm.external`.

Differences from ``backend = "pocketlm"``: llm-compressor stores scales in the model's dtype
(float32 here); pocketlm's grids hold float16 scales, so scales are rounded to float16 on load
(the integer grid is kept exactly). It does not keep pruning masks, so a masked model is refused.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pocketlm import PocketError, require_whole_model
from pocketlm.external import find_python, run_worker
from pocketlm.quant import Grid, quantize_embedding, replace_with_grid
from pocketlm.saving import save_dense
from pocketlm.weights import get_mask, is_transposed, unpack

WORKER = Path(__file__).with_name("llmc_worker.py")
ENV = "POCKETLM_LLMCOMPRESSOR_PYTHON"
INSTALL = "llmcompressor==0.14.*"


def find_peer_python() -> str:
    """The Python of the environment where llm-compressor is installed, or a PocketError saying
    how to name one."""
    return find_python(ENV, needs="llmcompressor", install=INSTALL, what='backend = "llmcompressor"',
                       field="backend")


def load_packed(tensors: dict, prefix: str, bits: int, symmetric: bool, in_features: int):
    """compressed-tensors ``pack-quantized`` tensors of one linear as a pocketlm grid
    ``(q, scales, zeros)``: packed signed values are stored offset by ``2**(bits-1)``, which is
    pocketlm's unsigned grid; zero points likewise (packed along the output dimension)."""
    offset = 2 ** (bits - 1)
    packed = tensors[prefix + "weight_packed"]
    q = unpack(packed, bits, in_features).to(torch.int32)
    scales = tensors[prefix + "weight_scale"].float()
    if symmetric or prefix + "weight_zero_point" not in tensors:
        zeros = torch.full_like(scales, offset)
    else:
        zp = tensors[prefix + "weight_zero_point"]
        if zp.dtype == torch.int32:  # packed along dim 0
            zeros = unpack(zp.t().contiguous(), bits, q.shape[0]).t().float()
        else:
            zeros = zp.float() + offset
    if prefix + "weight_g_idx" in tensors:
        raise PocketError("llm-compressor returned a reordered grid (weight_g_idx)", exit_code=1,
                          fix="use act_order = false or true (static), not group-wise activation order")
    return q, scales, zeros


def compress_with_llmcompressor(model, options, context, selection):
    require_whole_model(model, "backend = \"llmcompressor\" (it hands llm-compressor a whole dense model)",
                        fix='use backend = "pocketlm", which streams, or set offload = "none" in [model]')
    masked = [n for n, m in selection.linears.items() if get_mask(m) is not None]
    if masked:
        raise PocketError(f"llm-compressor's GPTQ does not keep pruning masks ({masked[0]} has one)",
                          field="backend", fix="use backend = \"pocketlm\", which keeps pruned weights at zero")
    conv = [n for n, m in selection.linears.items() if is_transposed(m)]
    if conv:
        raise PocketError(f"llm-compressor quantizes nn.Linear only; {conv[0]} is a Conv1D", field="backend",
                          fix="use backend = \"pocketlm\"")
    python = find_peer_python()
    windows = context.calibration_windows()
    with tempfile.TemporaryDirectory(prefix="pocketlm-llmc-") as work:
        work = Path(work)
        save_dense(model, work / "model", getattr(context, "tokenizer", None))   # the dense model and its tokenizer
        save_file({"input_ids": windows.contiguous()}, str(work / "windows.safetensors"))
        request = {"model": str(work / "model"), "windows": str(work / "windows.safetensors"),
                   "out": str(work / "out"), "bits": options.bits, "group_size": options.group_size,
                   "symmetric": options.symmetric, "actorder": "static" if options.act_order else "none",
                   "damp": options.damp, "block_size": options.block_size, "threads": torch.get_num_threads(),
                   "targets": [f"re:^{re.escape(n)}$" for n in selection.linears], "ignore": []}
        context.log(f"gptq: running llm-compressor in {python}")
        result = run_worker(python, WORKER, request, what="llm-compressor's GPTQ",
                            fix="run with backend = \"pocketlm\", or check the llm-compressor environment")
        tensors = {}
        for file in sorted((work / "out").glob("*.safetensors")):
            tensors.update(load_file(str(file)))
    worst = 0.0
    for name, module in selection.linears.items():
        q, scales, zeros = load_packed(tensors, name + ".", options.bits, options.symmetric, module.in_features)
        rounded = scales.half().float()
        worst = max(worst, float(((rounded - scales).abs() / scales.abs().clamp(min=1e-12)).max()))
        replace_with_grid(model, name, Grid(q, rounded, zeros), options)
    line = quantize_embedding(model, selection, options)
    if line:
        context.log(line)
    context.log(f"gptq (llm-compressor {result['llmcompressor']}): {len(selection.linears)} linears in "
                f"{result['seconds']:.1f} s; float16 scales differ from its float32 ones by at most {worst:.1e} (relative)")
    return model
