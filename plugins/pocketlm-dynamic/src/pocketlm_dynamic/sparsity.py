"""Activation sparsity: skip the input channels of a linear whose magnitude is small (TEAL, CATS).

At run time each thresholded input ``x`` becomes ``x * (|x| > t)`` with one threshold ``t`` per
linear input (``teal``, Liu et al., 2024: every linear of the decoder) or per MLP gate
activation (``cats``, Lee et al., 2024: the ``act(gate(x))`` that multiplies ``up(x)``, so the
down projection reads zeros there). A zeroed input channel means the matching weight column is
never needed: in batch-1 decoding, which is memory-bound, that column need not be read at all
(see :mod:`pocketlm_dynamic.decode`).

Calibration runs through the core's layer walker: for each decoder layer, the inputs of the
targeted linears (or the gate activations) over the calibration windows give, for a target
sparsity ``s``, the threshold ``t`` below which a fraction ``s`` of the magnitudes lie.
``allocation = "greedy"`` is TEAL's block-wise greedy allocation: within each decoder layer it
raises the sparsity of whichever linear costs the least added output error per weight byte
skipped, step by step, until the layer skips ``s`` of its weight bytes. The error of a linear at
a sparsity is its relative output error ``‖W(x - x_s)‖² / ‖Wx‖²`` on calibration tokens, a
per-linear stand-in for TEAL's block output error that costs one matmul per step.

The rule lives in the modules themselves (:class:`Thresholded`): the thresholded linear is the
model's own linear class (``nn.Linear``, ``QuantizedLinear``, GPT-2's ``Conv1D``) with an
``input_threshold`` buffer and the rule in ``forward``, so evaluation measures the real quality,
later stages still see a linear, and checkpoints rebuild it (a module type registered with the
core's checkpoint).
"""

from __future__ import annotations

import torch
from torch import nn

from pocketlm import PocketError
from pocketlm.calibration import LayerHandler, module_input
from pocketlm.modules import decoder_layers, get_module, matches
from pocketlm.weights import is_linear, linear_shape, linear_weight

# the options, effect and plan live in the light module (registration reads them without torch)
from .options import ActivationSparsityOptions, effect, plan  # noqa: F401

#: Where a threshold sits: on a linear's input, or on the output of an MLP activation (CATS).
INPUT, OUTPUT = "input_threshold", "output_threshold"
#: Sparsity steps of the greedy allocation (TEAL uses 0.05 steps too).
GREEDY_STEP = 0.05
#: Calibration tokens kept per linear for the greedy error curves.
GREEDY_TOKENS = 512


# ------------------------------------------------------------------------- pure tensors


def sparsify(x: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """``x`` with every entry whose magnitude is at most ``threshold`` set to zero. A threshold
    of zero returns ``x`` exactly (zeros stay zeros)."""
    return torch.where(x.abs() > threshold, x, torch.zeros((), dtype=x.dtype, device=x.device))


def threshold_for(magnitudes: torch.Tensor, sparsity: float) -> float:
    """The threshold below (or at) which a fraction ``sparsity`` of ``magnitudes`` lie."""
    flat = magnitudes.detach().flatten().float()
    count = int(round(flat.numel() * sparsity))
    if count <= 0 or flat.numel() == 0:
        return 0.0
    return float(torch.kthvalue(flat, min(count, flat.numel())).values)


def thresholds_at(magnitudes: torch.Tensor, levels: list[float], generator: torch.Generator | None = None,
                  sample: int = 1 << 20) -> list[float]:
    """:func:`threshold_for` at each sparsity of ``levels``, from one sorted random sample of
    at most ``sample`` magnitudes (a quantile of 2^20 samples is within about 0.1% of exact)."""
    flat = magnitudes.detach().flatten().float()
    if flat.numel() > sample:
        # drawn on the CPU, where the seeded generator lives, so the sample is the same on any device
        flat = flat[torch.randint(flat.numel(), (sample,), generator=generator, device="cpu").to(flat.device)]
    ordered = flat.sort().values
    return [0.0 if s <= 0 else float(ordered[min(int(round(ordered.numel() * s)), ordered.numel()) - 1])
            for s in levels]


def skipped_fraction(x: torch.Tensor, threshold: float) -> float:
    """Fraction of the entries of ``x`` that :func:`sparsify` zeroes."""
    return float((x.abs() <= threshold).float().mean()) if threshold > 0 else float((x == 0).float().mean())


def relative_error(weight: torch.Tensor, x: torch.Tensor, threshold: float) -> float:
    """``‖W(x - sparsify(x))‖² / ‖Wx‖²`` over the rows of ``x`` (tokens × inputs)."""
    dense = x @ weight.t()
    dropped = (x - sparsify(x, threshold)) @ weight.t()
    return float(dropped.pow(2).sum() / dense.pow(2).sum().clamp_min(1e-30))


def greedy_allocation(curves: dict[str, list[float]], sizes: dict[str, int], target: float,
                      step: float = GREEDY_STEP) -> dict[str, float]:
    """TEAL's greedy allocation within one block: ``curves[name][i]`` is the error of linear
    ``name`` at sparsity ``i * step`` and ``sizes[name]`` its weight count. Starting from zero,
    raise by one step the linear with the smallest added error per weight skipped until the
    size-weighted sparsity reaches ``target``. Returns each linear's sparsity."""
    level = {name: 0 for name in curves}
    total = sum(sizes.values())
    reached = 0.0
    while reached < target - 1e-9:
        best, best_cost = None, float("inf")
        for name, curve in curves.items():
            if level[name] + 1 >= len(curve):
                continue
            cost = (curve[level[name] + 1] - curve[level[name]]) / sizes[name]
            if cost < best_cost:
                best, best_cost = name, cost
        if best is None:
            break
        gained = step * sizes[best] / total
        if reached + gained > target + 1e-9:
            # The last step overshoots: take the fraction of it that lands on the target.
            partial = (target - reached) * total / sizes[best]
            return {n: level[n] * step + (partial if n == best else 0.0) for n in curves}
        level[best] += 1
        reached += gained
    return {name: level[name] * step for name in curves}


# ------------------------------------------------------------------------------ modules


class Thresholded:
    """Mixin of the thresholded modules: the model's own class plus a threshold buffer.

    ``input_threshold`` zeroes small inputs before the module runs (a linear, TEAL);
    ``output_threshold`` zeroes small outputs after it (an MLP activation, CATS)."""

    def forward(self, x, *args, **kwargs):
        if INPUT in self._buffers:
            x = sparsify(x, self._buffers[INPUT])
        y = super().forward(x, *args, **kwargs)
        if OUTPUT in self._buffers:
            y = sparsify(y, self._buffers[OUTPUT])
        return y


_CLASSES: dict[type, type] = {}


def thresholded_class(base: type) -> type:
    """The thresholded subclass of ``base`` (made once per base class)."""
    if issubclass(base, Thresholded):
        return base
    if base not in _CLASSES:
        _CLASSES[base] = type(f"Thresholded{base.__name__}", (Thresholded, base), {"__module__": __name__})
    return _CLASSES[base]


def set_threshold(module: nn.Module, where: str, threshold: float) -> nn.Module:
    """Make ``module`` thresholded in place (its class becomes the thresholded subclass, so
    its name, weights, masks and hooks stay) and record ``threshold``."""
    module.__class__ = thresholded_class(type(module))
    module.register_buffer(where, torch.tensor(float(threshold), dtype=torch.float32,
                                               device=_device(module)))
    return module


def clear_threshold(module: nn.Module) -> nn.Module:
    """Undo :func:`set_threshold`: the module's plain class, no threshold."""
    if isinstance(module, Thresholded):
        for where in (INPUT, OUTPUT):
            module._buffers.pop(where, None)
        module.__class__ = next(b for b in type(module).__mro__[1:] if not issubclass(b, Thresholded))
    return module


def thresholds(model: nn.Module) -> dict[str, tuple[str, float]]:
    """Every threshold of ``model``: module name -> (where, value)."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, Thresholded):
            for where in (INPUT, OUTPUT):
                if where in module._buffers:
                    found[name] = (where, float(module._buffers[where]))
    return found


def is_thresholded(module: nn.Module) -> bool:
    """Whether ``module`` carries a threshold (the checkpoint's module type ``thresholded``)."""
    return isinstance(module, Thresholded)


def describe_thresholds(module: nn.Module) -> dict:
    """A thresholded module's thresholds, as its checkpoint manifest entry records them."""
    return {where: float(module._buffers[where]) for where in (INPUT, OUTPUT) if where in module._buffers}


def rebuild_thresholds(spec: dict, module: nn.Module) -> nn.Module:
    """``module`` thresholded again as its manifest entry ``spec`` describes (before its weights load)."""
    for where in (INPUT, OUTPUT):
        if where in spec:
            set_threshold(module, where, spec[where])
    return module


def _device(module: nn.Module) -> torch.device:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return torch.device("cpu")


# -------------------------------------------------------------------------- the family


def cats_sites(arch, layer: nn.Module) -> tuple[str, str]:
    """(activation module, down projection) of a gated MLP, relative to a decoder layer; a
    clear error for a family whose MLP CATS does not know."""
    gate = arch.mlp_in[0] if len(arch.mlp_in) == 2 and not arch.mlp_fused_gate_up else None
    act = gate.rpartition(".")[0] + ".act_fn" if gate else None
    if act is None or not _has(layer, act):
        raise PocketError(f"mode='cats' thresholds the gate activation of a gated MLP (gate_proj, act_fn, "
                          f"up_proj), and the {arch.name!r} family's MLP is not one that it knows",
                          field="mode", fix="use mode = \"teal\" for this model, which thresholds every linear's input")
    return act, arch.mlp_out


def _has(root: nn.Module, name: str) -> bool:
    try:
        get_module(root, name)
        return True
    except AttributeError:
        return False


# ------------------------------------------------------------------------------ handler


class ThresholdCalibrator(LayerHandler):
    """Walker handler: keeps the magnitudes each thresholded input (or gate activation) takes
    on the calibration windows, then sets the thresholds layer by layer."""

    changes_only_selected = False  # the greedy allocation sets a group's thresholds at the layer's end

    def __init__(self, model: nn.Module, options: ActivationSparsityOptions, arch, log):
        self.model, self.options, self.arch, self.log = model, options, arch, log
        self.prefix = arch.layers
        self.last_group = arch.sequential[-1]
        self.seen: dict[str, list[torch.Tensor]] = {}
        self.pending: dict[str, torch.Tensor] = {}  # greedy: inputs of the layer's linears so far
        self.pending_layer: tuple[int, nn.Module] | None = None
        self.generator = torch.Generator().manual_seed(0)
        self.report: list[tuple[str, float, float]] = []  # (name, sparsity, threshold)

    @property
    def observes_outputs(self) -> bool:
        return self.options.mode == "cats"  # CATS reads the activation's output

    def _wanted(self, index: int, name: str) -> bool:
        full = f"{self.prefix}.{index}.{name}"
        return matches(full, self.options.targets) and not matches(full, self.options.ignore)

    def select(self, index, layer, names):
        if self.pending and self.pending_layer[0] != index:
            self.flush()  # the previous layer's last group was not targeted
        if self.options.mode == "cats":
            act, down = cats_sites(self.arch, layer)
            return [act] if self.arch.mlp_in[0] in names and self._wanted(index, down) else []
        return [n for n in names if is_linear(get_module(layer, n)) and self._wanted(index, n)]

    def observe(self, name, module, args, kwargs, output):
        x = output if self.options.mode == "cats" else module_input(args, kwargs)
        self.seen.setdefault(name, []).append(x.detach().reshape(-1, x.shape[-1]))

    def solve(self, index, layer, names):
        if self.options.mode == "cats" or self.options.allocation == "uniform":
            where = OUTPUT if self.options.mode == "cats" else INPUT
            for name in names:
                values = torch.cat(self.seen.pop(name))
                t = threshold_for(values.abs(), self.options.sparsity)
                set_threshold(get_module(layer, name), where, t)
                self.report.append((f"{self.prefix}.{index}.{name}", skipped_fraction(values, t), t))
            self.seen.clear()
            return
        for name in names:  # greedy: keep the inputs; allocate once the layer's last group is seen
            self.pending[name] = torch.cat(self.seen.pop(name))
        self.pending_layer = (index, layer)
        if set(names) & set(self.last_group):
            self.flush()

    def flush(self):
        """Run the greedy allocation over the linears of the layer seen so far."""
        if self.pending:
            self._allocate(*self.pending_layer)

    def _allocate(self, index, layer):
        curves, sizes, samples = {}, {}, {}
        levels = [i * GREEDY_STEP for i in range(int(round(0.95 / GREEDY_STEP)) + 1)]
        for name, values in self.pending.items():
            module = get_module(layer, name)
            rows = torch.randperm(values.shape[0], generator=self.generator, device="cpu")[:GREEDY_TOKENS]
            sample = values[rows.to(values.device)].float()
            weight = linear_weight(module).float()
            samples[name] = values.abs()
            at = thresholds_at(samples[name], levels, self.generator)
            curves[name] = [relative_error(weight, sample, t) for t in at]
            out_features, in_features = linear_shape(module)
            sizes[name] = out_features * in_features
        for name, s in greedy_allocation(curves, sizes, self.options.sparsity).items():
            t = thresholds_at(samples[name], [s], self.generator)[0]
            set_threshold(get_module(layer, name), INPUT, t)
            self.report.append((f"{self.prefix}.{index}.{name}", skipped_fraction(samples[name], t), t))
        self.pending.clear()


def compress(model: nn.Module, options: ActivationSparsityOptions, context) -> nn.Module:
    arch = context.architecture(model)
    if options.mode == "cats":
        cats_sites(arch, decoder_layers(model, arch)[0])  # refuse an unknown MLP before any work
    if options.sparsity == 0:
        context.log("activation-sparsity: sparsity 0 is the dense model; nothing to calibrate")
        return model
    handler = ThresholdCalibrator(model, options, arch, context.log)
    context.walk(model, handler, sequential=True, description="activation thresholds")
    handler.flush()
    if not handler.report:
        raise PocketError("activation-sparsity matched no module to threshold", field="targets",
                          fix="check targets/ignore against the model's module names (`pocketlm methods`)")
    weights = {n: _weight_count(model, n, options.mode, arch) for n, _, _ in handler.report}
    measured = sum(weights[n] * s for n, s, _ in handler.report) / sum(weights.values())
    context.log(f"activation-sparsity ({options.mode}, {options.allocation}): {len(handler.report)} thresholds, "
                f"{measured:.1%} of input channels below them on the calibration text")
    return model


def _weight_count(model: nn.Module, name: str, mode: str, arch) -> int:
    if mode == "cats":  # the activation gates the down projection's columns
        name = name.rpartition(".")[0] + "." + arch.mlp_out.rpartition(".")[2]
    out_features, in_features = linear_shape(get_module(model, name))
    return out_features * in_features


# --------------------------------------------------------------------- carrying across stages


def carry(before: dict[str, tuple[str, float]], model: nn.Module) -> None:
    """Put back the thresholds of ``before`` on modules a later stage replaced (a quantizer
    swaps an ``nn.Linear`` for a ``QuantizedLinear``), so the rule survives the stage."""
    for name, (where, value) in before.items():
        try:
            module = get_module(model, name)
        except AttributeError:
            continue  # the module is gone (a structural change removed it)
        if not (isinstance(module, Thresholded) and where in module._buffers):
            set_threshold(module, where, value)


def install(model: nn.Module, table: dict[str, tuple[str, float]], *, source: str = "the thresholds") -> None:
    """Set every threshold of ``table`` (module name -> (where, value)) on ``model``, refusing
    names or module kinds that do not fit, so a mismatch never runs dense silently."""
    problems = []
    for name, (where, value) in table.items():
        try:
            module = get_module(model, name)
        except AttributeError:
            problems.append(f"{name}: no such module")
            continue
        if where == INPUT and not is_linear(module):
            problems.append(f"{name}: is a {type(module).__name__}, not a linear")
        elif where not in (INPUT, OUTPUT):
            problems.append(f"{name}: unknown place {where!r}")
    if problems:
        raise PocketError(f"{source} do not match the model: " + "; ".join(problems[:4])
                          + (f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""),
                          fix="use the thresholds exported with this model, or recalibrate with activation-sparsity")
    for name, (where, value) in table.items():
        set_threshold(get_module(model, name), where, value)


__all__ = ["ActivationSparsityOptions", "Thresholded", "carry", "clear_threshold", "compress", "effect",
           "greedy_allocation", "install", "plan", "relative_error", "set_threshold", "skipped_fraction",
           "sparsify", "threshold_for", "thresholded_class", "thresholds", "thresholds_at"]
