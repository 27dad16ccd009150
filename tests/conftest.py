"""Shared fixtures for the core tests: toy methods (test-only, not shipped), tiny model folders."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest
import torch

import pocketlm
from pocketlm import Method, Options, SizeEffect, hookimpl
from pocketlm.modules import get_module, select_linears, set_module
from pocketlm.weights import QuantizedLinear, linear_bias, linear_weight, minmax_grid, quantize, set_mask

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)


class ToyRoundOptions(Options):
    bits: int = 8


class _ToyRoundHandler:
    """Round each linear to a per-row grid once the walker has shown it its inputs."""

    layers_independent = True   # each layer is rounded on its own: a streamed stage may resume mid-walk

    def __init__(self, options):
        self.options, self.rows_seen = options, {}

    def select(self, index, layer, names):
        return list(names)

    def observe(self, name, module, args, kwargs, output):
        self.rows_seen[name] = self.rows_seen.get(name, 0) + args[0].shape[0]

    def solve(self, index, layer, names):
        if os.environ.get("POCKETLM_TEST_SLOW_LAYER") == str(index):
            import time

            time.sleep(60)  # lets a test kill the run in the middle of a streamed stage
        for name in names:
            module = get_module(layer, name)
            weight = linear_weight(module)
            scale, zero = minmax_grid(weight, self.options.bits, True)
            grid = quantize(weight, scale, zero, self.options.bits)
            set_module(layer, name, QuantizedLinear.from_grid(grid, scale, zero, bits=self.options.bits, group_size=-1,
                                                              symmetric=True, bias=linear_bias(module)))


def toy_round(model, options, context):
    if os.environ.get("POCKETLM_TEST_SLOW_STAGE") == "toy-round":
        import time

        time.sleep(60)  # lets a test kill the run in the middle of this stage
    context.walk(model, _ToyRoundHandler(options))
    return model


class ToyMaskOptions(Options):
    sparsity: float = 0.5


def toy_mask(model, options, context):
    for name, module in select_linears(model, ["*"], ["lm_head"]).items():
        weight = linear_weight(module)
        threshold = weight.abs().flatten().kthvalue(max(1, int(weight.numel() * options.sparsity))).values
        set_mask(module, weight.abs() > threshold)
    return model


def make_toy_plugin(name="toy"):
    module = types.ModuleType(name)
    module.POCKETLM_API = ">=1.0,<2"

    @hookimpl
    def register_methods(register):
        register(Method("toy-mask", "prune", ToyMaskOptions, toy_mask, "test-only magnitude mask",
                        effect=lambda o: SizeEffect(sparsity=o.sparsity, features=frozenset({"masked"})),
                        phase=pocketlm.PHASE_SPARSIFY, not_after=frozenset({"quantize"}),
                        plan=lambda budget: [{"sparsity": 0.5}]))
        register(Method("toy-round", "quantize", ToyRoundOptions, toy_round, "test-only per-row rounding",
                        needs_calibration=True, exclusive=True, phase=pocketlm.PHASE_QUANTIZE,
                        effect=lambda o: SizeEffect(bits=o.bits, features=frozenset({"quantized"})),
                        plan=lambda budget: [{"bits": 8}, {"bits": 4}]))

    module.register_methods = register_methods
    return module


@pytest.fixture
def toy_plugins():
    from pocketlm.plugins import Plugins

    return Plugins(entry_points=False, extra=[("toy", make_toy_plugin())])


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    from pocketlm.testing.models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", "llama")


TOY_PLUGIN_SOURCE = Path(__file__).with_name("conftest.py")
sys.modules.setdefault("pocketlm_core_tests_conftest", sys.modules[__name__])

RECIPE_FOR_KILL = os.environ.get("POCKETLM_TEST_RECIPE", "")
