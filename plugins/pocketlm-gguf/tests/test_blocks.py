"""Block packing against gguf-py's own dequantizer, and the rotary permutation against
transformers' reverse permutation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import grid_of
from gguf import GGMLQuantizationType as Q
from gguf import quants

from pocketlm import weights as W
from pocketlm_gguf import blocks


def _linear(bits, group_size, symmetric, rows=12, cols=128, seed=0):
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    q, scales, zeros = grid_of(weight, bits, group_size, symmetric)
    return W.QuantizedLinear.from_grid(q, scales, zeros, bits=bits, group_size=group_size, symmetric=symmetric)


@pytest.mark.parametrize("bits,group_size,symmetric,qtype", [
    (4, 32, True, Q.Q4_0), (4, 64, True, Q.Q4_0), (4, -1, True, Q.Q4_0), (3, 32, True, Q.Q4_0),
    (2, 128, True, Q.Q4_0), (8, 32, True, Q.Q8_0), (8, -1, True, Q.Q8_0), (7, -1, True, Q.Q8_0),
    (7, 32, False, Q.Q8_0),  # 7-bit codes centred on any zero point stay within int8
])
def test_grids_with_a_block_format_are_bit_exact(bits, group_size, symmetric, qtype):
    module = _linear(bits, group_size, symmetric)
    packed = blocks.exact_blocks(module.storage)
    assert packed.qtype == qtype and packed.exact
    assert packed.data.dtype == np.uint8
    assert packed.data.shape == (12, 128 // 32 * {Q.Q4_0: 18, Q.Q8_0: 34}[qtype])
    # gguf-py's dequantizer (the ggml reference) reads back exactly the in-memory weights
    assert torch.equal(blocks.decode(packed, 128), module.dequantize())


@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 64), (3, 32)])
def test_asymmetric_grids_are_exact_up_to_fp16_min(bits, group_size):
    module = _linear(bits, group_size, False)
    packed = blocks.exact_blocks(module.storage)
    assert packed.qtype == Q.Q4_1 and packed.data.shape == (12, 4 * 20)
    back, ref = blocks.decode(packed, 128), module.dequantize()
    # the only rounding is m = fp16(-zero * scale): at most half an fp16 ulp of |zero * scale|
    storage = module.storage
    groups = storage.column_groups()
    bound = (storage.zeros.float() * storage.scales.float())[:, groups] * 2.0 ** -11
    assert ((back - ref).abs() <= bound + 1e-12).all()
    assert (back - ref).abs().max() > 0 or bound.max() == 0  # the bound is not vacuous: d is exact
    d = torch.from_numpy(packed.data.reshape(12, 4, 20)[:, :, :2].copy().view(np.float16).astype(np.float32))[..., 0]
    assert torch.equal(d, storage.scales.float()[:, groups[::32]])


def test_nibble_layout_matches_ggml():
    """byte j of block_q4_0.qs holds q[j] (low nibble) and q[j + 16] (high nibble)."""
    q = np.arange(32, dtype=np.uint8)[None] % 16
    packed = blocks.pack_q4_0(q, np.array([[1.0]], dtype=np.float32))
    assert packed.shape == (1, 18)
    assert packed[0, :2].view(np.float16)[0] == 1.0
    qs = packed[0, 2:]
    assert list(qs & 0xF) == list(q[0, :16]) and list(qs >> 4) == list(q[0, 16:])
    assert np.array_equal(quants.dequantize(packed, Q.Q4_0)[0], q[0].astype(np.float32) - 8)


def test_straddling_blocks_are_refused_with_a_reason():
    weight = torch.randn(4, 64)
    cols = 64
    order = torch.randperm(cols, generator=torch.Generator().manual_seed(0))
    g_idx = torch.empty(cols, dtype=torch.int32)
    g_idx[order] = W.group_index(cols, 32).to(torch.int32)
    q, scales, zeros = grid_of(weight, 4, 32, True)
    act_order = W.QuantizedLinear.from_grid(q, scales, zeros, bits=4, group_size=32, symmetric=True, g_idx=g_idx)
    assert "act-order" in blocks.exact_blocks(act_order.storage)
    q, scales, zeros = grid_of(weight, 4, 16, True)
    small = W.QuantizedLinear.from_grid(q, scales, zeros, bits=4, group_size=16, symmetric=True)
    assert "group size 16" in blocks.exact_blocks(small.storage)
    q, scales, zeros = grid_of(torch.randn(4, 48), 4, 16, True)
    narrow = W.QuantizedLinear.from_grid(q, scales, zeros, bits=4, group_size=16, symmetric=True)
    assert "multiple of 32" in blocks.exact_blocks(narrow.storage)
    assert blocks.closest_format(narrow.storage) == "f16"
    # a plain g_idx (groups in order) is no obstacle
    plain = W.QuantizedLinear.from_grid(*grid_of(weight, 4, 32, True), bits=4, group_size=32, symmetric=True,
                                        g_idx=W.group_index(64, 32).to(torch.int32))
    assert blocks.exact_blocks(plain.storage).qtype == Q.Q4_0


def test_rtn_encode_is_llama_cpp_reference():
    weight = torch.randn(8, 64)
    for fmt, qtype in (("q4_0", Q.Q4_0), ("q4_1", Q.Q4_1), ("q8_0", Q.Q8_0)):
        packed = blocks.encode(weight, fmt)
        assert packed.qtype == qtype
        assert np.array_equal(packed.data, quants.quantize(weight.numpy(), qtype))
        error = (blocks.decode(packed, 64) - weight).norm() / weight.norm()
        assert 0 < error < (0.02 if fmt == "q8_0" else 0.15)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (9, 3)])
def test_rope_permutation_is_undone_by_transformers(heads, kv_heads):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    head_dim = 16
    processor = LlamaTensorProcessor(config={"num_attention_heads": heads, "num_key_value_heads": kv_heads})
    for rows, n in ((heads * head_dim, heads), (kv_heads * head_dim, kv_heads)):
        weight = np.random.default_rng(0).standard_normal((rows, 8)).astype(np.float32)
        permuted = weight[blocks.rope_permutation(rows, n)]
        assert not np.array_equal(permuted, weight)
        restored = processor._reverse_permute_weights(permuted, heads, kv_heads if n == kv_heads else heads)
        assert np.array_equal(restored, weight)
