"""The layer-wise calibration service on every built-in family."""

import pytest
import torch

from pocketlm.calibration import capture_inputs
from pocketlm.modules import decoder_layers, get_module
from pocketlm.testing import make_context
from pocketlm.testing.models import ARCHITECTURES, tiny_model, tiny_windows
from pocketlm.weights import QuantizedLinear


class Recorder:
    """Records what the walker shows, in order, and rounds each group to 8 bits so we can
    check that later groups see the changed earlier ones."""

    def __init__(self):
        self.events, self.inputs = [], {}

    def select(self, index, layer, names):
        return list(names)

    def observe(self, name, module, args, kwargs, output):
        self.inputs.setdefault((self.index, name), []).append(args[0].clone())

    def solve(self, index, layer, names):
        self.events.append((index, tuple(names)))
        for name in names:
            module = get_module(layer, name)
            with torch.no_grad():
                weight = module.weight if not hasattr(module, "nf") else module.weight
                weight.mul_(0.5)  # an observable change


@pytest.mark.parametrize("family", ARCHITECTURES)
def test_walk_visits_every_group_in_order_with_compressed_inputs(family):
    model = tiny_model(family)
    context = make_context(tiny_windows(6, 24))
    architecture = context.architecture(model)
    recorder = Recorder()
    original = recorder.solve

    def solve(index, layer, names):
        original(index, layer, names)

    recorder.solve = solve
    recorder.index = 0

    def select(index, layer, names):
        recorder.index = index
        return list(names)

    recorder.select = select
    context.walk(model, recorder)
    layers = len(decoder_layers(model, architecture))
    assert recorder.events == [(i, g) for i in range(layers) for g in architecture.sequential]
    # every observed input covers every calibration token (OPT flattens to [tokens, in])
    for (index, name), batches in recorder.inputs.items():
        assert sum(b.numel() // b.shape[-1] for b in batches) == 6 * 24


def test_walk_feeds_each_layer_the_outputs_of_the_compressed_layer_before():
    model = tiny_model("llama")
    windows = tiny_windows(4, 16)
    context = make_context(windows)
    architecture = context.architecture(model)
    seen = {}

    class Halve:
        def select(self, index, layer, names):
            return [""] if names == architecture.sequential[0] else []

        def observe(self, name, module, args, kwargs, output):
            seen.setdefault(self.index, []).append(args[0].clone())

        def solve(self, index, layer, names):
            with torch.no_grad():
                layer.mlp.down_proj.weight.mul_(0.0)

    handler = Halve()
    original_select = handler.select

    def select(index, layer, names):
        handler.index = index
        return original_select(index, layer, names)

    handler.select = select
    context.walk(model, handler)
    # after the walk layer 0's MLP writes nothing, so layer 1's input is what the changed layer 0 gives
    inputs = capture_inputs(model, architecture, windows, batch_size=8)
    expected = inputs.run(decoder_layers(model, architecture)[0])
    assert torch.allclose(torch.cat(seen[1]), torch.cat(expected), atol=1e-5)


def test_non_sequential_walk_observes_all_linears_in_one_pass():
    model = tiny_model("qwen2")
    context = make_context(tiny_windows(4, 16))
    calls = []

    class All:
        def select(self, index, layer, names):
            return list(names)

        def observe(self, name, module, args, kwargs, output):
            pass

        def solve(self, index, layer, names):
            calls.append(len(names))

    context.walk(model, All(), sequential=False)
    assert calls == [7, 7]


def test_unknown_architecture_names_the_hook():
    from pocketlm.errors import PocketError

    model = tiny_model("llama")
    model.config.model_type = "brand-new"
    with pytest.raises(PocketError, match="register_architectures"):
        make_context().architecture(model)
