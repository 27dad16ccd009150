"""``mse-round``: round-to-nearest with an MSE-optimal scale per group.

Plain round-to-nearest (RTN) picks each group's scale so that the grid covers the group's
largest weight. One outlier then stretches the grid and every other weight of the group is
rounded coarsely. ``mse-round`` tries ``grid`` shrunken scales ``s * f`` for ``f`` evenly spaced
in ``[1 - max_shrink, 1]`` and keeps, per group, the one with the smallest squared rounding
error (the outliers get clipped, everything else gets finer steps). ``f = 1`` is among the
candidates, so the error is never worse than RTN's.

The grid is symmetric (``zero = 2**(bits-1)``), so a weight that is exactly zero, such as one
pruned by an earlier stage, stays exactly zero.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from pocketlm import Options, PocketError, SizeEffect
from pocketlm.modules import select_linears, set_module
from pocketlm.weights import (QuantizedLinear, get_mask, is_quantized, is_transposed, linear_bias,
                              linear_weight, to_scale_dtype, transfer_mask)


class MSERoundOptions(Options):
    """Options of ``mse-round``."""

    bits: Literal[2, 3, 4, 8] = Field(4, description="bits per weight")
    group_size: Literal[-1, 32, 64, 128] = Field(64, description="input columns per scale; -1: one per row")
    grid: int = Field(20, ge=1, le=200, description="scale candidates tried per group")
    max_shrink: float = Field(0.2, gt=0.0, lt=1.0, description="smallest candidate is (1 - max_shrink) x the min-max scale")
    targets: list[str] = Field(["*"], description="module-name patterns to quantize")
    ignore: list[str] = Field(["lm_head"], description="module-name patterns to leave alone")


def effect(options: MSERoundOptions) -> SizeEffect:
    # one float16 scale per group (the zero point of a symmetric grid is implied)
    overhead = 16 / options.group_size if options.group_size > 0 else 0.0
    return SizeEffect(bits=options.bits + overhead, features=frozenset({"quantized"}))


# ------------------------------------------------------------------------- pure tensors


def _groups(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[out, in]`` -> ``[out, groups, size]``."""
    rows, cols = weight.shape
    size = cols if group_size == -1 else group_size
    return weight.float().reshape(rows, cols // size, size)


def mse_grid(weight: torch.Tensor, bits: int, group_size: int, grid: int = 20, max_shrink: float = 0.2
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer grid ``q`` ``[out, in]``, ``scales`` and ``zeros`` ``[out, groups]`` minimising
    the squared rounding error of each group over ``grid`` candidate scales."""
    maxq = 2**bits - 1
    zero = 2 ** (bits - 1)
    groups = _groups(weight, group_size)                                  # [out, g, size]
    base = 2 * groups.abs().amax(dim=-1, keepdim=True) / maxq             # min-max scale
    base = torch.where(base == 0, torch.ones_like(base), base)
    best_err = torch.full(base.shape, float("inf"), device=base.device)
    best_scale = base.clone()
    for factor in torch.linspace(1.0, 1.0 - max_shrink, grid).tolist():
        scale = to_scale_dtype(base * factor)                             # scales are stored in float16
        q = torch.clamp(torch.round(groups / scale) + zero, 0, maxq)
        err = ((q - zero) * scale - groups).pow(2).sum(dim=-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
    q = torch.clamp(torch.round(groups / best_scale) + zero, 0, maxq)
    scales = best_scale.squeeze(-1)
    return q.reshape(weight.shape), scales, torch.full_like(scales, zero)


def rounding_error(weight: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   group_size: int) -> float:
    """Squared error between ``weight`` and the grid ``(q - zero) * scale``."""
    size = weight.shape[1] if group_size == -1 else group_size
    scale = scales.repeat_interleave(size, dim=1)
    zero = zeros.repeat_interleave(size, dim=1)
    return float(((q - zero) * scale - weight.float()).pow(2).sum())


# ------------------------------------------------------------------------------ handler


def compress(model: nn.Module, options: MSERoundOptions, context) -> nn.Module:
    modules = select_linears(model, options.targets, options.ignore)
    if not modules:
        raise PocketError("mse-round: no linear layer matches targets/ignore", field="targets",
                          fix="check the module-name patterns against the model's module names")
    for name, module in modules.items():
        if is_quantized(module):
            raise PocketError(f"mse-round: {name} is already quantized", fix="use one quantizer per layer")
        weight = linear_weight(module)
        if options.group_size != -1 and weight.shape[1] % options.group_size:
            raise PocketError(f"mse-round: group_size {options.group_size} does not divide the input width "
                              f"{weight.shape[1]} of {name}", field="group_size",
                              fix="choose a group size that divides every input width, or -1")
        q, scales, zeros = mse_grid(weight, options.bits, options.group_size, options.grid, options.max_shrink)
        mask = get_mask(module)
        if mask is not None:  # pruned weights are zero, and zero sits on the grid; make it explicit
            q = torch.where(mask, q, zeros.repeat_interleave(q.shape[1] // zeros.shape[1], dim=1))
        quantized = QuantizedLinear.from_grid(q, scales, zeros, bits=options.bits, group_size=options.group_size,
                                              symmetric=True, bias=linear_bias(module),
                                              transposed=is_transposed(module))
        transfer_mask(module, quantized)
        set_module(model, name, quantized)
    context.log(f"mse-round: quantized {len(modules)} linear layers to {options.bits} bits "
                f"(group size {options.group_size})")
    return model
