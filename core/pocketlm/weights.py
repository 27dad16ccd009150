"""Shared weight formats: the types that compress and export meet on.

* :class:`QuantizedLinear` and :class:`QuantizedEmbedding` hold a real integer grid, packed into
  int32 words, with per-group scales and integer zero points, and dequantize on the fly.
  Any quantizer produces them, any exporter reads them.
* Sparsity masks (:func:`set_mask`, :func:`get_mask`) record which weights an earlier stage
  pruned; every later stage must keep those weights at exactly zero.
* :func:`linear_weight` / :func:`set_linear_weight` let methods see every linear map as a plain
  ``[out, in]`` matrix, whether it is an ``nn.Linear``, GPT-2's transposed ``Conv1D`` or a
  quantized linear.

Grid convention (the one common 4-bit checkpoint formats share): ``w = (q - zero) * scale`` with ``q`` in
``[0, 2**bits - 1]``. A symmetric grid has ``zero = 2**(bits - 1)``. Scales are stored in
float16, the dtype every runtime format uses, so an export is bit-exact with the model in memory.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .schemes import BITS, packed_bits_per_weight  # noqa: F401  (packed_bits_per_weight: kept importable from here)

MASK_BUFFER = "weight_mask"


# ---------------------------------------------------------------------------- packing


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers ``q`` (``[rows, n]``, values in ``[0, 2**bits)``) into int32 words.

    The row is one little-endian bit stream: value ``i`` occupies bits ``i*bits ..``. Every 32
    values fill exactly ``bits`` words, so 4-bit packs 8 values a word and 3-bit spreads 32
    values over 3 words (the layout common checkpoint formats use)."""
    rows, n = q.shape
    q = F.pad(q.to(torch.int64), (0, (-n) % 32)).view(rows, -1, 32)
    words = torch.zeros(rows, q.shape[1], bits, dtype=torch.int64, device=q.device)
    for i in range(32):
        word, shift = divmod(i * bits, 32)
        words[..., word] |= (q[..., i] << shift) & 0xFFFFFFFF
        if shift + bits > 32:  # the value straddles two words
            words[..., word + 1] |= q[..., i] >> (32 - shift)
    words = words.view(rows, -1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``[rows, words]`` int32 to ``[rows, n]`` uint8."""
    rows = packed.shape[0]
    words = (packed.to(torch.int64) & 0xFFFFFFFF).view(rows, -1, bits)
    mask = (1 << bits) - 1
    if 32 % bits == 0:  # fast path: no value straddles a word
        shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=packed.device)
        out = (words.unsqueeze(-1) >> shifts) & mask
        return out.reshape(rows, -1)[:, :n].to(torch.uint8)
    out = torch.empty(rows, words.shape[1], 32, dtype=torch.int64, device=packed.device)
    for i in range(32):
        word, shift = divmod(i * bits, 32)
        value = words[..., word] >> shift
        if shift + bits > 32:
            value = value | (words[..., word + 1] << (32 - shift))
        out[..., i] = value & mask
    return out.view(rows, -1)[:, :n].to(torch.uint8)


# ------------------------------------------------------------------------- grid maths


def n_groups(in_features: int, group_size: int) -> int:
    """Number of groups along the input dimension; ``group_size=-1`` means one per row."""
    return 1 if group_size == -1 else math.ceil(in_features / group_size)


def group_index(in_features: int, group_size: int, device: torch.device | None = None) -> torch.Tensor:
    """The group of each input column for a plain (not reordered) grid."""
    size = in_features if group_size == -1 else group_size
    return torch.arange(in_features, device=device) // size


def minmax_grid(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that cover each row of ``w`` (``[rows, cols]``) with ``bits`` bits.

    Returns ``scale`` (float32 holding float16-representable values) and integer ``zero``, both
    ``[rows, 1]``."""
    maxq = 2**bits - 1
    w = w.float()
    if symmetric:
        scale = to_scale_dtype(_nonzero(2 * w.abs().amax(dim=1, keepdim=True) / maxq))
        return scale, torch.full_like(scale, 2 ** (bits - 1))
    lo = w.amin(dim=1, keepdim=True).clamp(max=0)  # the grid always holds an exact zero
    hi = w.amax(dim=1, keepdim=True).clamp(min=0)
    scale = to_scale_dtype(_nonzero((hi - lo) / maxq))
    return scale, torch.round(-lo / scale).clamp(0, maxq)


def group_slices(cols: int, group_size: int) -> list[slice]:
    """Column slices of the groups; a last group shorter than ``group_size`` takes the rest."""
    size = cols if group_size == -1 else group_size
    return [slice(start, start + size) for start in range(0, cols, size)]


def group_grid(W: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max ``scales`` and integer ``zeros`` (both ``[rows, groups]``) of ``W`` ``[rows, cols]``:
    each group's grid spans its minimum and maximum (``weights.minmax_grid``)."""
    W = W.float()
    grids = [minmax_grid(W[:, cols], bits, symmetric) for cols in group_slices(W.shape[1], group_size)]
    return torch.cat([s for s, _ in grids], 1), torch.cat([z for _, z in grids], 1)


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def to_scale_dtype(scale: torch.Tensor) -> torch.Tensor:
    """Round scales to float16 (the stored dtype), keeping them positive and finite."""
    return scale.clamp(min=2**-24, max=65504).half().float()


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer grid point nearest to ``w``; ``scale`` and ``zero`` broadcast against ``w``."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """``w`` rounded onto the grid and mapped back to floats."""
    return (quantize(w, scale, zero, bits) - zero) * scale


# ------------------------------------------------------------------ quantized modules


_DEQUANTIZE_CHUNK = 1 << 20   # weights dequantized at once


class PackedGrid(nn.Module):
    """The storage of a quantized module, the weight format every exporter reads.

    Fields (buffers are saved in state dicts under ``<module>.storage.<name>``):

    * ``rows``, ``cols``: the shape of the matrix (``[out, in]`` for a linear, ``[vocab, hidden]``
      for an embedding); ``bits`` (2 to 8), ``group_size`` (-1: one group per row)
      and ``symmetric`` (the zero point is ``2**(bits-1)``) as the quantizer chose them;
    * ``qweight`` ``[rows, ceil(cols / 32) * bits]`` int32: the integer grid ``q``, each row one
      little-endian bit stream (:func:`pack`);
    * ``scales`` ``[rows, groups]`` float16 and ``zeros`` ``[rows, groups]`` uint8: per group,
      ``w = (q - zero) * scale``;
    * ``g_idx`` ``[cols]`` int32 or None: the group of each column where it is not
      ``column // group_size`` (a reordered grid); :meth:`column_groups` gives it either way.

    Methods: :meth:`set_grid` writes a grid, :meth:`grid` reads ``q`` back (``[rows, cols]``
    uint8), :meth:`dequantize` gives floats, :meth:`storage_bytes` counts the buffers.
    One ``PackedGrid`` may be shared by two modules: a quantized embedding and its tied head
    (see :func:`tied_heads` and :func:`distinct_storages`)."""

    def __init__(self, rows: int, cols: int, bits: int, group_size: int, symmetric: bool, has_g_idx: bool,
                 device: torch.device | None = None):
        super().__init__()
        if bits not in BITS:
            raise ValueError(f"bits must be one of {', '.join(map(str, BITS))}, not {bits}")
        if group_size != -1 and group_size <= 0:
            raise ValueError(f"group_size must be -1 or positive, not {group_size}")
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.rows, self.cols = rows, cols
        groups = n_groups(cols, group_size)
        self.register_buffer("qweight", torch.zeros(rows, math.ceil(cols / 32) * bits, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones(rows, groups, dtype=torch.float16, device=device))
        self.register_buffer("zeros", torch.zeros(rows, groups, dtype=torch.uint8, device=device))
        self.register_buffer("g_idx", torch.zeros(cols, dtype=torch.int32, device=device) if has_g_idx else None)

    def set_grid(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor | None = None) -> None:
        """Store the integer grid ``q`` ``[rows, cols]`` with ``scales``/``zeros`` ``[rows, groups]``
        (and ``g_idx`` where the grid was built with one)."""
        if q.shape != (self.rows, self.cols):
            raise ValueError(f"grid shape {tuple(q.shape)} != {(self.rows, self.cols)}")
        if int(q.min()) < 0 or int(q.max()) > 2**self.bits - 1:
            raise ValueError(f"grid values outside [0, {2**self.bits - 1}]")
        self.qweight.copy_(pack(q, self.bits))
        self.scales.copy_(scales.reshape(self.scales.shape).half())
        self.zeros.copy_(zeros.reshape(self.zeros.shape).to(torch.uint8))
        if g_idx is not None:
            if self.g_idx is None:
                raise ValueError("this grid was built without g_idx")
            self.g_idx.copy_(g_idx.to(torch.int32))

    def column_groups(self) -> torch.Tensor:
        """The group of every column (``[cols]`` int64)."""
        if self.g_idx is not None:
            return self.g_idx.long()
        return group_index(self.cols, self.group_size, self.qweight.device)

    def grid(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The integer grid ``q`` (``[rows, cols]`` uint8), of every row or of the indices ``rows``."""
        packed = self.qweight if rows is None else self.qweight[rows]
        return unpack(packed, self.bits, self.cols)

    def dequantize(self, rows: torch.Tensor | None = None, dtype=torch.float32) -> torch.Tensor:
        """``(q - zero) * scale`` in ``dtype``, of every row or of the indices ``rows``."""
        if rows is None and self.rows * self.cols > _DEQUANTIZE_CHUNK:
            # Row blocks: unpacking goes through int64 (8 bytes a weight, twice), so a whole
            # 2048 x 5632 matrix at once would need 200 MB of temporaries for a 46 MB result.
            out = torch.empty(self.rows, self.cols, dtype=dtype)
            step = max(1, _DEQUANTIZE_CHUNK // self.cols)
            for start in range(0, self.rows, step):
                out[start:start + step] = self.dequantize(torch.arange(start, min(start + step, self.rows)), dtype)
            return out
        groups = self.column_groups()
        scales = (self.scales if rows is None else self.scales[rows]).to(dtype)
        zeros = (self.zeros if rows is None else self.zeros[rows]).to(dtype)
        q = self.grid(rows).to(dtype)
        return (q - zeros[..., groups]) * scales[..., groups]

    def storage_bytes(self) -> int:
        """Bytes of the buffers as stored (grid, scales, zeros, g_idx)."""
        return sum(t.numel() * t.element_size() for t in self.buffers())


class QuantizedLinear(nn.Module):
    """A linear map stored as a packed integer grid; ``forward`` dequantizes.

    ``transposed`` records that the original module was GPT-2's ``Conv1D`` so the dense
    exporter can restore it; the grid itself is always ``[out, in]``."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int = -1,
                 symmetric: bool = True, bias: bool = False, has_g_idx: bool = False,
                 transposed: bool = False, storage: PackedGrid | None = None, device: torch.device | None = None):
        super().__init__()
        self.in_features, self.out_features, self.transposed = in_features, out_features, transposed
        self.storage = storage or PackedGrid(out_features, in_features, bits, group_size, symmetric, has_g_idx, device)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    bits = property(lambda self: self.storage.bits)
    group_size = property(lambda self: self.storage.group_size)
    symmetric = property(lambda self: self.storage.symmetric)

    @classmethod
    def from_grid(cls, q, scales, zeros, *, bits: int, group_size: int, symmetric: bool,
                  bias: torch.Tensor | None = None, g_idx: torch.Tensor | None = None,
                  transposed: bool = False) -> "QuantizedLinear":
        """Build from an integer grid ``q`` ``[out, in]``, ``scales``/``zeros`` ``[out, groups]``,
        on ``q``'s device."""
        out_features, in_features = q.shape
        module = cls(in_features, out_features, bits, group_size, symmetric, bias is not None,
                     g_idx is not None, transposed, device=q.device)
        module.storage.set_grid(q, scales, zeros, g_idx)
        if bias is not None:
            module.bias.data.copy_(bias.detach().float())
        return module

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return self.storage.dequantize(dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}")


class QuantizedEmbedding(nn.Module):
    """A token embedding stored as a packed grid, one row per token; only looked-up rows are
    dequantized. ``tied_head()`` gives the output projection that shares its storage."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, group_size: int = -1,
                 symmetric: bool = True, padding_idx: int | None = None, device: torch.device | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.storage = PackedGrid(num_embeddings, embedding_dim, bits, group_size, symmetric, False, device)

    bits = property(lambda self: self.storage.bits)
    group_size = property(lambda self: self.storage.group_size)
    symmetric = property(lambda self: self.storage.symmetric)

    @classmethod
    def from_grid(cls, q, scales, zeros, *, bits: int, group_size: int, symmetric: bool,
                  padding_idx: int | None = None) -> "QuantizedEmbedding":
        module = cls(q.shape[0], q.shape[1], bits, group_size, symmetric, padding_idx, device=q.device)
        module.storage.set_grid(q, scales, zeros)
        return module

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return self.storage.dequantize(dtype=dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        unique, inverse = torch.unique(flat, return_inverse=True)
        rows = self.storage.dequantize(unique)
        return rows[inverse].view(*ids.shape, self.embedding_dim)

    def tied_head(self) -> QuantizedLinear:
        """An output projection (``[vocab, hidden]``) that shares this embedding's storage."""
        return QuantizedLinear(self.embedding_dim, self.num_embeddings, self.bits, self.group_size,
                               self.symmetric, storage=self.storage)


_PackedGrid = PackedGrid   # the name before API 1.5; kept one release for plugins that use it


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, (QuantizedLinear, QuantizedEmbedding))


def distinct_storages(model: nn.Module) -> dict[str, PackedGrid]:
    """Every quantized module's :class:`PackedGrid`, each once, by the name of the first module
    (in module order) that holds it: a tied head is left out, its embedding named instead."""
    seen: set[int] = set()
    found: dict[str, PackedGrid] = {}
    for name, module in model.named_modules():
        if is_quantized(module) and id(module.storage) not in seen:
            seen.add(id(module.storage))
            found[name] = module.storage
    return found


def tied_heads(model: nn.Module) -> dict[str, str]:
    """Quantized linears that read a quantized embedding's storage (a tied head), mapped to the
    embedding's name: ``{"lm_head": "model.embed_tokens"}`` or ``{}``."""
    owners = {id(m.storage): name for name, m in model.named_modules() if isinstance(m, QuantizedEmbedding)}
    return {name: owners[id(m.storage)] for name, m in model.named_modules()
            if isinstance(m, QuantizedLinear) and id(m.storage) in owners}


# ------------------------------------------------------------------ linear adapter


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D: y = x @ W + b with W stored [in, out].
    # Matched by name (transformers is not imported here), subclasses included.
    return any(cls.__name__ == "Conv1D" for cls in type(module).__mro__) and hasattr(module, "nf")


def is_linear(module: nn.Module) -> bool:
    """True for every module that is a linear map on its last dimension."""
    return isinstance(module, (nn.Linear, QuantizedLinear)) or _is_conv1d(module)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The ``[out, in]`` weight of any linear (a dequantized copy for a quantized one)."""
    if isinstance(module, QuantizedLinear):
        return module.dequantize()
    if _is_conv1d(module):
        return module.weight.data.t()
    return module.weight.data


def set_linear_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write an ``[out, in]`` weight into a dense linear or ``Conv1D``."""
    if isinstance(module, QuantizedLinear):
        raise TypeError("a QuantizedLinear holds a grid; replace the module instead of writing its weight")
    if _is_conv1d(module):
        module.weight.data.copy_(weight.t())
    else:
        module.weight.data.copy_(weight)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of any linear."""
    if isinstance(module, QuantizedLinear):
        return module.out_features, module.in_features
    if _is_conv1d(module):
        return module.weight.shape[1], module.weight.shape[0]
    return module.out_features, module.in_features


def is_transposed(module: nn.Module) -> bool:
    """True where the stored weight is ``[in, out]`` (``Conv1D``, or a grid made from one)."""
    return _is_conv1d(module) or bool(getattr(module, "transposed", False))


def linear_bias(module: nn.Module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    return None if bias is None else bias.data


def dense_linear(module: nn.Module) -> nn.Module:
    """A dense copy of ``module``: ``nn.Linear``, or ``Conv1D`` where it came from one."""
    weight = linear_weight(module).float()
    out_features, in_features = weight.shape
    bias = linear_bias(module)
    if is_transposed(module):
        from transformers.pytorch_utils import Conv1D

        with torch.device(weight.device):   # Conv1D takes no device argument
            dense = Conv1D(out_features, in_features)
        dense.weight.data.copy_(weight.t())
        dense.bias.data.copy_(bias if bias is not None else torch.zeros(out_features, device=weight.device))
        return dense
    dense = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device)
    dense.weight.data.copy_(weight)
    if bias is not None:
        dense.bias.data.copy_(bias)
    return dense


# ------------------------------------------------------------------ sparsity masks


def set_mask(module: nn.Module, mask: torch.Tensor) -> None:
    """Record that ``module``'s weights where ``mask`` is False are pruned, and zero them.

    ``mask`` is ``[out, in]`` booleans, True for kept weights. The record is a non-persistent
    buffer: it travels with the module through stages, and checkpoints store it separately, so
    exported state dicts stay clean."""
    mask = mask.to(torch.bool)
    if mask.shape != linear_shape(module):
        raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape {linear_shape(module)}")
    if MASK_BUFFER in module._buffers:
        mask = mask & module._buffers[MASK_BUFFER]  # masks only ever grow more sparse
    module.register_buffer(MASK_BUFFER, mask, persistent=False)
    if not isinstance(module, QuantizedLinear):
        set_linear_weight(module, linear_weight(module) * mask)


def get_mask(module: nn.Module) -> torch.Tensor | None:
    """The kept-weights mask an earlier stage recorded on ``module``, or None."""
    return module._buffers.get(MASK_BUFFER)


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every recorded mask in ``model``, by module name."""
    return {name: m._buffers[MASK_BUFFER] for name, m in model.named_modules() if MASK_BUFFER in m._buffers}


def transfer_mask(old: nn.Module, new: nn.Module) -> None:
    """Carry ``old``'s mask over to its replacement ``new``."""
    mask = get_mask(old)
    if mask is not None:
        new.register_buffer(MASK_BUFFER, mask, persistent=False)
