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

``allocation = "greedy"`` is TEAL's block-wise greedy allocation (:func:`greedy_search`). Per
decoder layer, starting from all-dense, each step tries raising each input's sparsity by one
step (:data:`GREEDY_STEP`), reruns the layer with that change and measures the squared error of
the layer's output hidden states against the dense layer's; it keeps the candidate that adds
the least error per weight skipped, until the layer skips ``s`` of its weight bytes (the last
step is taken in part, to land on ``s`` exactly). The thresholds of each level come from the
magnitudes the walk observed (the dense layer's inputs, as TEAL's histograms).

* Linears that read one tensor (q/k/v; gate/up, found by comparing what they read) share one
  level, so one threshold and one set of surviving channels: the decode path then gathers one
  set of columns for the three (or two) reads, and there are 4 candidates per step in a Llama
  layer instead of 7. TEAL's reference code gives each projection its own level, with steps
  scaled so that each adds the same weighted sparsity: 7 candidates and some 85 steps at 0.4
  on a SmolLM2 layer, about five times the layer runs of the shared levels below.
* The error is measured on a fixed subset of the calibration windows: the first
  ``max(1, GREEDY_TOKENS // seq_len)`` windows the layer receives (the walk keeps the layer's
  hidden states and keyword arguments with a forward pre-hook for those), over each window's
  positions after its first quarter (:data:`GREEDY_SKIP`; TEAL measures the last quarter), so the
  attention-sink position's outsized hidden state does not dominate a squared error.
* Cost per layer, in runs of the layer over those windows (one window of 512 tokens at the
  default ``seq_len``): 1 dense run, then one run per candidate below its top level per step.
  The steps number the sum of the candidates' levels, about ``candidates * sparsity / 0.05``:
  a Llama layer has 4 candidates, so at ``sparsity = 0.4`` some 26 to 32 steps, about 130 runs
  (the tiny test models: 104 to 124), and at 0.5 about 150. For a 135M model (30 layers, each
  run about 4 GFLOP) that is some 16 TFLOP, minutes on two CPU cores: about as many tokens
  through each layer as the walk itself runs (about five passes over the 32 x 512 default
  calibration tokens).

Data parallel (``torchrun`` / ``accelerate launch``: each process walks its shard of the
windows) ends with the same thresholds in every process, those of one process on all the
windows, up to float summation order:

* A threshold is the k-th smallest magnitude of every process's together, found exactly by
  :func:`kth_smallest_across` (a bisection on the float's bits that all-reduces one count per
  step). One process with more than 2^20 magnitudes takes the quantile of a random sample
  (:func:`thresholds_at`, within about 0.1%); several take the exact one, as a sample of the
  union in one process's order cannot be drawn from the shards.
* ``greedy``: the block error is summed over the processes before each decision, and each
  process keeps only its part of the first windows one process would keep (the shards are
  rows ``rank, rank + world, ...``), so the sum is that of one process.
* ``greedy-proxy`` averages the processes' error curves (each on rows sampled from its own
  shard): every process allocates alike, but not exactly as one process would.

``allocation = "greedy-proxy"`` is the earlier, cheaper stand-in: the same greedy search on the
sum of each linear's own relative output error ``‖W(x - x_s)‖² / ‖Wx‖²`` (one matmul per level,
no layer runs), each linear on its own level.

``low_rank = r`` adds, on every thresholded linear, what the skipped inputs give through the
rank-``r`` truncated SVD ``A B`` of its weight: ``y = W sparsify(x) + A (B (x - sparsify(x)))``
(R-Sparse's idea, Zhang et al., 2025). The factors are the weight's alone; ``greedy`` runs its
candidates with them in place, so the search sees the error the correction leaves.

The rule lives in the modules themselves (:class:`Thresholded`): the thresholded linear is the
model's own linear class (``nn.Linear``, ``QuantizedLinear``, GPT-2's ``Conv1D``) with an
``input_threshold`` buffer and the rule in ``forward``, so evaluation measures the real quality,
later stages still see a linear, and checkpoints rebuild it (a module type registered with the
core's checkpoint).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pocketlm import PocketError, distributed
from pocketlm.calibration import LayerHandler, batch_rows, module_input
from pocketlm.modules import decoder_layers, get_module, matches
from pocketlm.weights import is_linear, linear_shape, linear_weight

# the options, effect and plan live in the light module (registration reads them without torch)
from .options import ActivationSparsityOptions, effect, plan  # noqa: F401

#: Where a threshold sits: on a linear's input, or on the output of an MLP activation (CATS).
INPUT, OUTPUT = "input_threshold", "output_threshold"
#: The low-rank correction's factors on a thresholded linear (``low_rank``): ``A`` is
#: ``[out, rank]``, ``B`` is ``[rank, in]``.
LOW_RANK_A, LOW_RANK_B = "low_rank_a", "low_rank_b"
#: Sparsity steps of the greedy allocation (TEAL uses 0.05 steps too).
GREEDY_STEP = 0.05
#: Calibration tokens the greedy error is measured on: rows per linear for ``greedy-proxy``, and
#: for ``greedy`` whole windows, ``max(1, GREEDY_TOKENS // seq_len)`` of them.
GREEDY_TOKENS = 512
#: ``greedy``: the leading fraction of each window's positions left out of the block error.
GREEDY_SKIP = 0.25
#: The highest sparsity the greedy allocation gives one input (as the options' upper bound).
GREEDY_TOP = 0.95


# ------------------------------------------------------------------------- pure tensors


def sparsify(x: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """``x`` with every entry whose magnitude is at most ``threshold`` set to zero. A threshold
    of zero returns ``x`` exactly (zeros stay zeros)."""
    return torch.where(x.abs() > threshold, x, torch.zeros((), dtype=x.dtype, device=x.device))


def low_rank_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)``, ``[out, rank]`` and ``[rank, in]``, with ``A @ B`` the best rank-``rank``
    approximation of ``weight`` (``[out, in]``; its truncated SVD, singular values in ``A``)."""
    u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    rank = min(rank, s.numel())
    return (u[:, :rank] * s[:rank]).contiguous(), vh[:rank].contiguous()


def low_rank_correction(skipped: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """What the skipped inputs ``skipped`` (``x - sparsify(x)``) add through ``A @ B``:
    ``(skipped @ B^T) @ A^T``, two products of rank ``r`` instead of one of the full weight."""
    return F.linear(F.linear(skipped, b.to(skipped.dtype)), a.to(skipped.dtype))


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


def kth_smallest_across(ordered: torch.Tensor, ranks: list[int], all_reduce) -> list[float]:
    """The ``ranks[i]``-th smallest (from 1) of the non-negative float32 values that the
    processes hold together, exactly; ``ordered``: this process's, sorted; ``all_reduce``: sums
    a tensor over the processes in place. Exact like gathering every value, but moving one count
    per rank and step: non-negative floats order as their bit patterns do, so a bisection on the
    pattern, counting the values at or below the midpoint in every process, ends on the value
    itself after 31 halvings of [0, +inf]."""
    device = ordered.device
    wanted = torch.tensor(ranks, dtype=torch.int64, device=device)
    low = torch.zeros_like(wanted)
    high = torch.full_like(wanted, 0x7F800000)  # +inf: every value lies at or below it
    for _ in range(31):
        middle = (low + high) // 2
        counts = all_reduce(torch.searchsorted(ordered, middle.to(torch.int32).view(torch.float32), right=True))
        enough = counts >= wanted
        high, low = torch.where(enough, middle, high), torch.where(enough, low, middle + 1)
    return [float(v) for v in high.to(torch.int32).view(torch.float32).cpu()]


def skipped_fraction(x: torch.Tensor, threshold: float) -> float:
    """Fraction of the entries of ``x`` that :func:`sparsify` zeroes."""
    return float((x.abs() <= threshold).float().mean()) if threshold > 0 else float((x == 0).float().mean())


def relative_error(weight: torch.Tensor, x: torch.Tensor, threshold: float) -> float:
    """``‖W(x - sparsify(x))‖² / ‖Wx‖²`` over the rows of ``x`` (tokens × inputs)."""
    dense = x @ weight.t()
    dropped = (x - sparsify(x, threshold)) @ weight.t()
    return float(dropped.pow(2).sum() / dense.pow(2).sum().clamp_min(1e-30))


def greedy_search(sizes: dict[str, int], error, target: float, step: float = GREEDY_STEP,
                  top: float = GREEDY_TOP) -> dict[str, float]:
    """TEAL's greedy allocation within one block. ``sizes[name]`` is the weight count a
    candidate's sparsity applies to and ``error(levels)`` the block's error with each candidate
    at sparsity ``levels[name] * step`` (the all-zero levels, the dense block, have error zero).
    Starting from zero, each step tries raising each candidate by one level (up to ``top``) and
    keeps the one that adds the least error per weight skipped, until the size-weighted sparsity
    reaches ``target``; the step that would pass the target is taken in part, to land on it.
    Returns each candidate's sparsity. ``error`` is called once per candidate per step."""
    level = {name: 0 for name in sizes}
    highest = int(round(top / step))
    total = sum(sizes.values())
    reached, current = 0.0, 0.0
    while reached < target - 1e-9:
        best, best_cost, best_error = None, float("inf"), 0.0
        for name in sizes:
            if level[name] >= highest:
                continue
            tried = error({**level, name: level[name] + 1})
            cost = (tried - current) / sizes[name]
            if cost < best_cost:
                best, best_cost, best_error = name, cost, tried
        if best is None:
            break
        gained = step * sizes[best] / total
        if reached + gained > target + 1e-9:
            # The last step overshoots: take the fraction of it that lands on the target.
            partial = (target - reached) * total / sizes[best]
            return {n: level[n] * step + (partial if n == best else 0.0) for n in sizes}
        level[best] += 1
        reached += gained
        current = best_error
    return {name: level[name] * step for name in sizes}


def greedy_allocation(curves: dict[str, list[float]], sizes: dict[str, int], target: float,
                      step: float = GREEDY_STEP) -> dict[str, float]:
    """:func:`greedy_search` on errors that add up over the candidates: ``curves[name][i]`` is
    the error of linear ``name`` alone at sparsity ``i * step`` (``greedy-proxy``)."""
    top = (min(len(curve) for curve in curves.values()) - 1) * step

    def error(levels):
        return sum(curves[name][i] for name, i in levels.items())

    return greedy_search(sizes, error, target, step, top)


# ------------------------------------------------------------------------------ modules


class Thresholded:
    """Mixin of the thresholded modules: the model's own class plus a threshold buffer.

    ``input_threshold`` zeroes small inputs before the module runs (a linear, TEAL), and the
    ``low_rank_a`` / ``low_rank_b`` factors, where present, add back what those inputs give
    through the weight's main directions; ``output_threshold`` zeroes small outputs after it
    (an MLP activation, CATS)."""

    def forward(self, x, *args, **kwargs):
        if INPUT in self._buffers:
            kept = sparsify(x, self._buffers[INPUT])
            y = super().forward(kept, *args, **kwargs)
            if LOW_RANK_B in self._buffers:
                y = y + low_rank_correction(x - kept, self._buffers[LOW_RANK_A], self._buffers[LOW_RANK_B])
        else:
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


def set_low_rank(module: nn.Module, a: torch.Tensor, b: torch.Tensor) -> nn.Module:
    """Give the thresholded linear ``module`` the correction factors ``a`` (``[out, rank]``)
    and ``b`` (``[rank, in]``), stored in float32 on the module's device."""
    device = _device(module)
    module.register_buffer(LOW_RANK_A, a.detach().to(device=device, dtype=torch.float32).contiguous())
    module.register_buffer(LOW_RANK_B, b.detach().to(device=device, dtype=torch.float32).contiguous())
    return module


def add_low_rank(module: nn.Module, rank: int) -> nn.Module:
    """The correction of rank ``rank`` from ``module``'s own weight (dequantized if it is
    quantized), computed on the module's device."""
    return set_low_rank(module, *low_rank_factors(linear_weight(module), rank))


def clear_threshold(module: nn.Module) -> nn.Module:
    """Undo :func:`set_threshold`: the module's plain class, no threshold, no correction."""
    if isinstance(module, Thresholded):
        for where in (INPUT, OUTPUT, LOW_RANK_A, LOW_RANK_B):
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


def low_ranks(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every low-rank correction of ``model``: module name -> (A, B)."""
    return {name: (module._buffers[LOW_RANK_A], module._buffers[LOW_RANK_B])
            for name, module in model.named_modules()
            if isinstance(module, Thresholded) and LOW_RANK_B in module._buffers}


def is_thresholded(module: nn.Module) -> bool:
    """Whether ``module`` carries a threshold (the checkpoint's module type ``thresholded``)."""
    return isinstance(module, Thresholded)


def describe_thresholds(module: nn.Module) -> dict:
    """A thresholded module's thresholds (and the rank of its correction), as its checkpoint
    manifest entry records them; the factors are tensors of the checkpoint."""
    spec = {where: float(module._buffers[where]) for where in (INPUT, OUTPUT) if where in module._buffers}
    if LOW_RANK_B in module._buffers:
        spec["low_rank"] = int(module._buffers[LOW_RANK_B].shape[0])
    return spec


def rebuild_thresholds(spec: dict, module: nn.Module) -> nn.Module:
    """``module`` thresholded again as its manifest entry ``spec`` describes (before its weights
    load: the correction's factors are placeholders of their shape until then)."""
    for where in (INPUT, OUTPUT):
        if where in spec:
            set_threshold(module, where, spec[where])
    if spec.get("low_rank"):
        out_features, in_features = linear_shape(module)
        set_low_rank(module, torch.zeros(out_features, spec["low_rank"]), torch.zeros(spec["low_rank"], in_features))
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

    def __init__(self, model: nn.Module, options: ActivationSparsityOptions, arch, log, context=None):
        self.model, self.options, self.arch, self.log = model, options, arch, log
        self.context = context  # its all_reduce shares the statistics of a data-parallel run
        self.prefix = arch.layers
        self.last_group = arch.sequential[-1]
        self.seen: dict[str, list[torch.Tensor]] = {}
        # greedy: the layer's inputs so far, one tensor per set of linears that read it
        self.pending: dict[str, torch.Tensor] = {}          # first reader -> what it read
        self.readers: dict[str, list[str]] = {}             # first reader -> every reader
        self.pending_layer: tuple[int, nn.Module] | None = None
        self.kept: list[tuple[torch.Tensor, dict]] = []     # greedy: (hidden, kwargs) of the layer
        self.keeping = None                                 # the pre-hook that fills ``kept``
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
            self.flush()  # the previous layer ended without a solve that flushed it
        if self.options.mode == "cats":
            act, down = cats_sites(self.arch, layer)
            return [act] if self.arch.mlp_in[0] in names and self._wanted(index, down) else []
        chosen = [n for n in names if is_linear(get_module(layer, n)) and self._wanted(index, n)]
        if self.options.allocation == "greedy" and chosen and self.pending_layer is None:
            self._keep_layer_inputs(layer)  # the first targeted group's pass runs the layer on them
        if not chosen and tuple(names) == tuple(self.last_group):
            self.flush()  # allocate before the walker runs the layer for the next one's inputs
        return chosen

    def observe(self, name, module, args, kwargs, output):
        x = output if self.options.mode == "cats" else module_input(args, kwargs)
        self.seen.setdefault(name, []).append(x.detach().reshape(-1, x.shape[-1]))

    def solve(self, index, layer, names):
        self._stop_keeping()
        if self.options.mode == "cats" or self.options.allocation == "uniform":
            where = OUTPUT if self.options.mode == "cats" else INPUT
            for name in names:
                values = torch.cat(self.seen.pop(name))
                t = self._thresholds(values.abs(), [self.options.sparsity], sampled=False)[0]
                self._set(get_module(layer, name), where, t)
                self.report.append((f"{self.prefix}.{index}.{name}", self._fraction(values, t), t))
            self.seen.clear()
            return
        firsts = []  # greedy: keep the inputs; allocate once the layer's last group is seen
        for name in names:
            values = torch.cat(self.seen.pop(name))
            first = next((f for f in firsts if torch.equal(self.pending[f], values)), None)
            if first is None:
                firsts.append(name)
                self.pending[name], self.readers[name] = values, [name]
            else:
                self.readers[first].append(name)  # reads the same tensor (q/k/v, gate/up)
        self.pending_layer = (index, layer)
        if set(names) & set(self.last_group):
            self.flush()

    def flush(self):
        """Run the greedy allocation over the linears of the layer seen so far, then free what
        the layer kept."""
        if self.pending:
            if self.options.allocation == "greedy":
                self._allocate_on_block(*self.pending_layer)
            else:
                self._allocate_on_proxy(*self.pending_layer)
        self._stop_keeping()
        self.pending.clear()
        self.readers.clear()
        self.kept.clear()
        self.pending_layer = None

    def _set(self, module: nn.Module, where: str, threshold: float, factors=None) -> None:
        """The final threshold of ``module``, and its low-rank correction where asked for (from
        its weight, unless the search computed ``factors`` already)."""
        set_threshold(module, where, threshold)
        if where == INPUT and self.options.low_rank:
            set_low_rank(module, *factors) if factors is not None else add_low_rank(module, self.options.low_rank)

    # -- data parallel: every process's observations together (one process: its own, as before)

    @property
    def processes(self) -> int:
        return 1 if self.context is None else self.context.processes

    def _total(self, number: float, device: torch.device) -> float:
        """``number`` summed over the processes (in one process ``number`` itself, untouched)."""
        return number if self.processes == 1 else self.context.all_reduce_count(number, device)

    def _thresholds(self, magnitudes: torch.Tensor, levels: list[float], sampled: bool = True) -> list[float]:
        """The threshold at each sparsity of ``levels`` over every process's ``magnitudes``. One
        process: :func:`thresholds_at` (a sample) or, not ``sampled``, :func:`threshold_for`.
        Several: the exact quantile of all of them (:func:`kth_smallest_across`), which is what
        one process computes unless it samples. Exact rather than gathered or merged sketches:
        the bisection moves 31 small count vectors, never the magnitudes (tens of MB a layer)."""
        if self.processes == 1:
            if sampled:
                return thresholds_at(magnitudes, levels, self.generator)
            return [threshold_for(magnitudes, s) for s in levels]
        flat = magnitudes.detach().flatten().float()
        count = int(self._total(flat.numel(), flat.device))
        ranks = [min(int(round(count * s)), count) if s > 0 else 0 for s in levels]
        found = kth_smallest_across(flat.sort().values, [max(r, 1) for r in ranks], self.context.all_reduce)
        return [t if r > 0 else 0.0 for r, t in zip(ranks, found)]

    def _fraction(self, x: torch.Tensor, threshold: float) -> float:
        """:func:`skipped_fraction` over every process's ``x``."""
        if self.processes == 1:
            return skipped_fraction(x, threshold)
        skipped = (x.abs() <= threshold) if threshold > 0 else (x == 0)
        return self._total(int(skipped.sum()), x.device) / self._total(x.numel(), x.device)

    # -- greedy: the layer's own inputs

    def _keep_layer_inputs(self, layer):
        """Hook ``layer`` to keep the first windows it is run on (hidden states and keyword
        arguments, cut to whole windows): the inputs the block error is measured on. In a
        data-parallel run, this process's part of the first windows of all: its shard holds the
        windows ``rank, rank + world, ...``, so it keeps those numbered below the count."""
        self.kept.clear()

        def keep(module, args, kwargs):
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            have = sum(h.shape[0] for h, _ in self.kept)
            first_windows = max(1, GREEDY_TOKENS // hidden.shape[1])
            # the context gives no rank: the core's distributed helpers do (rank 0 of 1 alone)
            wanted = len(range(distributed.rank(), first_windows, distributed.world_size()))
            if have < wanted:
                rows = slice(0, wanted - have)
                self.kept.append((hidden[rows].detach().clone(), batch_rows(kwargs, rows, hidden.shape[0])))

        self.keeping = layer.register_forward_pre_hook(keep, with_kwargs=True)

    def _stop_keeping(self):
        if self.keeping is not None:
            self.keeping.remove()
            self.keeping = None

    def _allocate_on_block(self, index, layer):
        """TEAL's greedy on the layer's output error (:func:`greedy_search`): one level per set
        of linears that read one tensor, thresholds from the magnitudes observed."""
        device = _device(layer)
        if not self._total(len(self.kept), device):  # another process may hold all of them
            raise PocketError("activation-sparsity (greedy) saw no input of a decoder layer to measure its "
                              "output on", fix="use allocation = \"uniform\" for this model")
        steps = int(round(GREEDY_TOP / GREEDY_STEP))
        magnitudes = {first: values.abs() for first, values in self.pending.items()}
        table = {first: self._thresholds(m, [i * GREEDY_STEP for i in range(steps + 1)])
                 for first, m in magnitudes.items()}
        sizes = {first: sum(_size(get_module(layer, n)) for n in readers) for first, readers in self.readers.items()}
        # with low_rank the search measures the layer with its corrections, so the sparsity goes
        # where what the correction cannot give back costs least
        factors = {name: low_rank_factors(linear_weight(get_module(layer, name)), self.options.low_rank)
                   for readers in self.readers.values() for name in readers} if self.options.low_rank else {}
        dense = _run_block(layer, self.kept)
        skip = int(dense[0].shape[1] * GREEDY_SKIP) if dense else 0

        def error(levels):
            for first, level in levels.items():
                for name in self.readers[first]:
                    set_threshold(get_module(layer, name), INPUT, table[first][level])
                    if name in factors:
                        set_low_rank(get_module(layer, name), *factors[name])
            try:
                # summed over the processes: every one then takes the same step
                return self._total(sum(float((out - ref)[:, skip:].float().pow(2).sum())
                                       for out, ref in zip(_run_block(layer, self.kept), dense)), device)
            finally:
                for readers in self.readers.values():
                    for name in readers:
                        clear_threshold(get_module(layer, name))

        allocated = greedy_search(sizes, error, self.options.sparsity)
        del dense
        for first, s in allocated.items():
            t = self._thresholds(magnitudes[first], [s])[0]
            fraction = self._fraction(self.pending[first], t)
            for name in self.readers[first]:
                self._set(get_module(layer, name), INPUT, t, factors.get(name))
                self.report.append((f"{self.prefix}.{index}.{name}", fraction, t))

    # -- greedy-proxy: each linear's own relative output error

    def _allocate_on_proxy(self, index, layer):
        curves, sizes, samples = {}, {}, {}
        levels = [i * GREEDY_STEP for i in range(int(round(GREEDY_TOP / GREEDY_STEP)) + 1)]
        for first, readers in self.readers.items():
            magnitudes = self.pending[first].abs()
            for name in readers:
                values = self.pending[first]
                rows = torch.randperm(values.shape[0], generator=self.generator, device="cpu")[:GREEDY_TOKENS]
                sample = values[rows.to(values.device)].float()
                weight = linear_weight(get_module(layer, name)).float()
                samples[name] = magnitudes
                at = self._thresholds(magnitudes, levels)
                curves[name] = self._mean([relative_error(weight, sample, t) for t in at], weight.device)
                sizes[name] = _size(get_module(layer, name))
        for name, s in greedy_allocation(curves, sizes, self.options.sparsity).items():
            t = self._thresholds(samples[name], [s])[0]
            self._set(get_module(layer, name), INPUT, t)
            self.report.append((f"{self.prefix}.{index}.{name}", self._fraction(samples[name], t), t))

    def _mean(self, curve: list[float], device: torch.device) -> list[float]:
        """``curve`` averaged over the processes (each measured it on rows of its own shard)."""
        if self.processes == 1:
            return curve
        total = self.context.all_reduce(torch.tensor(curve, dtype=torch.float64, device=device))
        return (total / self.processes).tolist()


def _size(module: nn.Module) -> int:
    out_features, in_features = linear_shape(module)
    return out_features * in_features


def _run_block(layer: nn.Module, kept: list[tuple[torch.Tensor, dict]]) -> list[torch.Tensor]:
    """The layer's output hidden states on each kept (hidden, kwargs)."""
    with torch.no_grad():
        outputs = [layer(hidden, **kwargs) for hidden, kwargs in kept]
    return [o[0] if isinstance(o, (tuple, list)) else o for o in outputs]


def compress(model: nn.Module, options: ActivationSparsityOptions, context) -> nn.Module:
    arch = context.architecture(model)
    if options.mode == "cats":
        cats_sites(arch, decoder_layers(model, arch)[0])  # refuse an unknown MLP before any work
    if options.sparsity == 0:
        context.log("activation-sparsity: sparsity 0 is the dense model; nothing to calibrate")
        return model
    handler = ThresholdCalibrator(model, options, arch, context.log, context)
    context.walk(model, handler, sequential=True, description="activation thresholds")
    handler.flush()
    if not handler.report:
        raise PocketError("activation-sparsity matched no module to threshold", field="targets",
                          fix="check targets/ignore against the model's module names (`pocketlm methods`)")
    weights = {n: _weight_count(model, n, options.mode, arch) for n, _, _ in handler.report}
    measured = sum(weights[n] * s for n, s, _ in handler.report) / sum(weights.values())
    context.log(f"activation-sparsity ({options.mode}, {options.allocation}): {len(handler.report)} thresholds, "
                f"{measured:.1%} of input channels below them on the calibration text")
    if options.low_rank:
        corrected = low_ranks(model)
        factors = sum(a.numel() + b.numel() for a, b in corrected.values())
        context.log(f"activation-sparsity: low-rank correction of rank {options.low_rank} on {len(corrected)} "
                    f"linears, {factors / sum(weights.values()):.1%} of their weights in factors "
                    "(read besides the surviving columns when decoding)")
    return model


def _weight_count(model: nn.Module, name: str, mode: str, arch) -> int:
    if mode == "cats":  # the activation gates the down projection's columns
        name = name.rpartition(".")[0] + "." + arch.mlp_out.rpartition(".")[2]
    out_features, in_features = linear_shape(get_module(model, name))
    return out_features * in_features


# --------------------------------------------------------------------- carrying across stages


def carry(before: dict[str, tuple[str, float]], model: nn.Module,
          factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
    """Put back the thresholds of ``before`` (and the low-rank corrections of ``factors``) on
    modules a later stage replaced (a quantizer swaps an ``nn.Linear`` for a
    ``QuantizedLinear``), so the rule survives the stage. A correction keeps the factors it was
    calibrated with: they approximate the weight the thresholds were set on."""
    for name, (where, value) in before.items():
        try:
            module = get_module(model, name)
        except AttributeError:
            continue  # the module is gone (a structural change removed it)
        if not (isinstance(module, Thresholded) and where in module._buffers):
            set_threshold(module, where, value)
        if name in (factors or {}) and LOW_RANK_B not in module._buffers:
            set_low_rank(module, *factors[name])


def factor_problem(module: nn.Module, a: torch.Tensor, b: torch.Tensor) -> str | None:
    """What is wrong with ``(a, b)`` as the low-rank correction of the linear ``module``, or None."""
    out_features, in_features = linear_shape(module)
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0] \
            or (a.shape[0], b.shape[1]) != (out_features, in_features):
        return (f"low-rank factors {tuple(a.shape)} x {tuple(b.shape)} do not fit its "
                f"{out_features} x {in_features} weight")
    return None


def install(model: nn.Module, table: dict[str, tuple[str, float]], *, source: str = "the thresholds",
            factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
    """Set every threshold of ``table`` (module name -> (where, value)) on ``model``, and every
    low-rank correction of ``factors`` (module name -> (A, B)), refusing names, module kinds or
    factor shapes that do not fit, so a mismatch never runs dense silently."""
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
    flawed = {p.partition(":")[0] for p in problems}
    for name, (a, b) in (factors or {}).items():
        if table.get(name, (None,))[0] != INPUT:
            problems.append(f"{name}: a low-rank correction without an input threshold")
        elif name not in flawed and (problem := factor_problem(get_module(model, name), a, b)):
            problems.append(f"{name}: {problem}")
    if problems:
        raise PocketError(f"{source} do not match the model: " + "; ".join(problems[:4])
                          + (f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""),
                          fix="use the thresholds exported with this model, or recalibrate with activation-sparsity")
    for name, (where, value) in table.items():
        set_threshold(get_module(model, name), where, value)
    for name, (a, b) in (factors or {}).items():
        set_low_rank(get_module(model, name), a, b)


__all__ = ["ActivationSparsityOptions", "Thresholded", "add_low_rank", "carry", "clear_threshold", "compress",
           "effect", "factor_problem", "greedy_allocation", "greedy_search", "install", "kth_smallest_across",
           "low_rank_correction", "low_rank_factors", "low_ranks", "plan", "relative_error", "set_low_rank",
           "set_threshold", "skipped_fraction", "sparsify", "threshold_for", "thresholded_class", "thresholds",
           "thresholds_at"]
