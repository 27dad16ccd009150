"""The layer-wise calibration service on every built-in family."""

import pytest
import torch

from pocketlm.calibration import LayerHandler, batch_rows, capture_inputs, module_input, promise
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



class Halver:
    """Halves every selected linear and records what each linear was fed. With
    ``changes_only_selected`` the walker may replay the layer's last pass instead of running the
    layer again; ``also_touch = (other, trigger)`` makes it break that promise."""

    def __init__(self, changes_only_selected, also_touch=None):
        self.changes_only_selected = changes_only_selected
        self.also_touch = also_touch
        self.fed, self.index = {}, 0

    def select(self, index, layer, names):
        self.index = index
        return list(names)

    def observe(self, name, module, args, kwargs, output):
        self.fed.setdefault((self.index, name), []).append(args[0].clone())

    def solve(self, index, layer, names):
        with torch.no_grad():
            for name in names:
                get_module(layer, name).weight.mul_(0.5)
            if self.also_touch and names == [self.also_touch[1]]:
                get_module(layer, self.also_touch[0]).weight.mul_(0.5)


class InputsOnly(Halver):
    """A Halver that declares ``observes_outputs = False`` (its ``observe`` reads only inputs)."""

    observes_outputs = False


def _walk(family, handler, runs, windows=6):
    """Walk a fresh tiny model with ``handler``; count how often decoder layers run."""
    model = tiny_model(family)
    context = make_context(tiny_windows(windows, 24))
    for layer in decoder_layers(model, context.architecture(model)):
        layer.register_forward_pre_hook(lambda *a: runs.append(1))
    context.walk(model, handler)
    return model


@pytest.mark.parametrize("family", ARCHITECTURES)
def test_replaying_the_last_pass_feeds_every_layer_what_running_it_would(family):
    plain_runs, replay_runs = [], []
    plain, replayed = Halver(False), Halver(True)
    _walk(family, plain, plain_runs)
    _walk(family, replayed, replay_runs)
    assert len(replay_runs) < len(plain_runs)          # the propagation runs were replaced
    assert plain.fed.keys() == replayed.fed.keys()
    for key in plain.fed:
        for a, b in zip(plain.fed[key], replayed.fed[key]):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("touch", [("mlp.up_proj", "mlp.down_proj"), ("self_attn.q_proj", "self_attn.o_proj")])
@pytest.mark.parametrize("inputs_only", [False, True])
def test_a_broken_promise_is_caught_on_the_first_layer_and_the_walker_runs_layers_instead(touch, inputs_only):
    """The handler claims to change only the module it solves but also changes another one in
    the same scope (the layer for down_proj, the attention block for o_proj): replaying would
    feed stale inputs. The check on layer 0 catches it (also when an inputs-only handler's
    replays put zeros in place of the old module after the first of 3 batches)."""
    honest, liar = Halver(False, also_touch=touch), (InputsOnly if inputs_only else Halver)(True, also_touch=touch)
    honest_runs, liar_runs = [], []
    _walk("llama", honest, honest_runs, windows=20)
    _walk("llama", liar, liar_runs, windows=20)
    assert liar.fed.keys() == honest.fed.keys()
    for key in honest.fed:
        for a, b in zip(honest.fed[key], liar.fed[key]):
            torch.testing.assert_close(b, a)


def _linear_calls(model, context):
    """Count the completed forward calls of each linear of every decoder layer (relative names)."""
    calls = {}
    architecture = context.architecture(model)
    for layer in decoder_layers(model, architecture):
        for group in architecture.sequential:
            for name in group:
                get_module(layer, name).register_forward_hook(
                    lambda *a, _name=name: calls.__setitem__(_name, calls.get(_name, 0) + 1))
    return calls


@pytest.mark.parametrize("family", ARCHITECTURES)
@pytest.mark.parametrize("sequential", [True, False])
def test_an_inputs_only_handler_sees_the_same_inputs_and_skips_running_what_it_observes(family, sequential):
    """Groups whose linears read one tensor (q/k/v, gate/up) are observed at the first one's input
    and none of them runs, once layer 0 has shown that they do read one tensor; a group whose
    members read different tensors (the single group of a non-sequential walk) runs as before."""
    results = {}
    for handler in (Halver(True), InputsOnly(True)):
        model = tiny_model(family)
        context = make_context(tiny_windows(20, 24))   # 3 batches: replays use zeros after the first
        calls = _linear_calls(model, context)
        context.walk(model, handler, sequential=sequential)
        results[type(handler).__name__] = (handler.fed, calls, model)
    (plain, plain_calls, plain_model), (lean, lean_calls, lean_model) = results["Halver"], results["InputsOnly"]
    assert plain.keys() == lean.keys()
    for key in plain:
        assert len(plain[key]) == len(lean[key])
        for a, b in zip(plain[key], lean[key]):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert sum(lean_calls.values()) < sum(plain_calls.values())
    for a, b in zip(plain_model.parameters(), lean_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ the handler contract


class _Outputs(LayerHandler):
    """Records whether ``observe`` got each module's output; its flags come from the base."""

    def __init__(self):
        self.outputs = []

    def select(self, index, layer, names):
        return list(names)

    def observe(self, name, module, args, kwargs, output):
        self.outputs.append(output)

    def solve(self, index, layer, names):
        pass


class _DuckOutputs:
    """The same without the base class, and without any flag: the defaults apply."""

    select, observe, solve = _Outputs.select, _Outputs.observe, _Outputs.solve

    def __init__(self):
        self.outputs = []


class _InputsOnlyWhen(_Outputs):
    """A flag that depends on the options, as a property."""

    def __init__(self, reads_outputs):
        super().__init__()
        self.reads_outputs = reads_outputs

    @property
    def observes_outputs(self):
        return self.reads_outputs


def test_handler_flags_default_to_the_base_for_subclasses_and_duck_typed_handlers():
    assert (LayerHandler.changes_only_selected, LayerHandler.observes_outputs, LayerHandler.layers_independent) \
        == (False, True, False)
    for handler in (_Outputs(), _DuckOutputs()):
        assert promise(handler, "observes_outputs") and not promise(handler, "changes_only_selected")
        assert not promise(handler, "layers_independent")
        _walk("llama", handler, [])
        assert handler.outputs and all(torch.is_tensor(o) for o in handler.outputs)
    assert promise(InputsOnly(False), "observes_outputs") is False   # a plain class attribute


@pytest.mark.parametrize("reads_outputs", [True, False])
def test_a_flag_given_as_a_property_is_read_on_the_instance(reads_outputs):
    handler = _InputsOnlyWhen(reads_outputs)
    assert promise(handler, "observes_outputs") is reads_outputs
    _walk("llama", handler, [])
    assert handler.outputs
    assert all((o is not None) is reads_outputs for o in handler.outputs)


def test_the_base_handler_methods_must_be_overridden():
    with pytest.raises(NotImplementedError):
        LayerHandler().select(0, torch.nn.Identity(), ("q",))


def test_module_input_takes_the_first_positional_argument_or_the_named_input():
    x, y = torch.ones(2), torch.zeros(2)
    assert module_input((x, y), {"input": y}) is x
    assert module_input((), {"input": x}) is x
    assert module_input((), {"attention_mask": y, "hidden_states": x}) is x
    assert module_input((), {"x": x}) is x
    with pytest.raises(TypeError, match="got attention_mask"):
        module_input((), {"attention_mask": y})


def test_module_input_is_what_a_linear_and_a_decoder_layer_read():
    model = tiny_model("llama")
    layer, seen = decoder_layers(model, make_context().architecture(model))[0], []
    hooks = [m.register_forward_pre_hook(lambda m, a, k: seen.append(module_input(a, k)), with_kwargs=True)
             for m in (layer, layer.self_attn.q_proj)]
    hidden = torch.randn(1, 5, model.config.hidden_size)
    position = torch.arange(5)[None]
    layer(hidden_states=hidden, position_embeddings=model.model.rotary_emb(hidden, position))
    for hook in hooks:
        hook.remove()
    assert seen[0] is hidden and seen[1].shape == hidden.shape   # the layer, then q_proj on the normed input


def test_batch_rows_cuts_what_has_the_batch_and_passes_the_rest():
    batch = 4
    hidden = torch.arange(4 * 3 * 2.0).reshape(4, 3, 2)
    rotary = torch.ones(1, 3, 2)                   # batch 1: broadcast to every sequence
    positions = torch.arange(4)                    # 1-D, as long as the batch by chance: not per sequence
    call = ((hidden,), {"mask": torch.zeros(4, 1, 3, 3), "rotary": (rotary, rotary), "positions": positions,
                        "flag": True, "cache": None})
    (args, kwargs) = batch_rows(call, slice(1, 3), batch)
    assert torch.equal(args[0], hidden[1:3])
    assert kwargs["mask"].shape == (2, 1, 3, 3)
    assert kwargs["rotary"][0] is rotary and kwargs["positions"] is positions
    assert kwargs["flag"] is True and kwargs["cache"] is None


class HeadInputs(LayerHandler):
    """Changes nothing; keeps what the walker hands over for the head (API 1.9)."""

    observes_head = True

    def __init__(self):
        self.hidden, self.solved = [], 0

    def select(self, index, layer, names):
        return []

    def observe_head(self, hidden):
        self.hidden.append(hidden.clone())

    def solve_head(self):
        self.solved += 1


@pytest.mark.parametrize("family", ARCHITECTURES)
def test_a_handler_that_observes_the_head_gets_what_the_head_reads_then_solves_once(family):
    model = tiny_model(family)
    windows = tiny_windows(6, 24)
    context = make_context(windows)
    head = get_module(model, context.architecture(model).lm_head)
    reads = []
    hook = head.register_forward_hook(lambda module, args, output: reads.append(args[0]))
    with torch.no_grad():
        model(input_ids=windows)
    hook.remove()
    handler = HeadInputs()
    context.walk(model, handler)
    assert handler.solved == 1
    assert torch.allclose(torch.cat(handler.hidden), reads[0], atol=1e-5)


def test_a_handler_without_the_head_flag_is_never_asked_about_the_head():
    assert LayerHandler.observes_head is False
    handler = _Outputs()      # a subclass that overrides neither observe_head nor solve_head (they raise)
    _walk("llama", handler, [])
    assert handler.outputs
