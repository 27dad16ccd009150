"""``backend = "llmcompressor"``: run llm-compressor's AWQ (``AWQModifier`` smoothing, then
``QuantizationModifier`` min-max rounding) on the same model and the same calibration windows,
in llm-compressor's own Python environment, and load its result back into pocketlm.

llm-compressor is never a dependency of pocketlm (it pins its own transformers), so it lives in its
own environment, whose Python ``POCKETLM_LLMCOMPRESSOR_PYTHON`` names. The worker
(``llmc_awq_worker.py``, shipped here) runs there through :mod:`pocketlm.external` and hands back
its compressed-tensors folder plus the unpacked integer grids.

AWQ folds its scales into the operations before the quantized linears (norm weights, the
previous linear's rows), so every dense tensor the worker changed is taken over, not only the
quantized grids. Differences from ``backend = "pocketlm"``:

* no clipping search (llm-compressor's AWQ has none): ``clip`` must be false;
* its scale search measures the loss on every calibration token: ``search_tokens`` must be None
  or cover all of them;
* its α grid is ``n_grid - 1`` points over ``[0, 1]`` plus the identity with ``duo_scaling``
  (``n_grid`` points over ``[0, 1]`` without), where pocketlm's is ``i / n_grid``, ``i < n_grid``;
* it folds a pair even when some of its linears are ignored (those stay dense, rescaled);
* it stores scales in float32; pocketlm's grids hold float16 scales, so scales are rounded to
  float16 on load (the integer grid and zero points are kept exactly);
* it keeps no pruning masks and handles ``nn.Linear`` only: masked models and Conv1D are refused.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pocketlm import PocketError, require_whole_model
from pocketlm import weights as W
from pocketlm import external
from pocketlm.saving import save_dense
from pocketlm.modules import set_module

WORKER = Path(__file__).with_name("llmc_awq_worker.py")
ENV = "POCKETLM_LLMCOMPRESSOR_PYTHON"
INSTALL = "llmcompressor==0.14.*"


def find_peer_python() -> str:
    """The Python of the environment where llm-compressor is installed, or a PocketError saying
    how to name one."""
    return external.find_python(ENV, needs="llmcompressor", install=INSTALL, what='awq backend = "llmcompressor"',
                       field="backend")


def check_options(options, calibration_tokens: int) -> None:
    """Refuse the options llm-compressor's AWQ cannot honour, naming the field and the fix."""
    if options.clip:
        raise PocketError("llm-compressor's AWQ has no clipping search", field="clip",
                          fix="set clip = false with backend = \"llmcompressor\", or use backend = \"pocketlm\"")
    if options.search_tokens is not None and options.search_tokens < calibration_tokens:
        raise PocketError(
            f"llm-compressor's AWQ measures the scale search on every calibration token ({calibration_tokens}), "
            f"not on the first {options.search_tokens}", field="search_tokens",
            fix=f"set search_tokens to {calibration_tokens} or more (or null in a YAML recipe) with backend = "
            "\"llmcompressor\", or use backend = \"pocketlm\"")
    least = 3 if options.duo_scaling else 2
    if options.n_grid < least:
        raise PocketError(f"llm-compressor's AWQ needs n_grid >= {least} (duo_scaling = {options.duo_scaling})",
                          field="n_grid",
                          fix=f"set n_grid to {least} or more with backend = \"llmcompressor\", or use backend = \"pocketlm\"")


def check_model(targets: dict) -> None:
    masked = [n for n, m in targets.items() if W.get_mask(m) is not None]
    if masked:
        raise PocketError(f"llm-compressor's AWQ does not keep pruning masks ({masked[0]} has one)",
                          field="backend", fix="use backend = \"pocketlm\", which keeps pruned weights at zero")
    conv = [n for n, m in targets.items() if W.is_transposed(m) or not isinstance(m, torch.nn.Linear)]
    if conv:
        raise PocketError(f"llm-compressor's AWQ quantizes nn.Linear only; {conv[0]} is a "
                          f"{type(targets[conv[0]]).__name__}", field="backend", fix="use backend = \"pocketlm\"")


def run_worker(model, options, context, names: list[str], work: Path) -> tuple[dict, dict, dict]:
    """Save ``model`` and the calibration windows under ``work``, run the worker; returns the
    tensors of its compressed-tensors folder (``work/out``), its grids and its result JSON."""
    python = find_peer_python()
    windows = context.calibration_windows()
    save_dense(model, work / "model", getattr(context, "tokenizer", None))   # the dense model and its tokenizer
    save_file({"input_ids": windows.contiguous()}, str(work / "windows.safetensors"))
    request = {"model": str(work / "model"), "windows": str(work / "windows.safetensors"), "out": str(work / "out"),
               "grids": str(work / "grids.safetensors"), "bits": options.bits, "group_size": options.group_size,
               "symmetric": options.symmetric, "duo_scaling": options.duo_scaling, "n_grid": options.n_grid,
               "threads": torch.get_num_threads(), "targets": [f"re:^{re.escape(n)}$" for n in names]}
    context.log(f"awq: running llm-compressor's AWQModifier in {python}")
    result = external.run_worker(python, WORKER, request, what="llm-compressor's AWQ",
                        fix="run with backend = \"pocketlm\", or check the llm-compressor environment")
    tensors = {}
    for file in sorted((work / "out").glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors, load_file(str(work / "grids.safetensors")), result


@torch.no_grad()
def compress_with_llmcompressor(model, options, context, targets: dict, work_dir: Path | None = None):
    """AWQ through llm-compressor; ``targets`` are the linears to quantize (name -> module).
    ``work_dir`` keeps the worker's files there (tests); by default a temporary folder."""
    require_whole_model(model, "backend = \"llmcompressor\" (it hands llm-compressor a whole dense model)",
                        fix='use backend = "pocketlm", which streams, or set offload = "none" in [model]')
    check_options(options, int(context.calibration_windows().numel()))
    check_model(targets)
    names = list(targets)
    if work_dir is None:
        with tempfile.TemporaryDirectory(prefix="pocketlm-llmc-awq-") as work:
            tensors, grids, result = run_worker(model, options, context, names, Path(work))
    else:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
        tensors, grids, result = run_worker(model, options, context, names, Path(work_dir))
    missing = sorted(set(names) - set(result["quantized"]))
    if missing:
        raise PocketError(f"llm-compressor did not quantize {len(missing)} targeted linear(s): {', '.join(missing[:4])}",
                          exit_code=1, fix="use backend = \"pocketlm\"")
    # 1. every dense tensor AWQ changed (norm weights, rescaled rows of linears left dense, biases)
    changed = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        new = tensors.get(name)
        if new is None or new.shape != tensor.shape or not new.dtype.is_floating_point:
            continue
        if not torch.equal(new.to(tensor.dtype), tensor.data):
            tensor.data.copy_(new.to(tensor.dtype))
            changed.append(name)
    # 2. the quantized linears, from the worker's unpacked grids
    worst = 0.0
    for name, module in targets.items():
        q, scale, zero = (grids[f"{name}.{k}"] for k in ("q", "scale", "zero"))
        rounded = W.to_scale_dtype(scale)
        worst = max(worst, float(((rounded - scale).abs() / scale.abs().clamp(min=1e-12)).max()))
        bias = W.linear_bias(module)
        quantized = W.QuantizedLinear.from_grid(
            q.to(torch.int32), rounded, zero.float(), bits=options.bits, group_size=options.group_size,
            symmetric=options.symmetric, bias=None if bias is None else bias.float(), transposed=False)
        set_module(model, name, quantized)
    dense_changed = [n for n in changed if not any(n.startswith(t + ".") for t in targets)]
    context.log(f"awq (llm-compressor {result['llmcompressor']}): {len(targets)} linears in {result['seconds']:.1f} s, "
                f"W{options.bits} g{options.group_size} {'sym' if options.symmetric else 'asym'}; took over "
                f"{len(dense_changed)} changed dense tensor(s) ({', '.join(dense_changed[:4])}"
                f"{', ...' if len(dense_changed) > 4 else ''}); float16 scales differ from its float32 ones "
                f"by at most {worst:.1e} (relative)")
    return model
