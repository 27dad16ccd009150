"""backend = "llmcompressor": the clear errors always; the real run only with POCKETLM_PEER_TESTS=1
(it starts llm-compressor in the environment POCKETLM_LLMCOMPRESSOR_PYTHON names, about a minute)."""

from __future__ import annotations

import copy
import os

import pytest
import torch

import pocketlm
from pocketlm.testing.models import tiny_model
from pocketlm.weights import QuantizedLinear, is_linear, linear_weight, set_mask
from pocketlm_gptq.gptq import GPTQOptions, compress_gptq
from pocketlm_gptq.rtn import RTNOptions, compress_rtn

from conftest import capture_linear_inputs, reconstruction_error


def test_missing_peer_is_a_clear_error(monkeypatch, context):
    monkeypatch.delenv("POCKETLM_LLMCOMPRESSOR_PYTHON", raising=False)
    with pytest.raises(pocketlm.PocketError) as error:
        compress_gptq(tiny_model("llama"), GPTQOptions(backend="llmcompressor"), context)
    assert error.value.field == "backend"
    assert "named by $POCKETLM_LLMCOMPRESSOR_PYTHON, which is not set" in error.value.message
    assert "pip install llmcompressor==0.14.*" in error.value.fix
    assert "POCKETLM_LLMCOMPRESSOR_PYTHON=VENV/bin/python" in error.value.fix
    monkeypatch.setenv("POCKETLM_LLMCOMPRESSOR_PYTHON", "/nonexistent/bin/python")
    with pytest.raises(pocketlm.PocketError, match="/nonexistent/bin/python .* does not exist"):
        compress_gptq(tiny_model("llama"), GPTQOptions(backend="llmcompressor"), context)


def test_masks_and_conv1d_are_refused_before_running_the_peer(context):
    model = tiny_model("llama")
    layer = model.model.layers[0].mlp.up_proj
    set_mask(layer, torch.rand(linear_weight(layer).shape) > 0.5)
    with pytest.raises(pocketlm.PocketError, match="masks"):
        compress_gptq(model, GPTQOptions(backend="llmcompressor"), context)
    with pytest.raises(pocketlm.PocketError, match="Conv1D"):
        compress_gptq(tiny_model("gpt2"), GPTQOptions(backend="llmcompressor"), context)


@pytest.mark.skipif(os.environ.get("POCKETLM_PEER_TESTS") != "1",
                    reason="set POCKETLM_PEER_TESTS=1 (and POCKETLM_LLMCOMPRESSOR_PYTHON) to run the peer")
def test_llmcompressor_backend_loads_back_real_grids(windows, context):
    original = tiny_model("llama", outliers=True)
    inputs = capture_linear_inputs(original, windows)
    peer = compress_gptq(copy.deepcopy(original), GPTQOptions(bits=4, group_size=32, backend="llmcompressor"), context)
    rtn = compress_rtn(copy.deepcopy(original), RTNOptions(bits=4, group_size=32), context)
    quantized = [m for n, m in peer.named_modules() if isinstance(m, QuantizedLinear)]
    assert len(quantized) == sum(1 for n, m in original.named_modules() if is_linear(m) and n != "lm_head")
    assert reconstruction_error(original, peer, inputs) < 0.9 * reconstruction_error(original, rtn, inputs)
