"""The layer walker: calibrate a model one decoder layer at a time.

1. Capture what the first decoder layer receives (hidden states and keyword arguments such as
   the attention mask and rotary embeddings) for every calibration batch.
2. For each decoder layer, for each group of linears in execution order (``sequential``), hook
   the modules the method asks for, run the layer over the calibration batches (stopping each
   batch as soon as every hooked module has fired), let the method ``observe`` what flowed
   through and then ``solve`` (change the layer and free its statistics).
3. Run the changed layer once more to produce the next layer's inputs, so each layer is
   calibrated on the outputs of the already-compressed layers before it.

Memory holds one layer's calibration activations (inputs and outputs) plus what the method keeps.
Layers are only touched through ``Architecture.layers``, one at a time, which is the seam for
streaming layers from disk.

A handler is any object with these methods (``LayerHandler`` documents them):
``select(index, layer, names) -> names``, ``observe(name, module, args, kwargs, output)`` and
``solve(index, layer, names)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from torch import nn

from .components import Architecture
from .modules import decoder_layers, get_module


class LayerHandler(Protocol):
    def select(self, index: int, layer: nn.Module, names: tuple[str, ...]) -> list[str]:
        """Which submodules of decoder layer ``index`` to observe, given the candidate linears
        ``names`` of the current group (relative names). Return any relative names, including
        non-linear modules such as ``"self_attn"``, or ``""`` for the whole layer; return an
        empty list to skip the group."""

    def observe(self, name: str, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Called once per calibration batch for each selected module, with what it was called
        with and what it returned."""

    def solve(self, index: int, layer: nn.Module, names: list[str]) -> None:
        """Change the selected modules using what was observed, then free the statistics."""


@dataclass
class LayerInputs:
    """What a decoder layer receives, one entry per calibration batch."""

    hidden: list[torch.Tensor]
    kwargs: list[dict]

    def run(self, layer: nn.Module) -> list[torch.Tensor]:
        """The layer's output hidden states for every batch."""
        with torch.no_grad():
            return [_hidden(layer(h, **kw)) for h, kw in zip(self.hidden, self.kwargs)]


class _Stop(Exception):
    """Raised from a hook to end a forward pass early once it has what it needs."""


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def capture_inputs(model: nn.Module, architecture: Architecture, windows: torch.Tensor,
                   batch_size: int = 8) -> LayerInputs:
    """Run the model up to its first decoder layer for every batch of ``windows`` and keep what
    that layer receives."""
    first = decoder_layers(model, architecture)[0]
    captured = LayerInputs([], [])

    def grab(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.hidden.append(hidden.detach())
        captured.kwargs.append(kwargs)
        raise _Stop

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            for start in range(0, windows.shape[0], batch_size):
                try:
                    model(input_ids=windows[start:start + batch_size].to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return captured


def observe_pass(layer: nn.Module, inputs: LayerInputs, names: list[str],
                 observe: Callable[[str, nn.Module, tuple, dict, Any], None]) -> None:
    """Run ``layer`` over ``inputs`` with ``observe`` hooked on the submodules ``names``; each
    batch stops as soon as every hooked module has fired."""
    fired: set[str] = set()

    def hook_for(name):
        def hook(module, args, kwargs, output):
            observe(name, module, args, kwargs, output)
            fired.add(name)
            if len(fired) == len(names):
                raise _Stop
        return hook

    handles = [get_module(layer, n).register_forward_hook(hook_for(n), with_kwargs=True) for n in names]
    try:
        with torch.no_grad():
            for hidden, kwargs in zip(inputs.hidden, inputs.kwargs):
                fired.clear()
                try:
                    layer(hidden, **kwargs)
                except _Stop:
                    pass
    finally:
        for handle in handles:
            handle.remove()


def walk_layers(model: nn.Module, architecture: Architecture, windows: torch.Tensor,
                handler: LayerHandler, *, sequential: bool = True, batch_size: int = 8,
                progress: Callable[[int, int], None] | None = None) -> None:
    """Calibrate ``model`` layer by layer with ``handler`` on token ``windows`` (``[n, seq]``).

    With ``sequential`` each group of ``architecture.sequential`` is observed and solved before
    the next group runs (true-sequential: o_proj sees the outputs of the already-quantized
    q/k/v). Without it, the handler sees all the layer's linears in one pass."""
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    try:
        inputs = capture_inputs(model, architecture, windows, batch_size)
        layers = decoder_layers(model, architecture)
        groups = architecture.sequential if sequential else (tuple(n for g in architecture.sequential for n in g),)
        for index, layer in enumerate(layers):
            for group in groups:
                names = list(handler.select(index, layer, group))
                if names:
                    observe_pass(layer, inputs, names, handler.observe)
                    handler.solve(index, layer, names)
            inputs = LayerInputs(inputs.run(layer), inputs.kwargs)
            if progress:
                progress(index + 1, len(layers))
    finally:
        model.config.use_cache = use_cache
