"""Quantization-aware recovery (method ``qat``): train the scales of quantized layers, the
integer grid held fixed, in the way of LSQ and EfficientQAT.

It runs after a quantizer (``rtn``, ``gptq``, any grid rule, k-quant rules included). A
quantized weight is ``w = (q - zero) * scale``. ``qat`` keeps every integer ``q`` and every zero
point exactly as the quantizer chose them and trains only the float scales, so the weights stay
on a grid of the same format, bits and size, and every exporter writes them as before. Holding
the grid fixed (rather than re-rounding a latent weight, which ``distill``'s ``quantized = "ste"``
does) is EfficientQAT's second phase (E2E-QP); it keeps the format exact by construction and
costs one parameter per group instead of one per weight.

Two phases:

1. **Block-wise reconstruction** (EfficientQAT's Block-AP, here with the grid fixed): through the
   core's walker, layer by layer, the quantized layer's output on its own inputs (what the
   already-recovered layers before it produce) is matched by mean squared error to the
   original float layer's output on the original model's inputs. Matching the float model's
   hidden states, not the float layer run on the quantized inputs, lets each layer make up for
   errors of the layers before it. ``epochs`` passes over the calibration windows in
   micro-batches of ``batch_size`` windows, AdamW with a cosine schedule. A layer whose error,
   measured after the final float16 rounding, came out higher than before is put back as it
   was, so this phase never makes a layer worse on its calibration windows.
2. **End-to-end distillation** (optional, ``e2e_steps > 0``; EfficientQAT's E2E-QP): ``distill``
   from the original model with ``quantized = "scales"`` and every other parameter frozen: only
   the scales train, on the KL to the teacher's logits. A quantized token embedding trains its
   scales here too (below).

Scales are stored as float16 by every exporter. The trained values are rounded once at the end
so that each stored scale is a float16 and the model in memory is bit for bit the exported one.

**Scale structure.** A layer's scales are trained as ``scale[g] = step[block(g)] * m[g]`` with
integer multipliers ``m`` fixed, found from the grid (:func:`scale_structure`):

* where every 256-column super-block of every row holds scales that are whole multiples of one
  float16 step (``d * sc_j``: GGUF's k-quants Q2_K ... Q6_K store exactly this), only ``d`` trains
  and the integer sub-block scales ``sc_j`` stay. ``d`` is rounded to few enough significant bits
  that each ``d * sc_j`` is again a float16, so the grid stays an exact k-quant block;
* where groups of 16 come in pairs with equal scales (how a 16-column k-quant grid is written as
  32-weight blocks on rows that 256 does not divide), each pair shares one trained scale;
* otherwise every group trains its own scale.

Zero points are not trained: they are integers in the grid's storage, and a trained, re-rounded
zero point would change which integer every weight of the group sits on.

**A quantized token embedding** (:class:`~pocketlm.weights.QuantizedEmbedding`; on a small model
with a tied head it is the largest single loss of a 4-bit export) trains its scales in the
end-to-end phase only (the block phase walks decoder layers): by default whenever it is quantized,
unless ``ignore`` names it (the alias ``"embed"``, its module name, or the name of the head tied
to it, which is the same grid); ``targets`` selects it by the same names (``"*"`` does).
:class:`ScaleEmbedding` applies the structure rules above to its ``[vocab, hidden]`` grid, and the
tied head (:class:`ScaleHead`) reads the *same* ``step`` parameter, so the lookup and the logits
train one set of scales, written back into the one storage the two share; the exported
``token_embd`` (Q4_0, Q4_1, k-quant) is the model in memory bit for bit. Cost: ``q - zero`` held
as int8 (a quarter of the float32 matrix; int16 at 8 bits), one float and its AdamW state per
group; the head builds its float weight a block of :data:`ROW_BLOCK` weights at a time in the
forward and backward passes (:class:`TiedLogits`), so no float copy of the whole matrix is made
or kept beyond the logits themselves, at the price of building it twice per step. An untied
quantized head is a quantized linear and trains as one.

What stays fixed: the integer grid (so a pruned weight, stored as ``q = zero``, stays exactly
zero: masks survive by construction, and a mask whose weights are not zero on the grid is
refused), zero points, ``g_idx``, biases, norms, dense embeddings, and a quantized embedding in
the block phase.

Resumable: after each layer the block phase writes the scales of every layer done so far to
``qat-blocks.pt`` in the stage folder (atomically); a killed run with the same options restores
those layers instead of training them again and ends with the same scales. The end-to-end phase
resumes through ``distill``'s own checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pocketlm import PocketError, atomic, distributed
from pocketlm.calibration import LayerHandler, batch_rows, capture_inputs, module_input
from pocketlm.devices import to_device
from pocketlm.modules import decoder_layers, get_module, matches, set_module
from pocketlm.weights import QuantizedEmbedding, QuantizedLinear, get_mask, tied_heads

# the options live in the light module (registration reads them without torch)
from .options import QATOptions

STATE_FILE = "qat-blocks.pt"
SUPER_BLOCK = 256        # columns under one float16 step in GGUF's k-quants
MAX_MULTIPLIER = 127     # the largest integer sub-block scale a k-quant stores (Q6_K's int8)
FP16_BITS = 11           # significant bits of a float16
FP16_TINY = 2.0**-24     # float16's smallest step (its subnormals)
EMBED_ALIAS = "embed"    # names the token embedding in targets/ignore, as quantizers take it
ROW_BLOCK = 1 << 22      # weights of a [vocab, hidden] matrix built at once by the tied head


# --------------------------------------------------------------------------- pure functions


@dataclass(frozen=True)
class Structure:
    """``scales = step[:, block] * multiplier``: ``step`` ``[rows, blocks]`` trains,
    ``multiplier`` ``[rows, groups]`` (integers) and ``block`` ``[groups]`` stay fixed."""

    step: torch.Tensor
    multiplier: torch.Tensor
    block: torch.Tensor
    kind: str                          # "two-level", "pairs" or "groups"

    def scales(self, step: torch.Tensor | None = None) -> torch.Tensor:
        return (self.step if step is None else step)[:, self.block] * self.multiplier


def two_level(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(d, m)`` with ``scales == d * m`` exactly for each row of ``scales`` ``[n, subs]``
    (float32 holding float16 values): ``d`` ``[n, 1]`` a float16, ``m`` integers in
    ``[1, MAX_MULTIPLIER]``, the coarsest such ``d`` (smallest multipliers); None where some row
    has none."""
    top = scales.amax(dim=1, keepdim=True)
    found = torch.zeros(scales.shape[0], dtype=torch.bool, device=scales.device)
    d = torch.zeros_like(top)
    for k in range(1, MAX_MULTIPLIER + 1):      # k: the top scale's multiplier; small k first
        candidate = top / k
        m = torch.round(scales / candidate)
        ok = (candidate.half().float() == candidate)[:, 0] & (candidate[:, 0] > 0)
        ok &= ((m >= 1) & (m <= MAX_MULTIPLIER) & (candidate * m == scales)).all(dim=1)
        new = ok & ~found
        d[new] = candidate[new]
        found |= ok
        if bool(found.all()):
            return d, torch.round(scales / d)
    return None


def scale_structure(scales: torch.Tensor, group_size: int, cols: int) -> Structure:
    """How the scales ``[rows, groups]`` of a grid of ``cols`` columns train (module docstring):
    a k-quant two-level grid, groups of 16 tied in pairs, or free groups."""
    scales = scales.float()
    rows, groups = scales.shape
    device = scales.device
    if group_size > 0 and cols % SUPER_BLOCK == 0 and SUPER_BLOCK % group_size == 0 and groups > 1:
        subs = SUPER_BLOCK // group_size
        if subs > 1:
            found = two_level(scales.reshape(-1, subs))
            if found is not None:
                d, m = found
                return Structure(d.reshape(rows, groups // subs), m.reshape(rows, groups),
                                 torch.arange(groups, device=device) // subs, "two-level")
    if group_size == 16 and groups % 2 == 0 and cols % 32 == 0 and torch.equal(scales[:, 0::2], scales[:, 1::2]):
        return Structure(scales[:, 0::2].clone(), torch.ones_like(scales),
                         torch.arange(groups, device=device) // 2, "pairs")
    return Structure(scales.clone(), torch.ones_like(scales), torch.arange(groups, device=device), "groups")


def round_steps(step: torch.Tensor, top_multiplier: torch.Tensor) -> torch.Tensor:
    """``step`` rounded to the nearest value whose products with every integer multiplier up to
    ``top_multiplier`` (same shape) are float16 numbers: ``11 - bit_length(top)`` significant
    bits (a product of a b-bit and a k-bit number has at most b + k), all 11 where the only
    multiplier is 1, and a multiple of float16's smallest step 2**-24."""
    bits = FP16_BITS - (torch.floor(torch.log2(top_multiplier)) + 1)
    bits = torch.where(top_multiplier == 1, torch.full_like(bits, FP16_BITS), bits)
    step = step.float().clamp(min=FP16_TINY)
    _, exponent = torch.frexp(step)
    quantum = torch.maximum(torch.ldexp(torch.ones_like(step), exponent - bits.to(exponent.dtype)),
                            torch.full_like(step, FP16_TINY))
    rounded = torch.round(step / quantum) * quantum
    return torch.minimum(rounded.clamp(min=FP16_TINY), torch.floor(65504 / top_multiplier / quantum) * quantum)


def block_tops(structure: Structure) -> torch.Tensor:
    """The largest multiplier of each block (``[rows, blocks]``). The trained parameter is the
    block's largest scale (``step * top``), so one learning rate means the same for free groups
    and k-quant blocks."""
    return torch.zeros_like(structure.step).scatter_reduce(
        1, structure.block.expand(structure.multiplier.shape[0], -1), structure.multiplier, "amax",
        include_self=False)


def repeat_run(index: torch.Tensor, count: int) -> int:
    """``r`` where ``index`` is ``0, ..., 0, 1, ..., count - 1`` with each of the ``count`` values
    repeated ``r`` times in order (``arange(count * r) // r``), else 0: how scales of groups
    spread over a grid's columns, or steps of blocks over their groups, unless act-order
    permuted the groups."""
    if count <= 0 or index.numel() % count:
        return 0
    run = index.numel() // count
    return run if torch.equal(index.cpu(), torch.arange(index.numel()) // run) else 0


def spread_columns(values: torch.Tensor, index: torch.Tensor, run: int) -> torch.Tensor:
    """``values[:, index]``, with ``run = repeat_run(index, values.shape[1])``. Where the index
    repeats each column ``run`` times in order it is a broadcast, whose gradient is a sum over
    each run: on a CPU the scatter-add that indexing's gradient takes was a fifth of a whole
    training step of the reference model. Otherwise ``index_select``, whose gradient adds by
    index without sorting."""
    if run == 1:
        return values
    if run > 1:
        return values.unsqueeze(-1).expand(*values.shape, run).reshape(values.shape[0], -1)
    return values.index_select(1, index)


def reconstruction_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of a layer's output against its float target."""
    return F.mse_loss(output.float(), target.float())


def cosine_factor(step: int, total: int) -> float:
    """Cosine decay from 1 at step 0 to 0 at ``total``."""
    return 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, total))))


# --------------------------------------------------------------------------- the module


class OpenScales(nn.Module):
    """What a quantized module opened to train its scales shares: the trainable ``step`` of its
    :class:`Structure`, the scales built from it, and ``close()``, which rounds the steps
    (:func:`round_steps`) and writes the scales back into the source's storage."""

    def _open_steps(self, storage) -> None:
        self.structure = structure = scale_structure(storage.scales, storage.group_size, storage.cols)
        top = block_tops(structure)
        # buffers, so that they follow the module to another device (accelerate's prepare)
        self.register_buffer("top", top, persistent=False)
        self.register_buffer("multiplier", structure.multiplier, persistent=False)
        self.register_buffer("block", structure.block, persistent=False)
        self.block_run = repeat_run(structure.block, structure.step.shape[1])
        self.step = nn.Parameter(structure.step * top)

    def _scales(self, step: torch.Tensor) -> torch.Tensor:
        # Structure.scales, on the module's device
        return spread_columns(step, self.block, self.block_run) * self.multiplier

    def scales(self) -> torch.Tensor:
        return self._scales(self.step / self.top)

    def rounded_scales(self) -> torch.Tensor:
        """The trained scales as they will be stored: each one a float16, the structure kept."""
        scales = self._scales(round_steps(self.step.detach() / self.top, self.top))
        if not bool((scales.half().float() == scales).all()):
            raise AssertionError("rounded scales left float16")   # round_steps guarantees it
        return scales

    @torch.no_grad()
    def close(self) -> nn.Module:
        """Write the rounded scales into the source's storage (grid, zeros, g_idx unchanged)."""
        self.source.storage.scales.copy_(self.rounded_scales().to(self.source.storage.scales.dtype))
        return self.source


class ScaleLinear(OpenScales):
    """A :class:`QuantizedLinear` opened to train its scales: ``w = (q - zero) * scale`` with
    ``q - zero`` a fixed buffer and ``scale`` built from a trainable ``step`` (:class:`Structure`).
    ``close()`` rounds the steps (:func:`round_steps`) and writes the scales back into the
    source's storage."""

    def __init__(self, source: QuantizedLinear, name: str = ""):
        super().__init__()
        self.__dict__["source"] = source   # not a submodule: its buffers must not be trained or saved twice
        storage = source.storage
        groups = storage.column_groups()
        centered = storage.grid().float() - storage.zeros.float()[:, groups]
        mask = get_mask(source)
        if mask is not None and bool(centered[~mask.to(centered.device)].any()):
            raise PocketError(f"{name or 'a layer'} is pruned, but some pruned weights are not zero on its grid, "
                              "so training its scales would move them",
                              fix="quantize after pruning with a quantizer that keeps pruned weights at zero (rtn, gptq)")
        self.register_buffer("centered", centered, persistent=False)   # integers; exactly 0 where pruned
        self._open_steps(storage)
        self.register_buffer("groups", groups, persistent=False)
        self.group_run = repeat_run(groups, storage.scales.shape[1])
        self.bias = source.bias   # the same Parameter (frozen by the caller)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.centered * spread_columns(self.scales(), self.groups, self.group_run)
        return F.linear(x, weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def row_blocks(rows: int, cols: int) -> list[slice]:
    """Slices of about :data:`ROW_BLOCK` weights of a ``[rows, cols]`` matrix."""
    step = max(1, ROW_BLOCK // cols)
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def centered_integers(storage) -> torch.Tensor:
    """``q - zero`` of every weight as int8 (int16 for 8 bits, whose differences reach 255),
    unpacked a block of rows at a time: a quarter of the float32 matrix, and no full-size int64
    temporaries of the unpacking."""
    dtype = torch.int8 if storage.bits < 8 else torch.int16
    centered = torch.empty(storage.rows, storage.cols, dtype=dtype, device=storage.qweight.device)
    groups = storage.column_groups()
    for rows in row_blocks(storage.rows, storage.cols):
        index = torch.arange(rows.start, rows.stop, device=storage.qweight.device)
        zeros = storage.zeros[rows].to(torch.int16)[:, groups]
        centered[rows] = (storage.grid(index).to(torch.int16) - zeros).to(dtype)
    return centered


def weight_rows(centered: torch.Tensor, scales: torch.Tensor, groups: torch.Tensor, rows: slice,
                dtype: torch.dtype, run: int = 0) -> torch.Tensor:
    """Rows ``rows`` of the weight ``(q - zero) * scale``, in ``dtype``; ``run`` as
    :func:`spread_columns` takes it."""
    return (centered[rows].float() * spread_columns(scales[rows], groups, run)).to(dtype)


class TiedLogits(torch.autograd.Function):
    """``x @ W.T`` for the tied head's ``W = (q - zero) * scale`` ``[vocab, hidden]``, with the
    gradient of the scales. ``W`` is built a block of :data:`ROW_BLOCK` weights at a time, in the
    forward pass and again in the backward pass, and never kept: autograd on the plain product
    would hold a float copy of ``(q - zero)`` and of ``W`` from the forward to the backward pass,
    and make a third (the weight's gradient) there."""

    @staticmethod
    def forward(ctx, x, scales, centered, groups, run):
        ctx.save_for_backward(x, scales)
        ctx.centered, ctx.groups, ctx.run = centered, groups, run
        ctx.autocast = autocast_state(x.device.type)
        out = x.new_empty(*x.shape[:-1], centered.shape[0])
        for rows in row_blocks(*centered.shape):
            out[..., rows] = x @ weight_rows(centered, scales, groups, rows, x.dtype, run).T
        return out

    @staticmethod
    def backward(ctx, grad):
        x, scales = ctx.saved_tensors
        centered, groups, run = ctx.centered, ctx.groups, ctx.run
        flat_x, flat_grad = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
        grad_x = torch.zeros_like(flat_x, dtype=torch.float32) if ctx.needs_input_grad[0] else None
        grad_scales = torch.zeros_like(scales) if ctx.needs_input_grad[1] else None
        cast = contextlib.nullcontext() if ctx.autocast is None else torch.autocast(x.device.type, dtype=ctx.autocast)
        with cast:   # the products in the forward pass's precision
            for rows in row_blocks(*centered.shape):
                block = flat_grad[:, rows]
                if grad_x is not None:   # summed in float32
                    grad_x += (block @ weight_rows(centered, scales, groups, rows, x.dtype, run)).float()
                if grad_scales is not None:   # dL/dscale[r, g] = sum over the group's columns of dL/dW * (q - zero)
                    grad_weight = (block.T @ flat_x).float() * centered[rows].float()
                    grad_scales[rows] = torch.zeros_like(grad_scales[rows]).index_add_(1, groups, grad_weight)
        return None if grad_x is None else grad_x.to(x.dtype).view_as(x), grad_scales, None, None, None


def autocast_state(device_type: str) -> torch.dtype | None:
    """The dtype ``torch.autocast`` computes in now on ``device_type``, None where it is off (or
    the device has none): a custom backward pass runs outside the forward pass's autocast unless
    it sets it again."""
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


class ScaleEmbedding(OpenScales):
    """A :class:`QuantizedEmbedding` opened to train its scales, with the structure rules of
    :class:`ScaleLinear`. The lookup builds only the rows it reads; a tied head
    (:meth:`tied_head`) reads the same ``step``, so embedding and head train one set of scales.

    Memory: ``q - zero`` is kept as int8 (a quarter of the float32 ``[vocab, hidden]`` matrix;
    int16 at 8 bits), the steps and their AdamW state are one float per group, and the head
    builds its float weight a block at a time (:class:`TiedLogits`): no float copy of the whole
    matrix is made or kept beyond the logits the head returns anyway."""

    def __init__(self, source: QuantizedEmbedding, name: str = ""):
        super().__init__()
        self.__dict__["source"] = source   # not a submodule: its buffers must not be trained or saved twice
        self.embedding_dim = source.embedding_dim
        storage = source.storage
        self.register_buffer("centered", centered_integers(storage), persistent=False)
        self._open_steps(storage)
        self.register_buffer("groups", storage.column_groups(), persistent=False)
        self.group_run = repeat_run(self.groups, storage.scales.shape[1])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        unique, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
        scales = spread_columns(self.scales().index_select(0, unique), self.groups, self.group_run)
        rows = self.centered[unique].float() * scales
        return rows[inverse].view(*ids.shape, self.embedding_dim)

    def tied_head(self, source: QuantizedLinear) -> "ScaleHead":
        return ScaleHead(source, self)


class ScaleHead(nn.Module):
    """The head tied to a :class:`ScaleEmbedding`: its logits read the embedding's scales (one
    shared parameter). It owns nothing; ``close()`` gives back the source head, whose storage
    is the embedding's (written by the embedding's ``close()``)."""

    def __init__(self, source: QuantizedLinear, embedding: ScaleEmbedding):
        super().__init__()
        self.__dict__["source"] = source
        self.__dict__["embedding"] = embedding   # not a submodule: the embedding's step is registered once
        self.bias = source.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        embedding = self.embedding
        logits = TiedLogits.apply(x, embedding.scales(), embedding.centered, embedding.groups, embedding.group_run)
        return logits if self.bias is None else logits + self.bias.to(logits.dtype)

    def close(self) -> QuantizedLinear:
        return self.source


def open_scales(model: nn.Module, names: list[str]) -> dict[str, ScaleLinear]:
    """Replace the quantized linears ``names`` of ``model`` with :class:`ScaleLinear`."""
    opened = {}
    for name in names:
        opened[name] = ScaleLinear(get_module(model, name), name)
        set_module(model, name, opened[name])
    return opened


def trainable_quantized(model: nn.Module, targets: list[str], ignore: list[str], prefix: str = "") -> list[str]:
    """Names (relative to ``model``) of its quantized linears whose scales may train: those
    ``targets`` match and ``ignore`` does not, except a head tied to a quantized embedding."""
    tied = tied_heads(model)
    return [name for name, module in model.named_modules()
            if isinstance(module, QuantizedLinear) and name not in tied
            and matches(prefix + name, targets) and not matches(prefix + name, ignore)]


def open_embedding_scales(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    """Replace the quantized embeddings ``names`` of ``model`` with :class:`ScaleEmbedding`, and
    the heads tied to them with :class:`ScaleHead`; returns both, by name (embeddings first)."""
    heads = tied_heads(model)
    opened: dict[str, nn.Module] = {}
    for name in names:
        opened[name] = ScaleEmbedding(get_module(model, name), name)
        set_module(model, name, opened[name])
    for head, owner in heads.items():
        if owner in names:
            opened[head] = opened[owner].tied_head(get_module(model, head))
            set_module(model, head, opened[head])
    return opened


def trainable_embeddings(model: nn.Module, targets: list[str], ignore: list[str]) -> list[str]:
    """Names of ``model``'s quantized embeddings whose scales may train: selected by their name,
    the name of a head tied to them, or the alias ``"embed"`` in ``targets`` (``"*"`` selects
    them), and none of those names in ``ignore``: ignoring a tied head keeps its embedding's
    scales too, as they are one grid."""
    heads = tied_heads(model)
    chosen = []
    for name, module in model.named_modules():
        if not isinstance(module, QuantizedEmbedding):
            continue
        names = [name] + [head for head, owner in heads.items() if owner == name]
        if EMBED_ALIAS in ignore or any(matches(n, ignore) for n in names):
            continue
        if EMBED_ALIAS in targets or any(matches(n, targets) for n in names):
            chosen.append(name)
    return chosen


# --------------------------------------------------------------------------- block phase


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def train_block(layer: nn.Module, opened: dict[str, ScaleLinear], batches: list[tuple[torch.Tensor, dict]],
                targets: list[torch.Tensor], *, epochs: int, lr: float, seed: int) -> tuple[float, float]:
    """Train the ``opened`` layers' steps so that ``layer(hidden, **kwargs)`` matches ``targets``
    (one per micro-batch), AdamW at peak ``lr`` with a cosine decay over ``epochs`` passes in a
    seeded order, then close them (rounded scales). Returns the mean error before and after."""
    def error() -> float:
        with torch.no_grad():
            return sum(reconstruction_error(_hidden(layer(h, **kw)), t).item()
                       for (h, kw), t in zip(batches, targets)) / len(batches)

    before = error()
    flags = {p: p.requires_grad for p in layer.parameters()}
    for parameter in flags:
        parameter.requires_grad_(False)   # only the steps train: no gradient is computed for the rest
    steps = [module.step for module in opened.values()]
    for step in steps:
        step.requires_grad_(True)
    optimizer = torch.optim.AdamW(steps, lr=lr, betas=(0.9, 0.999), weight_decay=0.0, foreach=False)
    total = epochs * len(batches)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: cosine_factor(i, total))
    generator = torch.Generator().manual_seed(seed)
    try:
        for _ in range(epochs):
            for index in torch.randperm(len(batches), generator=generator).tolist():
                hidden, kwargs = batches[index]
                loss = reconstruction_error(_hidden(layer(hidden, **kwargs)), targets[index])
                loss.backward()
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
    finally:
        for parameter, flag in flags.items():
            parameter.requires_grad_(flag)
    for module in opened.values():
        module.close()
    return before, error()


class BlockRecovery(LayerHandler):
    """The walker's handler of the block phase: for each decoder layer, the layer's inputs are
    collected (``observe``), the original layer is run on the original model's hidden states to
    make the targets, and the layer's scales are trained (``solve``)."""

    def __init__(self, model: nn.Module, teacher: nn.Module, options: QATOptions, context, windows: torch.Tensor,
                 batch_size: int, seed: int, state_path: Path | None, fingerprint: str):
        self.model, self.teacher, self.options, self.context = model, teacher, options, context
        self.architecture = context.architecture(model)
        self.teacher_layers = decoder_layers(teacher, context.architecture(teacher))
        self.windows, self.batch_size, self.seed = windows, batch_size, seed
        self.state_path, self.fingerprint = state_path, fingerprint
        self.done: dict[int, dict[str, torch.Tensor]] = {}
        self.errors: list[dict] = []
        if state_path is not None and state_path.is_file():
            state = torch.load(state_path, map_location="cpu", weights_only=True)
            if state.get("fingerprint") == fingerprint:
                self.done, self.errors = dict(state["layers"]), list(state["errors"])
                context.log(f"qat: resuming the block phase: {len(self.done)} layer(s) restored from {state_path}")
            else:
                context.log(f"qat: ignoring {state_path}: it was written with other options")
        self.inputs: list[tuple[torch.Tensor, dict]] = []
        self.teacher_hidden: list[torch.Tensor] | None = None
        self.trained_tokens = 0

    def select(self, index, layer, names):
        return [""]   # the whole layer: its inputs and keyword arguments

    def observe(self, name, module, args, kwargs, output):
        kwargs = dict(kwargs)
        hidden = module_input(args, kwargs)
        kwargs.pop("hidden_states", None)   # the layer is called with the hidden states first
        self.inputs.append((hidden.detach(), kwargs))

    def _advance_teacher(self, index: int) -> list[torch.Tensor]:
        """The original layer ``index``'s outputs on the original model's hidden states, which
        become its next layer's inputs."""
        layer = self.teacher_layers[index]
        device = next(layer.parameters()).device
        if self.teacher_hidden is None:
            captured = capture_inputs(self.teacher, self.context.architecture(self.teacher), self.windows,
                                      self.batch_size)
            self.teacher_hidden = captured.hidden
        with torch.no_grad():
            self.teacher_hidden = [
                _hidden(layer(h.to(device), **to_device(kw, device))).detach()
                for h, (_, kw) in zip(self.teacher_hidden, self.inputs)]
        return self.teacher_hidden

    def solve(self, index, layer, names):
        targets = self._advance_teacher(index)
        prefix = f"{self.architecture.layers}.{index}."
        chosen = trainable_quantized(layer, self.options.targets, self.options.ignore, prefix)
        inputs, self.inputs = self.inputs, []
        if not chosen:
            return
        if index in self.done:     # a resumed run: this layer's trained scales, as saved
            for name in chosen:
                get_module(layer, name).storage.scales.copy_(self.done[index][name])
            return
        device = inputs[0][0].device
        micro, micro_targets = [], []
        for (hidden, kwargs), target in zip(inputs, targets):
            batch = hidden.shape[0]
            for start in range(0, batch, self.options.batch_size):
                rows = slice(start, start + self.options.batch_size)
                micro.append((hidden[rows], batch_rows(kwargs, rows, batch)))
                micro_targets.append(target[rows].to(device))
        original = {name: get_module(layer, name).storage.scales.clone() for name in chosen}
        opened = open_scales(layer, chosen)
        began = time.perf_counter()
        torch.manual_seed(self.seed + index)
        try:
            before, after = train_block(layer, opened, micro, micro_targets, epochs=self.options.epochs,
                                        lr=self.options.lr, seed=self.seed * 1000 + index)
        finally:
            for name, module in opened.items():
                set_module(layer, name, module.source)
        kept = after <= before
        if not kept:   # never worse than the quantizer left it on these windows
            for name in chosen:
                get_module(layer, name).storage.scales.copy_(original[name])
        tokens = sum(h.shape[0] * h.shape[1] for h, _ in micro) * self.options.epochs
        self.trained_tokens += tokens
        self.errors.append({"layer": index, "before": before, "after": after if kept else before,
                            "kept": kept, "tokens": tokens, "seconds": time.perf_counter() - began})
        self.context.log(f"qat: layer {index}: output error {before:.4g} -> {after:.4g}"
                         + ("" if kept else " (worse: scales put back)") + f" ({len(chosen)} linears)")
        self.done[index] = {name: get_module(layer, name).storage.scales.detach().cpu().clone() for name in chosen}
        self._save()

    def _save(self) -> None:
        if self.state_path is None or not distributed.is_writer():
            return
        state = {"fingerprint": self.fingerprint, "layers": self.done, "errors": self.errors}
        with atomic.file(self.state_path) as temporary:
            torch.save(state, temporary)


def _fingerprint(options: QATOptions, model: nn.Module, windows: torch.Tensor, seed: int) -> str:
    described = options.model_dump(exclude={"checkpoint_every"})
    for unset in ("e2e_average_last", "e2e_mixed_precision"):
        if described[unset] in (0, "no"):  # unset, they leave earlier versions' fingerprint: their states resume
            del described[unset]
    described["seed"] = seed
    described["windows"] = list(windows.shape)
    described["windows_hash"] = hashlib.sha256(windows.cpu().numpy().tobytes()).hexdigest()
    described["grids"] = [(n, list(m.storage.scales.shape)) for n, m in model.named_modules()
                          if isinstance(m, QuantizedLinear)]
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


def check_teacher(model: nn.Module, teacher: nn.Module, names: list[str]) -> None:
    """The recovery matches each layer to the original's: refuse a model whose layers an
    earlier stage reshaped."""
    from pocketlm.weights import linear_shape

    for name in names:
        try:
            original = get_module(teacher, name)
        except AttributeError:
            original = None
        if original is None or linear_shape(original) != linear_shape(get_module(model, name)):
            raise PocketError(f"qat matches each quantized layer to the original model's, but {name} has no "
                              "counterpart of the same shape there (an earlier stage removed layers or channels)",
                              fix="run qat with epochs = 0 (its end-to-end phase matches the logits only), or "
                                  "recover a restructured model with distill before quantizing")


# --------------------------------------------------------------------------- the handler


def qat(model: nn.Module, options: QATOptions, context) -> nn.Module:
    """Recover ``model``'s quantization error by training its scales; in place, returns it."""
    seed = context.seed if options.seed is None else options.seed
    names = trainable_quantized(model, options.targets, options.ignore)
    embeddings = trainable_embeddings(model, options.targets, options.ignore) if options.e2e_steps else []
    if not names and not embeddings:
        raise PocketError("qat trains the scales of quantized linears, and none of this model's match targets "
                          f"{options.targets} (ignore {options.ignore})",
                          fix="put qat after a quantize stage (rtn, gptq), and check targets and ignore")
    teacher = context.teacher()
    if options.epochs:  # the block phase pairs layers; the end-to-end phase only compares logits
        check_teacher(model, teacher, names)
    stage_dir = Path(context.stage_dir) if context.stage_dir is not None else None
    began = time.perf_counter()
    summary = {"block_tokens": 0, "block_seconds": 0.0, "e2e_tokens": 0, "e2e_seconds": 0.0}
    if options.epochs:
        windows = context.calibration_windows()
        batch_size = context.calibration.batch_size if context.calibration else 8
        state_path = stage_dir / STATE_FILE if stage_dir is not None else None
        handler = BlockRecovery(model, teacher, options, context, distributed.shard(windows), batch_size, seed,
                                state_path, _fingerprint(options, model, windows, seed))
        context.log(f"qat: block phase over {len(names)} quantized linears, {options.epochs} epoch(s) of "
                    f"{windows.shape[0]} x {windows.shape[1]} windows, micro-batches of {options.batch_size}")
        context.walk(model, handler, sequential=False, windows=windows, description="qat blocks")
        summary["block_tokens"] = sum(e["tokens"] for e in handler.errors)
        summary["block_seconds"] = sum(e["seconds"] for e in handler.errors)
        summary["layers"] = handler.errors
    if options.e2e_steps:
        from .distill import DistillOptions, distill

        e2e_began = time.perf_counter()
        # everything but the steps of the opened scales is frozen: the only parameters with new names
        frozen = [name for name, _ in model.named_parameters()]
        frozen += [f"{name}.step" for name in trainable_quantized(model, ["*"], []) if name not in names]
        frozen += [f"{name}.step" for name in trainable_embeddings(model, ["*"], []) if name not in embeddings]
        if embeddings:
            context.log(f"qat: the end-to-end phase also trains the scales of {', '.join(embeddings)} "
                        "(and of the head tied to it)")
        distill_options = DistillOptions(
            steps=options.e2e_steps, lr=options.e2e_lr, batch_size=options.e2e_batch_size, text=options.text,
            seq_len=options.seq_len, kl_weight=1.0, ce_weight=options.e2e_ce_weight, quantized="scales",
            generated_windows=options.e2e_generated_windows, generated_only=options.e2e_generated_only,
            average_last=options.e2e_average_last, mixed_precision=options.e2e_mixed_precision, freeze=frozen,
            checkpoint_every=options.checkpoint_every, seed=seed)
        distill(model, distill_options, context)
        summary["e2e_seconds"] = time.perf_counter() - e2e_began
        summary["e2e_tokens"] = options.e2e_steps * options.e2e_batch_size * (
            options.seq_len or context.calibration_windows().shape[1])
    summary["seconds"] = time.perf_counter() - began
    if stage_dir is not None and distributed.is_writer():
        stage_dir.mkdir(parents=True, exist_ok=True)
        atomic.write_text(stage_dir / "qat.json", json.dumps(summary, indent=1))
        (stage_dir / STATE_FILE).unlink(missing_ok=True)
    context.log(f"qat: done in {summary['seconds']:.0f} s ({summary['block_tokens']} block tokens, "
                f"{summary['e2e_tokens']} end-to-end tokens)")
    return model
