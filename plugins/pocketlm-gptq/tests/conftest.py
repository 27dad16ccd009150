from __future__ import annotations

import copy

import pytest
import torch

from pocketlm.testing import make_context
from pocketlm.testing.models import tiny_model, tiny_windows
from pocketlm.weights import is_linear, linear_weight


@pytest.fixture(scope="session")
def windows():
    return tiny_windows(8, 32)


@pytest.fixture(scope="session")
def context(windows):
    return make_context(windows)


def capture_linear_inputs(model, windows):
    """Each linear's inputs on ``windows`` (the original model's activations)."""
    inputs, handles = {}, []
    for name, module in model.named_modules():
        if is_linear(module) and "lm_head" not in name:
            handles.append(module.register_forward_hook(
                lambda m, args, out, name=name: inputs.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]))))
    with torch.no_grad():
        model(input_ids=windows)
    for h in handles:
        h.remove()
    return {k: torch.cat(v) for k, v in inputs.items()}


def reconstruction_error(original, quantized, inputs) -> float:
    """Sum over linears of ||W X - Q X|| / ||W X|| on the original model's inputs."""
    modules = dict(quantized.named_modules())
    total = 0.0
    for name, module in original.named_modules():
        if name in inputs:
            X = inputs[name]
            W, Q = linear_weight(module), linear_weight(modules[name])
            total += ((W - Q) @ X.t()).norm().item() / (W @ X.t()).norm().item()
    return total


@pytest.fixture
def fresh():
    def make(family="llama", **kwargs):
        return tiny_model(family, **kwargs)
    return make


def copy_model(model):
    return copy.deepcopy(model)
