"""The shared weight formats: packing, quantized modules, masks and checkpoints."""

import pytest
import torch

from pocketlm import weights as W
from pocketlm.checkpoint import load_checkpoint, save_checkpoint
from pocketlm.testing.models import tiny_model, tiny_windows


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("cols", [64, 70])
def test_pack_round_trips_exactly(bits, cols):
    q = torch.randint(0, 2**bits, (64, cols))
    packed = W.pack(q, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (64, -(-cols // 32) * bits)
    assert torch.equal(W.unpack(packed, bits, cols).long(), q)


def test_four_bit_packing_is_the_gptq_word_layout():
    q = torch.arange(8).unsqueeze(0)  # values 0..7 in one word, value i at bits 4i
    word = W.pack(torch.cat([q, torch.zeros(1, 24, dtype=torch.long)], 1), 4)[0, 0].item()
    assert word == sum(i << (4 * i) for i in range(8)) - 2**32 * (sum(i << (4 * i) for i in range(8)) >= 2**31)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [-1, 16])
def test_quantized_linear_dequantizes_its_grid(symmetric, group_size):
    torch.manual_seed(0)
    weight = torch.randn(64, 64)
    groups = weight.reshape(64, -1, 64 if group_size == -1 else group_size)
    scale, zero = W.minmax_grid(groups.reshape(-1, groups.shape[-1]), 4, symmetric)
    q = W.quantize(groups.reshape(-1, groups.shape[-1]), scale, zero, 4).reshape(64, 64)
    module = W.QuantizedLinear.from_grid(q, scale.reshape(64, -1), zero.reshape(64, -1), bits=4,
                                         group_size=group_size, symmetric=symmetric)
    expected = ((q.reshape(groups.shape) - zero.reshape(64, -1, 1)) * scale.reshape(64, -1, 1)).reshape(64, 64)
    assert torch.equal(module.dequantize(), expected)
    error = (module.dequantize() - weight).abs().max() / weight.abs().max()
    assert error < 0.15  # 4-bit: at most about half a step of 1/15 of the range
    x = torch.randn(3, 64)
    assert torch.allclose(module(x), x @ expected.t(), atol=1e-5)


def test_masks_only_grow_and_zero_weights():
    linear = torch.nn.Linear(8, 4)
    first = torch.rand(4, 8) > 0.3
    W.set_mask(linear, first)
    second = torch.rand(4, 8) > 0.3
    W.set_mask(linear, second)
    assert torch.equal(W.get_mask(linear), first & second)
    assert torch.all(linear.weight[~(first & second)] == 0)
    assert "weight_mask" not in linear.state_dict()


def test_conv1d_adapter_sees_out_by_in():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(6, 4)  # nf=6 outputs, nx=4 inputs, weight stored [4, 6]
    assert W.linear_shape(conv) == (6, 4)
    x = torch.randn(2, 4)
    assert torch.allclose(conv(x), x @ W.linear_weight(conv).t() + conv.bias)


def test_checkpoint_round_trip_keeps_grids_masks_and_tied_embeddings(tmp_path):
    model = tiny_model("llama")
    model.config.tie_word_embeddings = True
    embed = model.model.embed_tokens.weight.data
    scale, zero = W.minmax_grid(embed, 8, True)
    qemb = W.QuantizedEmbedding.from_grid(W.quantize(embed, scale, zero, 8), scale, zero, bits=8,
                                          group_size=-1, symmetric=True)
    model.model.embed_tokens = qemb
    model.lm_head = qemb.tied_head()
    W.set_mask(model.model.layers[0].mlp.up_proj, torch.rand(128, 64) > 0.5)
    windows = tiny_windows(2, 16)
    expected = model(windows).logits
    save_checkpoint(model, None, tmp_path)
    loaded = load_checkpoint(tmp_path).model
    assert loaded.lm_head.storage is loaded.model.embed_tokens.storage
    assert torch.equal(loaded(windows).logits, expected)
    assert torch.equal(W.get_mask(loaded.model.layers[0].mlp.up_proj), W.get_mask(model.model.layers[0].mlp.up_proj))


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    from pocketlm.errors import PocketError

    save_checkpoint(tiny_model("llama"), None, tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(PocketError, match="cannot be loaded"):
        load_checkpoint(tmp_path)
