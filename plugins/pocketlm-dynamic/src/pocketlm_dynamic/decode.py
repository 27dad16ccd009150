"""The batch-1 decode path: read only the weight columns of the input channels that survive.

Decoding one token multiplies a vector by each weight matrix, which is bound by the bytes of
weight read. With the weight stored transposed (``[in, out]``), the columns of the surviving
input channels are contiguous rows, so gathering them reads ``(1 - sparsity)`` of the bytes in
long runs: ``y = x[keep] @ W_t[keep]``. Prompt processing (several tokens at once) is
compute-bound and stays a dense matmul on the thresholded input. A linear with a low-rank
correction (``low_rank``) also reads its ``B`` rows of the skipped inputs and its ``A``: the
kernel adds ``z = x[skipped] @ B_t[skipped]`` and ``z @ A_t`` in the same pass over the output.

:func:`to_decode` converts a thresholded model (``pocketlm_dynamic.sparsity``) in place; the
result computes the same function (the decode path and the thresholded forward agree to
float rounding, which a test checks), so it is what generation should run.
"""

from __future__ import annotations

import torch
from torch import nn

from pocketlm.modules import set_module
from pocketlm.weights import is_linear, linear_bias, linear_weight

from . import kernel
from .sparsity import INPUT, LOW_RANK_A, LOW_RANK_B, OUTPUT, Thresholded, clear_threshold, sparsify


def gather_matvec(x: torch.Tensor, weight_t: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """``sparsify(x) @ weight_t`` for one ``[in]`` vector, reading only the rows of
    ``weight_t`` (``[in, out]``) whose input survives the threshold."""
    keep = torch.nonzero(x.abs() > threshold).squeeze(1)
    return x.index_select(0, keep) @ weight_t.index_select(0, keep)


class SparseDecodeLinear(nn.Module):
    """A thresholded linear for generation: weight stored ``[in, out]``; one token at a time
    gathers the surviving rows, several tokens run densely on the thresholded input."""

    def __init__(self, weight_t: torch.Tensor, bias: torch.Tensor | None, threshold: float,
                 compiled: bool = True, low_rank: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        # A token's products take 10 to 100 microseconds here, so what runs around the kernel
        # matters: the threshold is kept as a Python float too (reading a tensor's value costs
        # microseconds on every call). The kernel itself is fetched from kernel.load()'s cache
        # per call: a ctypes function held here would make the module impossible to copy or save.
        self.compiled = compiled and kernel.load() is not None
        self.in_features, self.out_features = weight_t.shape
        self.register_buffer("weight_t", weight_t.contiguous())
        self.register_buffer("bias", None if bias is None else bias.clone())
        self.register_buffer("threshold", torch.tensor(float(threshold)))
        self._threshold = float(threshold)
        # the correction transposed like the weight: B_t [in, rank] (the skipped inputs' rows), A_t [rank, out]
        a, b = low_rank if low_rank is not None else (None, None)
        self.register_buffer("low_rank_b_t", None if b is None else b.float().t().contiguous())
        self.register_buffer("low_rank_a_t", None if a is None else a.float().t().contiguous())

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._threshold = float(self.threshold)

    @classmethod
    def from_linear(cls, module: nn.Module, threshold: float, compiled: bool = True) -> "SparseDecodeLinear":
        low_rank = (module._buffers[LOW_RANK_A], module._buffers[LOW_RANK_B]) if LOW_RANK_B in module._buffers else None
        return cls(linear_weight(module).float().t().contiguous(), linear_bias(module), threshold, compiled, low_rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight_t, bias = self._buffers["weight_t"], self._buffers["bias"]   # no nn.Module lookup per call
        b_t, a_t = self._buffers["low_rank_b_t"], self._buffers["low_rank_a_t"]
        if x.numel() == self.in_features and self.compiled and x.dtype == torch.float32 \
                and x.is_cpu and weight_t.is_cpu:  # batch 1, one token: the compiled gather
            flat = x.view(-1) if x.is_contiguous() else x.reshape(-1)
            if b_t is None:
                y = kernel.gather_matvec(kernel.load(), flat, weight_t, self._threshold)
            else:
                y = kernel.gather_matvec_low_rank(kernel.load(), flat, weight_t, b_t, a_t, self._threshold)
        elif x.numel() == self.in_features:  # the same with PyTorch operations
            y = gather_matvec(x.reshape(-1), weight_t, self.threshold)
            if b_t is not None:
                flat = x.reshape(-1)
                y = y + (flat - sparsify(flat, self.threshold)) @ b_t @ a_t
        else:
            kept = sparsify(x, self.threshold)
            y = kept @ weight_t
            if b_t is not None:
                y = y + (x - kept) @ b_t @ a_t
        if bias is not None:
            y = y + bias
        return y.view(x.shape[:-1] + (self.out_features,))

    def extra_repr(self) -> str:
        rank = "" if self.low_rank_b_t is None else f", low_rank={self.low_rank_b_t.shape[1]}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"threshold={float(self.threshold):.4g}{rank}")


def to_decode(model: nn.Module, compiled: bool = True) -> nn.Module:
    """Replace every thresholded linear of ``model`` with a :class:`SparseDecodeLinear` (a
    quantized one is dequantized). A down projection fed by a thresholded activation (CATS)
    gathers on the activation's zeros (threshold 0). ``compiled=False`` keeps to PyTorch
    operations (no C kernel). Returns ``model``."""
    modules = dict(model.named_modules())
    gated = {name.rpartition(".")[0] for name, m in modules.items()
             if isinstance(m, Thresholded) and OUTPUT in m._buffers}
    for name, module in list(modules.items()):
        if isinstance(module, Thresholded) and INPUT in module._buffers and is_linear(module):
            set_module(model, name, SparseDecodeLinear.from_linear(module, float(module._buffers[INPUT]), compiled))
        elif is_linear(module) and name.rpartition(".")[0] in gated and name.endswith("down_proj"):
            set_module(model, name, SparseDecodeLinear.from_linear(module, 0.0, compiled))
    return model


def to_dense(model: nn.Module) -> nn.Module:
    """Remove every threshold (the same model, dense): the baseline of a speed comparison."""
    for module in model.modules():
        clear_threshold(module)
    return model
