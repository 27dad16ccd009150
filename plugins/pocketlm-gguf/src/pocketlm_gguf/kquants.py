"""llama.cpp's k-quants, written exactly from pocketlm grids (pure functions, numpy/torch, no I/O).

A k-quant super-block covers 256 consecutive weights of a row, in sub-blocks of 32 (Q4_K, Q5_K)
or 16 (Q2_K, Q3_K, Q6_K). Each sub-block ``j`` has an integer scale ``sc_j`` (4, 6 or 8 bits),
and the super-block one float16 ``d`` (ggml's ``block_q*_K`` in ``ggml-common.h``):

* Q2_K (84 bytes): ``w = d * sc_j * q - dmin * m_j``, ``q`` 2-bit, ``sc``/``m`` 4-bit;
* Q3_K (110 bytes): ``w = d * (sc_j - 32) * (q - 4)``, ``q`` 3-bit, ``sc`` 6-bit;
* Q4_K (144 bytes) / Q5_K (176 bytes): ``w = d * sc_j * q - dmin * m_j``, ``q`` 4/5-bit,
  ``sc``/``m`` 6-bit;
* Q6_K (210 bytes): ``w = d * sc_j * (q - 32)``, ``q`` 6-bit, ``sc`` int8.

A pocketlm grid ``w = (q - zero) * scale`` is such a block, value for value, when it is symmetric
(``zero = 2**(bits - 1)``; for the formats with mins, ``dmin = zero * d`` and ``m_j = sc_j``) and
every sub-block's float16 ``scale_j`` equals ``d * sc_j`` for one float16 ``d`` per super-block.
Then gguf-py (and llama.cpp) compute ``d * sc_j * q - dmin * m_j`` with exact float32 products,
which is ``(q - zero) * scale_j`` exactly. :func:`two_level_grid` fits such grids: ``d`` keeps
few enough significant bits that every ``d * sc_j`` is itself a float16.

The ``q2_k`` ... ``q6_k`` grid rules (``fit_q2_k`` ... ``fit_q6_k``) fit those grids;
:func:`encode_grid` finds ``d`` back from a stored grid and packs the blocks. The table of types
(:data:`KQUANTS`) is :mod:`pocketlm_gguf.kquant_types`, which registration reads without numpy.
"""

from __future__ import annotations

import numpy as np
import torch

from pocketlm.grids import weighted_error, weighted_group_grid

from .kquant_types import BY_BITS, KQUANTS, QK_K, KQuant, bits_per_weight, block_bytes  # noqa: F401


# --------------------------------------------------------------------------- fitting


def round_up_to_bits(x: torch.Tensor, bits: int) -> torch.Tensor:
    """The smallest float with ``bits`` significant bits that is ``>= x`` (``x > 0``), never below
    float16's smallest step 2**-24."""
    _, exponent = torch.frexp(x)
    step = torch.maximum(torch.ldexp(torch.ones_like(x), exponent - bits), torch.full_like(x, 2.0**-24))
    return torch.ceil(x / step) * step


def two_level_grid(sub_scales: torch.Tensor, kind: KQuant) -> tuple[torch.Tensor, torch.Tensor]:
    """Put ideal sub-block scales ``[rows, super_blocks, subs]`` on the two-level grid: returns the
    float16 ``d`` ``[rows, super_blocks, 1]`` and integer ``sc`` in ``[1, sc_max]`` with
    ``d * sc`` exactly a float16."""
    top = sub_scales.amax(dim=-1, keepdim=True).clamp(min=2.0**-24)
    d = round_up_to_bits(top / kind.sc_max, kind.d_bits).clamp(max=65504 / kind.sc_max / 2 ** (kind.bits - 1))
    sc = torch.round(sub_scales / d).clamp(1, kind.sc_max)
    return d, sc


def refine_sub_scales(w: torch.Tensor, d: torch.Tensor, sc: torch.Tensor, kind: KQuant,
                      importance: torch.Tensor) -> torch.Tensor:
    """Per sub-block, the integer scale among ``sc - 1, sc, sc + 1`` with the lowest
    importance-weighted squared error. ``w`` is ``[rows, super_blocks, subs, sub]``."""
    zero = 2 ** (kind.bits - 1)
    imp = importance.view(1, *w.shape[1:])
    best_sc, best = sc, None
    for step in (0, -1, 1):
        candidate = (sc + step).clamp(1, kind.sc_max)
        scale = (d * candidate).unsqueeze(-1)
        error = weighted_error(w.reshape(-1, w.shape[-1]), scale.reshape(-1, 1), torch.full_like(scale.reshape(-1, 1), zero),
                               kind.bits, imp.expand_as(w).reshape(-1, w.shape[-1])).view(sc.shape)
        if best is None:
            best = error
            continue
        better = error < best
        best_sc, best = torch.where(better, candidate, best_sc), torch.minimum(error, best)
    return best_sc


def fit_kquant(kind: KQuant, W: torch.Tensor, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid of ``W`` (``[rows, cols]``) exactly representable as ``kind``'s blocks: ``(scales,
    zeros)`` ``[rows, cols / sub]``. Rows that are not a multiple of 256 get a plain grid in
    groups of 32 (repeated per 16-column group where the type's sub-blocks are 16), which
    ggml's 32-weight blocks hold exactly (see :func:`pocketlm_gguf.blocks.exact_blocks`)."""
    W = W.float()
    rows, cols = W.shape
    imp = torch.ones(cols, device=W.device) if importance is None else importance.to(W.device, torch.float32).clamp_min(0)
    if cols % QK_K:
        if cols % 32:
            return weighted_group_grid(W, kind.bits, kind.sub, True, imp)
        scales, zeros = weighted_group_grid(W, kind.bits, 32, True, imp)
        repeat = 32 // kind.sub
        return scales.repeat_interleave(repeat, 1), zeros.repeat_interleave(repeat, 1)
    subs = QK_K // kind.sub
    ideal, _ = weighted_group_grid(W, kind.bits, kind.sub, True, imp)
    d, sc = two_level_grid(ideal.view(rows, cols // QK_K, subs), kind)
    sc = refine_sub_scales(W.view(rows, cols // QK_K, subs, kind.sub), d, sc, kind, imp)
    scales = (d * sc).reshape(rows, -1)
    if not bool((scales.half().float() == scales).all()):
        raise AssertionError("k-quant scales left float16")    # two_level_grid guarantees it
    return scales, torch.full_like(scales, 2 ** (kind.bits - 1))


def grid_rule_fit(name: str):
    kind = KQUANTS[name]

    def fit(W, bits, group_size, symmetric, importance=None):
        return fit_kquant(kind, W, importance)

    fit.__name__ = f"fit_{name}"
    return fit


# the grid rules' fits, by name: registration names them as pocketlm.lazy("pocketlm_gguf.kquants:fit_q4_k")
fit_q2_k = grid_rule_fit("q2_k")
fit_q3_k = grid_rule_fit("q3_k")
fit_q4_k = grid_rule_fit("q4_k")
fit_q5_k = grid_rule_fit("q5_k")
fit_q6_k = grid_rule_fit("q6_k")


# ----------------------------------------------------------- finding d back from a grid


def super_block_d(scales: np.ndarray, kind: KQuant) -> tuple[np.ndarray, np.ndarray] | None:
    """``(d, sc)`` with ``scales == d * sc`` for each super-block of ``scales`` ``[n, subs]``
    (float32 holding float16 values), ``d`` float16 and ``sc`` integers in ``[1, sc_max]``; None
    where some super-block has no such ``d``."""
    top = scales.max(axis=1, keepdims=True)
    found = np.zeros(scales.shape[0], dtype=bool)
    d_out = np.zeros((scales.shape[0], 1), dtype=np.float32)
    for k in range(kind.sc_max, 0, -1):          # largest top scale index first: the finest d
        d = (top / np.float32(k)).astype(np.float32)
        sc = scales / d
        ok = (d.astype(np.float16).astype(np.float32) == d)[:, 0]
        ok &= (np.float32(2 ** (kind.bits - 1)) * d).astype(np.float16).astype(np.float32)[:, 0] == np.float32(2 ** (kind.bits - 1)) * d[:, 0]
        ok &= np.all((sc == np.round(sc)) & (sc >= 1) & (sc <= kind.sc_max), axis=1)
        ok &= np.all(d * np.round(sc).astype(np.float32) == scales, axis=1)
        new = ok & ~found
        d_out[new] = d[new]
        found |= ok
        if found.all():
            break
    if not found.all():
        return None
    return d_out, np.round(scales / d_out).astype(np.int64)


# ------------------------------------------------------------------------- packing


def _f16(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.astype("<f2")).view(np.uint8).reshape(x.shape[0], 2)


def _two_bit_planes(q: np.ndarray) -> np.ndarray:
    """``[n, 256]`` 2-bit values to ``[n, 64]`` bytes: value ``h*128 + j*32 + l`` in bits ``2j`` of byte ``h*32 + l``."""
    q = q.reshape(-1, 2, 4, 32).astype(np.uint8)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _bit_planes(bit: np.ndarray) -> np.ndarray:
    """``[n, 256]`` bits to ``[n, 32]`` bytes: value ``i*32 + l`` in bit ``i`` of byte ``l``."""
    bit = bit.reshape(-1, 8, 32).astype(np.uint8)
    out = np.zeros((bit.shape[0], 32), dtype=np.uint8)
    for i in range(8):
        out |= bit[:, i] << np.uint8(i)
    return out


def _nibble_pairs(q: np.ndarray) -> np.ndarray:
    """``[n, 256]`` 4-bit values to ``[n, 128]`` bytes: value ``c*64 + s*32 + l`` in nibble ``s`` of byte ``c*32 + l``."""
    q = q.reshape(-1, 4, 2, 32).astype(np.uint8)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)


def _scales_6bit_pairs(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins to Q4_K/Q5_K's 12 bytes (``get_scale_min`` in reverse)."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    low = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    mid = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    high = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    return np.concatenate([low, mid, high], axis=1)


def _scales_q3(sc: np.ndarray) -> np.ndarray:
    """Sixteen 6-bit values to Q3_K's 12 bytes: low nibbles of 0-7 and 8-15 in bytes 0-7, the
    top 2 bits of value ``s*4 + b`` in bits ``2s`` of byte ``8 + b``."""
    sc = sc.astype(np.uint8)
    low = (sc[:, :8] & 0x0F) | ((sc[:, 8:] & 0x0F) << 4)
    top = (sc >> 4).reshape(-1, 4, 4)
    high = top[:, 0] | (top[:, 1] << 2) | (top[:, 2] << 4) | (top[:, 3] << 6)
    return np.concatenate([low, high], axis=1)


def pack_kquant(kind: KQuant, q: np.ndarray, d: np.ndarray, sc: np.ndarray) -> np.ndarray:
    """Blocks of one k-quant type: ``q`` ``[n, 256]`` grid values in ``[0, 2**bits)`` (zero point
    ``2**(bits-1)``), ``d`` ``[n, 1]`` float16 values, ``sc`` ``[n, subs]`` integer scales.
    Returns ``[n, bytes per block]`` uint8."""
    q = q.astype(np.int64)
    if kind.name == "q2_k":
        scales = (sc | (sc << 4)).astype(np.uint8)                 # m_j = sc_j, dmin = 2 d
        return np.concatenate([scales, _two_bit_planes(q), _f16(d), _f16(2 * d)], axis=1)
    if kind.name == "q3_k":
        hmask = _bit_planes(q >> 2)
        return np.concatenate([hmask, _two_bit_planes(q & 3), _scales_q3(sc + 32), _f16(d)], axis=1)
    if kind.name == "q4_k":
        return np.concatenate([_f16(d), _f16(8 * d), _scales_6bit_pairs(sc, sc), _nibble_pairs(q)], axis=1)
    if kind.name == "q5_k":
        return np.concatenate([_f16(d), _f16(16 * d), _scales_6bit_pairs(sc, sc), _bit_planes(q >> 4),
                               _nibble_pairs(q & 15)], axis=1)
    if kind.name == "q6_k":
        low = (q & 15).reshape(-1, 2, 2, 64)
        ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128).astype(np.uint8)
        qh = _two_bit_planes(q >> 4)
        return np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), _f16(d)], axis=1)
    raise ValueError(f"unknown k-quant {kind.name}")


def encode_grid(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, kind: KQuant) -> np.ndarray | str:
    """The ``kind`` blocks of a grid given per sub-block (``q`` ``[rows, cols]``, ``scales``/``zeros``
    ``[rows, cols / sub]``), ``[rows, cols / 256 * bytes]`` uint8, or why it has none."""
    rows, cols = q.shape
    if cols % QK_K:
        return f"input width {cols} is not a multiple of {QK_K}"
    if not bool((zeros == 2 ** (kind.bits - 1)).all()):
        return "the grid is not symmetric"
    subs = QK_K // kind.sub
    found = super_block_d(scales.float().numpy().reshape(-1, subs), kind)
    if found is None:
        return f"its scales are not on {kind.name.upper()}'s two-level grid (one float16 d per 256 weights)"
    d, sc = found
    blocks = pack_kquant(kind, q.numpy().reshape(-1, QK_K), d, sc)
    return blocks.reshape(rows, -1)
