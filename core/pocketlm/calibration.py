"""The layer walker: calibrate a model one decoder layer at a time.

1. Capture what the first decoder layer receives (hidden states and keyword arguments such as
   the attention mask and rotary embeddings) for every calibration batch.
2. For each decoder layer, for each group of linears in execution order (``sequential``), hook
   the modules the method asks for, run the layer over the calibration batches (stopping each
   batch as soon as every hooked module has fired), let the method ``observe`` what flowed
   through and then ``solve`` (change the layer and free its statistics).
3. Produce the next layer's inputs from the changed layer, so each layer is calibrated on the
   outputs of the already-compressed layers before it. Usually that is one more run of the
   layer. When the last group is one module whose output is added straight into the layer's
   output (``down_proj``, ``fc2``, ``c_proj``) and the handler declares that ``solve`` changes
   only the modules it was given, the walker instead replays the last pass: new output = old
   output + module_new(x) - module_old(x), one matmul instead of a whole layer. Whether that
   identity holds is checked on the first layer against a real run, so an architecture where it
   does not (a norm after the MLP, say) silently falls back to running the layer.

Memory holds one layer's calibration activations (inputs and outputs) plus what the method keeps.
Layers are only touched through ``Architecture.layers``, one at a time. For a model streamed from
disk (:mod:`pocketlm.streaming`) that is where each layer is materialized before its turn and
written to the stage checkpoint and freed after it; a handler that declares
``layers_independent = True`` (what it solves for one layer needs nothing it saw in another) lets
a killed stage resume at the layer where it stopped.

A handler subclasses :class:`LayerHandler` (or is any object with its three methods):
``select(index, layer, names) -> names``, ``observe(name, module, args, kwargs, output)`` and
``solve(index, layer, names)``, and states its promises in the class flags
``changes_only_selected``, ``observes_outputs`` and ``layers_independent``.
:func:`module_input` gives ``observe`` the tensor a module read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from . import streaming
from .components import Architecture
from .devices import module_device, to_device
from .modules import decoder_layers, get_module


class LayerHandler:
    """The base of a layer-walker handler: what the walker calls, and the promises a handler may
    make to save time. Subclass it and override the three methods; set a flag as a class
    attribute (or a property, when it depends on the options) to make a promise.

    The walker also takes an object that does not subclass this one but has the three methods:
    a flag it lacks reads as the default here."""

    changes_only_selected: bool = False
    """``solve`` changes nothing but the modules named in ``names`` (a Hessian solve or a pruner
    does; a method that folds scales into neighbouring modules does not). The walker may then
    replay the layer's last pass instead of running the layer again (API 1.1)."""

    observes_outputs: bool = True
    """False: ``observe`` reads only the inputs and may be called with ``output=None``. The walker
    may then stop each batch before the selected modules run, and when a group's modules all read
    one tensor (q/k/v, gate/up) it observes them all at the first one's input without computing
    any of them (API 1.2)."""

    layers_independent: bool = False
    """What ``solve`` does for one layer needs nothing observed in another: a killed stage on a
    model streamed from disk resumes at the layer where it stopped (API 1.3)."""

    observes_head: bool = False
    """After the last layer the walker calls ``observe_head(hidden)`` once per calibration batch
    with what the output head reads (the final norm's output; the last layer's output in a family
    without one), then ``solve_head()``: a quantizer sees the head's inputs as it sees a layer's
    (API 1.9)."""

    def select(self, index: int, layer: nn.Module, names: tuple[str, ...]) -> list[str]:
        """Which submodules of decoder layer ``index`` to observe, given the candidate linears
        ``names`` of the current group (relative names). Return any relative names, including
        non-linear modules such as ``"self_attn"``, or ``""`` for the whole layer; return an
        empty list to skip the group."""
        raise NotImplementedError

    def observe(self, name: str, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Called once per calibration batch for each selected module, with what it was called
        with and what it returned (None when ``observes_outputs`` is False). :func:`module_input`
        gives the tensor the module read."""
        raise NotImplementedError

    def solve(self, index: int, layer: nn.Module, names: list[str]) -> None:
        """Change the selected modules using what was observed, then free the statistics."""
        raise NotImplementedError

    def observe_head(self, hidden: torch.Tensor) -> None:
        """With ``observes_head``: one calibration batch of the head's inputs ``[batch, seq, width]``,
        on the device the layers ran on."""
        raise NotImplementedError

    def solve_head(self) -> None:
        """With ``observes_head``: change the head using what ``observe_head`` saw, then free it."""
        raise NotImplementedError


def promise(handler: Any, flag: str) -> bool:
    """The value of one of :class:`LayerHandler`'s flags on ``handler``; a handler that does not
    subclass it and lacks the flag gets the base's default."""
    return bool(getattr(handler, flag, getattr(LayerHandler, flag)))


#: The keyword a module's first input goes by when it is passed by name: ``nn.Linear`` and most
#: modules call it ``input``, transformers' decoder layers ``hidden_states``, some modules ``x``.
INPUT_KEYWORDS = ("input", "hidden_states", "x")


def module_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The tensor a module was called with: its first positional argument, or the first of
    :data:`INPUT_KEYWORDS` passed by name (what a forward hook or ``observe`` receives)."""
    if args:
        return args[0]
    for keyword in INPUT_KEYWORDS:
        if keyword in kwargs:
            return kwargs[keyword]
    raise TypeError(f"the module was called without a positional input or one of the keywords "
                    f"{', '.join(INPUT_KEYWORDS)} (it got {', '.join(kwargs) or 'nothing'})")


def batch_rows(value: Any, rows: slice, batch: int) -> Any:
    """``value`` (the positional or keyword arguments of a call over ``batch`` sequences, nested in
    tuples, lists and dicts) cut to the sequences ``rows``: every tensor of two or more dimensions
    whose first dimension is ``batch`` is sliced; the rest (rotary tables of batch 1, 1-D
    positions, flags) passes through as it is."""
    if torch.is_tensor(value):
        return value[rows] if value.dim() >= 2 and value.shape[0] == batch else value
    if isinstance(value, tuple):
        return tuple(batch_rows(v, rows, batch) for v in value)
    if isinstance(value, list):
        return [batch_rows(v, rows, batch) for v in value]
    if isinstance(value, dict):
        return {k: batch_rows(v, rows, batch) for k, v in value.items()}
    return value


@dataclass
class LayerInputs:
    """What a decoder layer receives, one entry per calibration batch. The tensors wait where
    they are (the CPU when the walker was given a device) and go to ``device`` one batch at a
    time."""

    hidden: list[torch.Tensor]
    kwargs: list[dict]
    device: torch.device | None = None     # where the layer runs; None: where the tensors are

    def batch(self, number: int) -> tuple[torch.Tensor, dict]:
        """Batch ``number``'s hidden states and keyword arguments, on the layer's device."""
        return to_device(self.hidden[number], self.device), to_device(self.kwargs[number], self.device)

    def batches(self):
        return (self.batch(number) for number in range(len(self.hidden)))

    def home(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` moved back to where the inputs wait between layers."""
        return hidden if self.device is None else hidden.to(self.hidden[0].device)

    def run(self, layer: nn.Module) -> list[torch.Tensor]:
        """The layer's output hidden states for every batch (where the inputs wait)."""
        with torch.no_grad():
            return [self.home(_hidden(layer(h, **kw))) for h, kw in self.batches()]


class _Stop(Exception):
    """Raised from a hook to end a forward pass early once it has what it needs."""


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def capture_inputs(model: nn.Module, architecture: Architecture, windows: torch.Tensor,
                   batch_size: int = 8, device: torch.device | None = None) -> LayerInputs:
    """Run the model up to its first decoder layer for every batch of ``windows`` and keep what
    that layer receives. With ``device``, what is kept waits on the CPU and the layers will run
    on ``device``."""
    first = decoder_layers(model, architecture)[0]
    captured = LayerInputs([], [], device)
    keep = None if device is None else torch.device("cpu")

    def grab(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.hidden.append(to_device(hidden.detach(), keep))
        captured.kwargs.append(to_device(kwargs, keep))
        raise _Stop

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            device = module_device(model)
            for start in range(0, windows.shape[0], batch_size):
                try:
                    model(input_ids=windows[start:start + batch_size].to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return captured


@dataclass
class Replay:
    """What one pass saw of a module ``name`` and of the ``scope`` that contains it (the whole
    layer, ``""``, or a submodule such as ``"self_attn"``), per batch: the scope's output, the
    module's positional inputs and its output. If the module's output is added straight into the
    scope's output, that is enough to recompute the scope's output after the module alone
    changed: old scope output + module_new(x) - module_old(x)."""

    name: str
    scope: str
    scope_outputs: list[Any]
    module_args: list[tuple]
    module_outputs: list[torch.Tensor]
    scope_call: tuple | None = None        # (args, kwargs) of the scope's first call, for the check

    def _hidden_after(self, module: nn.Module, batch: int) -> torch.Tensor:
        """The scope's hidden output for ``batch`` with ``module`` as it is now."""
        hidden, old = _hidden(self.scope_outputs[batch]), self.module_outputs[batch]
        with torch.no_grad():
            return hidden + (module(*self.module_args[batch]) - old).reshape(hidden.shape)

    def outputs(self, layer: nn.Module) -> list[Any]:
        module = get_module(layer, self.name)
        return [_with_hidden(out, self._hidden_after(module, batch)) for batch, out in enumerate(self.scope_outputs)]

    def matches(self, layer: nn.Module, real: torch.Tensor) -> bool:
        """Does the replayed first batch equal ``real``, the scope's true output after the change?"""
        if self.module_outputs[0].numel() != real.numel():
            return False
        replayed = self._hidden_after(get_module(layer, self.name), 0)
        scale = real.abs().max().clamp(min=1e-6)
        return bool(((real - replayed).abs().max() / scale) < 1e-4)


def _zeros_after_first_batch(module: nn.Module, batch: list[int]) -> nn.Module:
    """Patch ``module`` to run for real on batch 0 and return zeros of that output's width on
    later batches (when batch 0 gave a plain tensor of its input's rank). Returns the module."""
    width: list[int] = []

    def stand_in(*args, **kwargs):
        if batch[0] == 0 or not width:
            output = type(module).forward(module, *args, **kwargs)
            if batch[0] == 0 and args and isinstance(output, torch.Tensor) and output.dim() == args[0].dim():
                width.append(output.shape[-1])
            return output
        return args[0].new_zeros(*args[0].shape[:-1], width[0])

    module.forward = stand_in
    return module


def _with_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """``output`` (a tensor, or a tuple whose first item is one) with its hidden states replaced."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def observe_pass(layer: nn.Module, inputs: LayerInputs, names: list[str],
                 observe: Callable[[str, nn.Module, tuple, dict, Any], None], *,
                 record: str | None = None, substitutes: dict[str, list] | None = None,
                 inputs_only: bool = False, shared_input: bool = False) -> Replay | None:
    """Run ``layer`` over ``inputs`` with ``observe`` hooked on the submodules ``names``; each
    batch stops as soon as every hooked module has fired.

    * ``inputs_only``: ``observe`` gets ``output=None``. Without ``record`` the modules' inputs
      are hooked, so a batch stops before the last module runs; with ``shared_input`` too, the
      first module called stands for all of them (they read the same tensor) and none runs. With
      ``record`` the module runs only on the first batch (which feeds the replay's check); later
      batches get zeros in its place, since the replay adds the new module's output to the
      scope's output without the old one.

    * ``record`` (one name only): a scope, ``""`` for the whole layer or the name of a submodule
      holding the module; every batch runs to the end of that scope and the pass is returned as
      a :class:`Replay`.
    * ``substitutes``: submodule name -> its output per batch; those submodules are not run, their
      recorded outputs are returned instead (their inside has not changed since)."""
    fired: set[str] = set()
    replay = Replay(names[0], record, [], [], []) if record is not None else None
    batch = [0]

    def hook_for(name):
        def hook(module, args, kwargs, output):
            observe(name, module, args, kwargs, None if inputs_only else output)
            fired.add(name)
            if replay is not None:
                replay.module_args.append(args)
                replay.module_outputs.append(output)
            elif len(fired) == len(names):
                raise _Stop
        return hook

    def scope_pre(module, args, kwargs):
        if replay.scope_call is None:
            replay.scope_call = (args, kwargs)

    def scope_done(module, args, kwargs, output):
        replay.scope_outputs.append(output)
        raise _Stop

    def pre_hook_for(name):
        def pre_hook(module, args, kwargs):
            for other in (names if shared_input else [name]):
                observe(other, get_module(layer, other) if shared_input else module, args, kwargs, None)
                fired.add(other)
            if len(fired) == len(names):
                raise _Stop
        return pre_hook

    if inputs_only and record is None:
        handles = [get_module(layer, n).register_forward_pre_hook(pre_hook_for(n), with_kwargs=True) for n in names]
    else:
        handles = [get_module(layer, n).register_forward_hook(hook_for(n), with_kwargs=True) for n in names]
    if replay is not None and record:
        scope = get_module(layer, record)
        handles.append(scope.register_forward_pre_hook(scope_pre, with_kwargs=True))
        handles.append(scope.register_forward_hook(scope_done, with_kwargs=True))
    patched = []
    if inputs_only and replay is not None:
        patched.append(_zeros_after_first_batch(get_module(layer, names[0]), batch))
    for name, outputs in (substitutes or {}).items():
        module = get_module(layer, name)
        module.forward = lambda *a, _outputs=outputs, **k: _outputs[batch[0]]
        patched.append(module)
    try:
        with torch.no_grad():
            for number, (hidden, kwargs) in enumerate(inputs.batches()):
                fired.clear()
                batch[0] = number
                try:
                    output = layer(hidden, **kwargs)
                    if replay is not None and not record:
                        replay.scope_outputs.append(output)
                except _Stop:
                    pass
    finally:
        for handle in handles:
            handle.remove()
        for module in patched:
            del module.forward
    if replay is not None and not (len(replay.module_outputs) == len(replay.scope_outputs) == len(inputs.hidden)
                                   and all(isinstance(o, torch.Tensor) for o in replay.module_outputs)):
        return None   # the module did not run once per batch with a plain tensor output
    return replay


def _observe_inputs(layer: nn.Module, inputs: LayerInputs, names: list[str], observe: Callable,
                    substitutes: dict[str, list], shared: dict[tuple, bool]) -> None:
    """An inputs-only pass. The first time a layer class meets a group of several modules, the
    pass runs them and checks that they all read one tensor; after that, such a group is observed
    at its first module's input and none of its modules runs."""
    key = (type(layer).__name__, tuple(names))
    if len(names) == 1 or shared.get(key) is not None:
        observe_pass(layer, inputs, names, observe, substitutes=substitutes, inputs_only=True,
                     shared_input=len(names) == 1 or shared[key])
        return
    first: list = []                         # the inputs of the first batch's calls

    def recording(name, module, args, kwargs, output):
        if len(first) < len(names):
            first.append(args[0] if args else None)
        observe(name, module, args, kwargs, output)

    observe_pass(layer, inputs, names, recording, substitutes=substitutes, inputs_only=True)
    shared[key] = len(first) == len(names) and first[0] is not None and all(x is first[0] for x in first)


def _scope_of(name: str, later: list[str]) -> str | None:
    """The submodule holding ``name`` (``"self_attn"`` for ``"self_attn.o_proj"``) when no later
    group lives inside it, so its output can stand in for running it; else None."""
    if "." not in name:
        return None
    parent = name.rsplit(".", 1)[0]
    return None if any(n == parent or n.startswith(parent + ".") for n in later) else parent


def walk_layers(model: nn.Module, architecture: Architecture, windows: torch.Tensor,
                handler: LayerHandler, *, sequential: bool = True, batch_size: int = 8,
                progress: Callable[[int, int], None] | None = None,
                device: torch.device | None = None) -> None:
    """Calibrate ``model`` layer by layer with ``handler`` on token ``windows`` (``[n, seq]``).

    With ``sequential`` each group of ``architecture.sequential`` is observed and solved before
    the next group runs (true-sequential: o_proj sees the outputs of the already-quantized
    q/k/v). Without it, the handler sees all the layer's linears in one pass.

    With ``device``, each layer runs there: a layer that waits elsewhere (``offload = "cpu"``)
    is moved to ``device`` for its turn and back afterwards, and the activations between layers
    wait on the CPU, going to ``device`` one batch at a time."""
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    try:
        inputs = capture_inputs(model, architecture, windows, batch_size, device)
        layers = decoder_layers(model, architecture)
        groups = architecture.sequential if sequential else (tuple(n for g in architecture.sequential for n in g),)
        may_replay = promise(handler, "changes_only_selected")
        inputs_only = not promise(handler, "observes_outputs")
        trusted: dict[str, bool] = {}          # scope -> replaying it matched a real run
        shared: dict[tuple, bool] = {}         # (layer class, group) -> its modules read one tensor
        stream = streaming.stream_of(model)
        start = _start_walk(stream, handler)
        if start:
            inputs = LayerInputs(stream.load_inputs(start), inputs.kwargs, device)
        for index in range(start, len(layers)):
            layer = layers[index] if stream is None else stream.open(index)
            home = module_device(layer)
            if device is not None:
                layer.to(device)
            replay, substitutes = None, {}
            for number, group in enumerate(groups):
                names = list(handler.select(index, layer, group))
                if not names:
                    continue
                last = number == len(groups) - 1
                later = [n for g in groups[number + 1:] for n in g]
                scope = None
                if may_replay and len(names) == 1:
                    scope = "" if last else _scope_of(names[0], later)
                if scope is not None and trusted.get(scope) is False:
                    scope = None
                if inputs_only and scope is None:
                    _observe_inputs(layer, inputs, names, handler.observe, substitutes, shared)
                    replay = None
                else:
                    replay = observe_pass(layer, inputs, names, handler.observe, record=scope, substitutes=substitutes,
                                          inputs_only=inputs_only)
                if stream is not None:
                    streaming.return_freed_memory()   # the solve is a streamed layer's peak
                handler.solve(index, layer, names)
                if replay is None or not replay.scope:
                    continue
                if scope not in trusted:  # first time: check against really running the scope
                    args, kwargs = replay.scope_call
                    with torch.no_grad():
                        trusted[scope] = replay.matches(layer, _hidden(get_module(layer, scope)(*args, **kwargs)))
                if trusted[scope]:
                    substitutes[scope] = replay.outputs(layer)
                replay = None
            if replay is not None and "" not in trusted:
                hidden, kwargs = inputs.batch(0)
                trusted[""] = replay.matches(layer, _hidden(layer(hidden, **kwargs)))
            if replay is not None and trusted.get(""):
                outputs = [inputs.home(_hidden(o)) for o in replay.outputs(layer)]
            else:
                outputs = inputs.run(layer)
            del replay, substitutes
            layer.to(home)                      # offload = "cpu": the layer waits on the CPU again
            if stream is not None:
                outputs = _hand_back(stream, index, outputs, resumable=_resumable(stream, handler))
            inputs = LayerInputs(outputs, inputs.kwargs, device)
            if progress:
                progress(index + 1, len(layers))
        if promise(handler, "observes_head"):
            _walk_head(model, architecture, inputs, handler)
    finally:
        model.config.use_cache = use_cache


def _walk_head(model: nn.Module, architecture: Architecture, inputs: LayerInputs, handler) -> None:
    """Hand ``handler`` the head's inputs: the last layer's outputs through the final norm (run
    on the layers' device for the call, then back where it lives)."""
    norm = get_module(model, architecture.final_norm) if architecture.final_norm else nn.Identity()
    home = module_device(norm)
    if inputs.device is not None:
        norm.to(inputs.device)
    try:
        with torch.no_grad():
            for hidden, _ in inputs.batches():
                handler.observe_head(norm(hidden))
    finally:
        norm.to(home)
    handler.solve_head()


def _resumable(stream, handler) -> bool:
    return stream.sink is not None and stream.walks == 1 and promise(handler, "layers_independent")


def _start_walk(stream, handler) -> int:
    """The layer a walk over a streamed model starts at: after the last layer a killed run of
    the same stage finished, when the handler allows it; else 0 (stale shards are discarded)."""
    if stream is None:
        return 0
    stream.begin_walk()
    start = stream.resume_point() if _resumable(stream, handler) else 0
    if stream.walks == 1:
        stream.discard_from(start)
    return start


def _hand_back(stream, index: int, outputs: list[torch.Tensor], *, resumable: bool) -> list[torch.Tensor]:
    """Write the finished layer and free it; keep the next layer's inputs for resuming first,
    so a layer shard on disk always has its successor's inputs beside it."""
    if resumable:
        stream.save_inputs(index + 1, outputs)
    stream.close(index)
    if resumable:
        stream.drop_inputs(index)
    return stream.park(outputs, index)
