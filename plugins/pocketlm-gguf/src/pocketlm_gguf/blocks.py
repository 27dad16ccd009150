"""ggml block formats, packed from pocketlm grids with numpy (pure functions, no I/O).

Every ggml block covers 32 consecutive weights of one row (the input dimension):

* ``block_q4_0`` (18 bytes): fp16 ``d``, then 16 bytes ``qs``; byte ``j`` holds ``q[j]`` in its
  low nibble and ``q[j + 16]`` in its high nibble; ``w = d * (q - 8)``.
* ``block_q4_1`` (20 bytes): fp16 ``d``, fp16 ``m``, 16 bytes ``qs`` as above; ``w = d * q + m``.
* ``block_q5_0`` (22 bytes): fp16 ``d``, 4 bytes ``qh`` (bit ``j``: the fifth bit of ``q[j]``),
  16 bytes ``qs`` (low nibbles, as Q4_0); ``w = d * (q - 16)``.
* ``block_q8_0`` (34 bytes): fp16 ``d``, 32 ``int8``; ``w = d * q``.

The k-quants (Q2_K ... Q6_K, 256-weight super-blocks) are in :mod:`pocketlm_gguf.kquants`.

(ggml's ``ggml-common.h`` and gguf-py's ``quants.py`` define these; the tests check our bytes
against gguf-py's own dequantizer.)

A pocketlm grid ``w = (q - zero) * scale`` with fp16 scales maps onto them exactly when every
32-column block lies inside one quantization group:

* ``bits <= 4`` and every zero ``2**(bits-1)`` (symmetric): Q4_0 with ``d = scale`` and
  ``q4 = q - zero + 8`` (for 4 bits ``q`` itself);
* ``bits <= 4`` otherwise: Q4_1 with ``d = scale``, ``m = fp16(-zero * scale)`` (the only
  rounding in the whole path: ``m`` is stored in fp16);
* ``bits == 5`` symmetric: Q5_0 with ``d = scale``;
* ``bits`` 5 to 8 with ``q - zero`` inside ``int8`` (always so when symmetric): Q8_0, ``d = scale``.

A grid of 2 to 6 bits in sub-blocks of 16 or 32 whose scales sit on a k-quant's two-level grid
(one float16 ``d`` per 256 weights; the ``q2_k`` ... ``q6_k`` grid rules fit such grids) is written
as that k-quant instead (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K). Groups of 16 whose pairs share a scale
and zero point count as groups of 32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType, quants

from pocketlm.weights import PackedGrid

from . import kquants

QK = 32  # weights per block in every format written here
Q = GGMLQuantizationType

FORMATS = {"q4_0": Q.Q4_0, "q4_1": Q.Q4_1, "q5_0": Q.Q5_0, "q5_1": Q.Q5_1, "q8_0": Q.Q8_0,
           "q2_k": Q.Q2_K, "q3_k": Q.Q3_K, "q4_k": Q.Q4_K, "q5_k": Q.Q5_K, "q6_k": Q.Q6_K,
           "f16": Q.F16, "f32": Q.F32}


# ------------------------------------------------------------------------------ packing


def _nibbles(q: np.ndarray) -> np.ndarray:
    """``[rows, blocks * 32]`` values in [0, 15] to ``[rows, blocks, 16]`` bytes (q[j] | q[j+16] << 4)."""
    rows, cols = q.shape
    q = q.astype(np.uint8).reshape(rows, cols // QK, 2, QK // 2)
    return q[:, :, 0, :] | (q[:, :, 1, :] << np.uint8(4))


def _fp16_bytes(x: np.ndarray) -> np.ndarray:
    """``[rows, blocks]`` floats to ``[rows, blocks, 2]`` little-endian fp16 bytes."""
    rows, blocks = x.shape
    return np.ascontiguousarray(x.astype("<f2")).view(np.uint8).reshape(rows, blocks, 2)


def pack_q4_0(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """``q`` ``[rows, cols]`` in [0, 15] (``w = d * (q - 8)``), ``d`` ``[rows, cols/32]``; returns
    ``[rows, cols/32 * 18]`` bytes."""
    rows = q.shape[0]
    return np.concatenate([_fp16_bytes(d), _nibbles(q)], axis=-1).reshape(rows, -1)


def pack_q4_1(q: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """``q`` ``[rows, cols]`` in [0, 15] (``w = d * q + m``); returns ``[rows, cols/32 * 20]`` bytes."""
    rows = q.shape[0]
    return np.concatenate([_fp16_bytes(d), _fp16_bytes(m), _nibbles(q)], axis=-1).reshape(rows, -1)


def pack_q5_0(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """``q`` ``[rows, cols]`` in [0, 31] (``w = d * (q - 16)``); returns ``[rows, cols/32 * 22]`` bytes."""
    rows, cols = q.shape
    high = (q.astype(np.uint8).reshape(rows, cols // QK, QK) >> 4)
    qh = np.packbits(high, axis=-1, bitorder="little")
    return np.concatenate([_fp16_bytes(d), qh, _nibbles(q & 15)], axis=-1).reshape(rows, -1)


def pack_q8_0(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """``q`` ``[rows, cols]`` in [-128, 127] (``w = d * q``); returns ``[rows, cols/32 * 34]`` bytes."""
    rows, cols = q.shape
    qs = q.astype(np.int8).view(np.uint8).reshape(rows, cols // QK, QK)
    return np.concatenate([_fp16_bytes(d), qs], axis=-1).reshape(rows, -1)


# ------------------------------------------------------------------- grids to blocks


@dataclass
class Packed:
    """A tensor ready for the writer: ``data`` (uint8 blocks, or float16/float32 values,
    ``[rows, ...]``), its ggml ``qtype``, and whether it reproduces the source exactly."""

    data: np.ndarray
    qtype: GGMLQuantizationType
    exact: bool
    note: str = ""
    #: Q4_1 from an asymmetric grid: blocks whose offset ``m = -zero * scale`` float16 rounds,
    #: and the largest rounding as a fraction of the block's grid step ``d``
    offsets_rounded: int = 0
    offset_step_fraction: float = 0.0


def block_grid(storage: PackedGrid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | str:
    """The grid of a pocketlm ``PackedGrid`` seen per 32-column block: ``(q [rows, cols] int32,
    scale [rows, blocks] float32, zero [rows, blocks] int32)``, or a string saying why the grid
    has no per-block form (input width not a multiple of 32, or blocks that straddle groups, as
    act-order's ``g_idx`` and group sizes that 32 does not divide make them)."""
    cols = storage.cols
    if cols % QK:
        return f"input width {cols} is not a multiple of {QK}"
    groups = storage.column_groups().view(-1, QK)
    first = groups[:, 0]
    scale = storage.scales.float()[:, first]
    zero = storage.zeros.to(torch.int32)[:, first]
    if not bool((groups == groups[:, :1]).all()):
        # groups of 16 whose pairs share their scale and zero point are groups of 32
        same = (storage.scales.float()[:, groups] == scale.unsqueeze(-1)).all() and \
            (storage.zeros.to(torch.int32)[:, groups] == zero.unsqueeze(-1)).all()
        if not bool(same):
            if storage.g_idx is not None:
                return "act-order grid (g_idx reorders the groups), so 32-column blocks straddle groups"
            return f"group size {storage.group_size} is not a multiple of {QK}, so blocks straddle groups"
    q = storage.grid().to(torch.int32)
    return q, scale, zero


def kquant_blocks(storage) -> Packed | str:
    """The k-quant blocks of ``storage``'s grid (see :mod:`pocketlm_gguf.kquants`), or why it has none."""
    kind = kquants.BY_BITS.get(storage.bits)
    if kind is None:
        return f"no k-quant holds {storage.bits}-bit grids"
    if storage.g_idx is not None or storage.group_size != kind.sub:
        return f"{kind.name.upper()} needs groups of {kind.sub} in plain order"
    packed = kquants.encode_grid(storage.grid().to(torch.int32), storage.scales.float(),
                                 storage.zeros.to(torch.int32), kind)
    if isinstance(packed, str):
        return packed
    return Packed(packed, kind.qtype, True, f"{storage.bits}-bit two-level grid as {kind.name.upper()}")


def exact_blocks(storage) -> Packed | str:
    """The ggml blocks that hold ``storage``'s grid exactly (see the module docstring), or a
    string saying why no block format does."""
    kquant = kquant_blocks(storage) if storage.cols % kquants.QK_K == 0 else "not a multiple of 256"
    if not isinstance(kquant, str):
        return kquant
    grid = block_grid(storage)
    if isinstance(grid, str):
        return grid
    q, scale, zero = grid
    bits = storage.bits
    zero_cols = zero.repeat_interleave(QK, dim=1)
    d = scale.numpy()
    if bits == 5 and bool((zero == 16).all()):
        return Packed(pack_q5_0(q.numpy(), d), Q.Q5_0, True, "5-bit symmetric grid as Q5_0")
    if bits <= 4:
        if bool((zero == 2 ** (bits - 1)).all()):
            return Packed(pack_q4_0((q - zero_cols + 8).numpy(), d), Q.Q4_0, True,
                          f"{bits}-bit symmetric grid as Q4_0")
        m = -zero.float() * scale
        rounding = (m.half().float() - m).abs()  # d * q is exact; m alone is stored rounded
        return Packed(pack_q4_1(q.numpy(), d, m.numpy()), Q.Q4_1, True, f"{bits}-bit asymmetric grid as Q4_1",
                      offsets_rounded=int((rounding > 0).sum()),
                      offset_step_fraction=float((rounding / scale.clamp_min(1e-30)).max()))
    if bits >= 5:
        centred = q - zero_cols
        if int(centred.min()) >= -128 and int(centred.max()) <= 127:
            return Packed(pack_q8_0(centred.numpy(), d), Q.Q8_0, True, f"{bits}-bit grid as Q8_0")
        return f"{bits}-bit asymmetric grid whose offsets leave int8"
    return f"{bits}-bit grid has no ggml block format written here"


def closest_format(storage) -> str:
    """The format a grid that has no exact block form is re-quantized to by default: the same
    size class (Q8_0 for 6 or 8 bits; Q5_0/Q5_1 for 5 bits; Q4_0 for a symmetric grid of 4 bits
    or fewer, Q4_1 otherwise), or F16 where the input width does not split into 32-column blocks."""
    if storage.cols % QK:
        return "f16"
    if storage.bits >= 6:
        return "q8_0"
    if storage.bits == 5:
        return "q5_0" if storage.symmetric else "q5_1"
    return "q4_0" if storage.symmetric else "q4_1"


def encode(weight: torch.Tensor, fmt: str) -> Packed:
    """Dense ``[rows, cols]`` weights in format ``fmt`` ("f32", "f16", or llama.cpp's
    round-to-nearest "q8_0"/"q5_0"/"q5_1"/"q4_0"/"q4_1", bit-for-bit the reference
    ``quantize_row_*`` that gguf-py reimplements; or a k-quant "q2_k" ... "q6_k", whose grid
    pocketlm fits itself with :func:`pocketlm_gguf.kquants.fit_kquant`, as gguf-py has no
    k-quant quantizer; the row length must then be a multiple of 256)."""
    qtype = FORMATS[fmt]
    if fmt in kquants.KQUANTS:
        kind = kquants.KQUANTS[fmt]
        w = weight.detach().float()
        scales, zeros = kquants.fit_kquant(kind, w)
        size = kind.sub
        scale_cols, zero_cols = scales.repeat_interleave(size, 1), zeros.repeat_interleave(size, 1)
        q = torch.clamp(torch.round(w / scale_cols) + zero_cols, 0, 2**kind.bits - 1).to(torch.int32)
        packed = kquants.encode_grid(q, scales, zeros, kind)
        if isinstance(packed, str):
            raise ValueError(f"{fmt}: {packed}")
        return Packed(packed, qtype, False)
    w = weight.detach().float().contiguous().numpy()
    if qtype == Q.F32:
        return Packed(w.astype(np.float32), qtype, True)
    if qtype == Q.F16:
        return Packed(w.astype(np.float16), qtype, False)
    if w.shape[-1] % QK:
        raise ValueError(f"{fmt} needs a row length that is a multiple of {QK}, not {w.shape[-1]}")
    return Packed(quants.quantize(w, qtype), qtype, False)


def decode(packed: Packed, cols: int) -> torch.Tensor:
    """The float32 ``[rows, cols]`` values a runtime reads from ``packed``."""
    if packed.qtype in (Q.F16, Q.F32):
        return torch.from_numpy(packed.data.astype(np.float32))
    values = quants.dequantize(packed.data, packed.qtype)
    return torch.from_numpy(np.ascontiguousarray(values)).reshape(-1, cols)


# ------------------------------------------------------------------------- rotary permute


def rope_permutation(rows: int, n_head: int) -> np.ndarray:
    """The row order llama.cpp's ``convert_hf_to_gguf`` gives q/k projections (HF's rotate-half
    pairs become interleaved pairs): ``new[i] = old[perm[i]]``, per head ``[2, dim/2] -> [dim/2, 2]``.
    transformers' GGUF loader (``LlamaTensorProcessor._reverse_permute_weights``) undoes it. Rows are
    output channels and blocks run along the input, so permuting rows of blocks is exact."""
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows do not split into {n_head} heads of pairs")
    return np.arange(rows).reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(-1)
