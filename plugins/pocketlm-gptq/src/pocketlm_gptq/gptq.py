"""GPTQ (Frantar et al., 2022): quantize a linear's columns one at a time and push each
column's rounding error onto the columns not yet quantized, weighted by the inverse Hessian of
the layer's reconstruction loss ``||W X - Q X||^2``.

* The Hessian ``H = 2/n sum x x^T`` is accumulated from the layer's real inputs, one decoder
  layer at a time, by the core layer walker (``context.walk``). With ``true_sequential`` each
  group of linears (q/k/v, o, gate/up, down) is observed after the previous group has been
  quantized, so it sees the inputs the quantized model will really give it.
* ``act_order`` processes columns by descending Hessian diagonal. Groups are *static*: each
  group's scale and zero point come from the original column order before the permutation, so
  the stored grid keeps plain group indices (``g_idx = i // group_size``) and every kernel
  reads it.
* Masks left by an earlier pruning stage are kept: a pruned weight is set to its zero point
  (so it dequantizes to exactly 0) and error compensation never writes into pruned positions.
* The output head is solved like a layer (``head = "solve"``): the walker hands over what the
  head reads after the last layer (the final norm's output), and GPTQ runs on the head with
  that Hessian. A head tied to the token embedding is one matrix, so the embedding's grid is
  the head's solution. On the reference model (4-bit, group 32) this keeps 0.973 of WikiText-2
  perplexity where rounding the shared matrix keeps 0.899: a 49,152-row head is where rounding
  costs most, and its inputs are what decide which errors matter.

Pure functions: :func:`hessian_update`, :func:`gptq_quantize`. Handler: :class:`GPTQHandler`.
Stage: :func:`compress_gptq` (method ``gptq``).
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from pocketlm.calibration import LayerHandler, module_input
from pocketlm.modules import get_module, set_module
from pocketlm.quant import (Grid, Selection, check_group_size, grid_rule, group_grid, quantize_embedding,
                            replace_with_grid, round_to_grid, select_targets)
from pocketlm.weights import QuantizedEmbedding, get_mask, linear_weight, minmax_grid

from .options import GPTQOptions
from .options import plan_gptq as plan  # noqa: F401  (kept importable from here)


# ----------------------------------------------------------------------- pure functions


def hessian_update(H: torch.Tensor | None, count: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Fold a batch of inputs ``x`` (``[..., in]``) into the running ``H = 2/n sum x x^T``.
    Returns the new ``(H, n)``; start from ``(None, 0)``."""
    x = x.reshape(-1, x.shape[-1]).float()
    m = x.shape[0]
    if H is None:
        H = torch.zeros(x.shape[1], x.shape[1], device=x.device)
    H.mul_(count / (count + m))
    add_gram(H, x * math.sqrt(2 / (count + m)))
    return H, count + m


def add_gram(H: torch.Tensor, x: torch.Tensor, blocks: int = 4) -> None:
    """``H += x^T x`` (``x``: ``[n, cols]``), computing each off-diagonal block once.

    ``H`` is symmetric, so a row of column blocks only needs the columns from its diagonal block
    on; the blocks below are copied from above. With 4 blocks that is 5/8 of the full product
    (the down_proj Hessian of a 1536-wide MLP over 16k tokens is 77 GFLOP in full)."""
    cols = x.shape[1]
    blocks = min(blocks, cols // 256)       # narrower blocks make slower matmuls
    if blocks < 2:
        H.addmm_(x.t(), x)
        return
    size = -(-cols // blocks)
    for start in range(0, cols, size):
        end = min(start + size, cols)
        H[start:end, start:].addmm_(x[:, start:end].t(), x[:, start:])
        H[end:, start:end] = H[start:end, end:].t()


def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) I)^-1``, damping harder if needed.
    Frees ``H``'s memory (see :func:`_release`): the caller hands it over.

    One factorization and one triangular inverse instead of factor, invert, factor again: with
    ``J`` the reversal, ``J H J = M M^T`` gives ``H = R R^T`` for the upper ``R = J M J``, so
    ``H^-1 = R^-T R^-1`` and ``U = R^-1`` (upper, positive diagonal: the Cholesky factor).
    At most two ``[cols, cols]`` matrices are alive at once: for a 5632-wide down_proj each is
    127 MB, and the solve's peak is the layer's peak."""
    mean_diag = torch.mean(torch.diag(H))
    flipped = H.flip(0, 1)
    _release(H)
    added = 0.0
    for factor in (1, 10, 100, 1000):
        flipped.diagonal().add_(damp * factor * mean_diag - added)   # anti-diagonal of H: flip commutes
        added = damp * factor * mean_diag
        M, info = torch.linalg.cholesky_ex(flipped)
        if info != 0:
            continue
        del flipped
        R = M.flip(0, 1)
        del M
        U = torch.eye(R.shape[0], device=R.device)
        torch.linalg.solve_triangular(R, U, upper=True, out=U)   # in place: no third matrix
        if torch.isfinite(U).all():
            return U
        del U
        flipped = (R @ R.t()).flip(0, 1)   # the damped Hessian again, to damp harder
    raise RuntimeError("the Hessian is not positive definite even with 1000x damping")


def _release(tensor: torch.Tensor) -> None:
    """Free a handed-over tensor's memory now. Dropping our name is not enough: the caller's
    frame keeps the object alive for the whole call, so point the object at an empty storage."""
    tensor.set_()


@contextlib.contextmanager
def _one_thread():
    """The solve is many small ops and a few small factorizations (a 1536-wide Cholesky is about
    a GFLOP): extra threads only add synchronisation, which on a busy machine costs 10x. (Sweeping
    slices of rows in Python threads was measured too: the GIL makes it 1.4x to 1.8x slower.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                  damp: float = 0.01, block_size: int = 128, act_order: bool = False,
                  mask: torch.Tensor | None = None, fit=None, own_hessian: bool = False):
    """Quantize ``W`` (``[rows, cols]``) given the input Hessian ``H`` (``[cols, cols]``).

    Returns ``(q, scales, zeros, g_idx)``: integer grid ``q`` ``[rows, cols]`` in the original
    column order, ``scales``/``zeros`` ``[rows, groups]`` and ``g_idx`` (always None: groups are
    plain, ``column // group_size``, also with ``act_order``). ``mask`` (True = kept) pins pruned
    weights to the zero point and keeps the error compensation out of them.
    ``fit`` is a grid rule's ``fit`` (None: min-max): its grids are fitted once, before the sweep,
    from the original weights with the Hessian diagonal (the mean squared input, times 2) as the
    importance of each column, and so are static like act-order's. ``own_hessian`` hands ``H``
    and ``W`` over: ``W`` is changed in place instead of copied and ``H`` is emptied (its memory
    freed) once it is factorized, so a wide layer's solve holds two ``[cols, cols]`` matrices."""
    W = W.detach().float() if own_hessian and W.dtype == torch.float32 else W.detach().clone().float()
    # an owned float32 Hessian is used as the very object the caller passed, so that it is freed
    # as soon as it is factorized (see _release); anything else is copied first
    H = H if own_hessian and H.dtype == torch.float32 and not H.requires_grad else H.detach().clone().float()
    rows, cols = W.shape
    keep = None if mask is None else mask.to(torch.bool).clone()
    if keep is not None:
        W *= keep
    dead = torch.diag(H) == 0              # inputs that were always zero carry no information
    H[dead, dead] = 1
    W[:, dead] = 0

    size = cols if group_size == -1 else group_size
    n_groups = math.ceil(cols / size)
    # grids and the result are held transposed ([groups, rows], [cols, rows]) so that what the
    # column loop reads and writes is contiguous
    scales = torch.zeros(n_groups, rows, device=W.device)
    zeros = torch.zeros(n_groups, rows, device=W.device)
    if fit is not None:                    # a grid rule's grids are fitted once, on the whole matrix
        static_scales, static_zeros = fit(W, bits, group_size, symmetric, torch.diag(H))
        scales, zeros = static_scales.t().contiguous(), static_zeros.t().contiguous()
        ready = [True] * n_groups
    elif act_order or group_size == -1:    # static groups: from the original column order
        static_scales, static_zeros = group_grid(W, bits, group_size, symmetric)
        scales, zeros = static_scales.t().contiguous(), static_zeros.t().contiguous()
        ready = [True] * n_groups
    else:                                  # groups fixed when quantization reaches them
        ready = [False] * n_groups

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols, device=W.device)
    if act_order:                          # (the identity permutation would only copy H twice)
        rows_permuted = H[perm]
        _release(H)                        # two [cols, cols] matrices at a time, not three
        W, H = W[:, perm], rows_permuted[:, perm]
        del rows_permuted
        keep = None if keep is None else keep[:, perm]
    group_of = (perm // size).tolist()     # group of each (permuted) column
    U = _inverse_cholesky(H, damp)        # factorizations use every thread, the sweep only one
    Q = torch.zeros(cols, rows, device=W.device)
    with _one_thread():
        _sweep_blocks(W, U, Q, scales, zeros, ready, group_of, keep, block_size, size, bits, symmetric)
    Q = Q.t()[:, torch.argsort(perm)] if act_order else Q.t()
    return Q.to(torch.int32), scales.t().contiguous(), zeros.t().contiguous(), None


def _sweep_blocks(W, U, Q, scales, zeros, ready, group_of, keep, block_size, size, bits, symmetric):
    """The lazy-batch loop: sweep each block of columns, then push its accumulated error onto
    all later columns at once (one matmul per block instead of one rank-1 update per column)."""
    cols = W.shape[1]
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        # the block is held transposed ([columns, rows]) so each column and each update is contiguous
        W1 = W[:, start:end].t().contiguous()
        E1 = torch.zeros_like(W1)
        U1 = U[start:end, start:end]
        keep1 = None if keep is None else keep[:, start:end].t().contiguous()
        _sweep(W, W1, E1, U1, Q, scales, zeros, ready, group_of, keep1, start, end, size, bits, symmetric)
        W[:, start:end] = W1.t()
        if end < cols:
            W[:, end:].addmm_(E1.t(), U[start:end, end:], alpha=-1)
            if keep is not None:
                W[:, end:] *= keep[:, end:]


def _sweep(W, W1, E1, U1, Q, scales, zeros, ready, group_of, keep1, start, end, size, bits, symmetric):
    """Quantize columns ``start:end`` one by one, spreading each column's error over the block's
    later columns. ``W1``/``E1``/``keep1`` are the block and ``Q``/``scales``/``zeros`` the
    results, all transposed (``[columns or groups, rows]``). The loop is a few hundred
    microseconds of small ops per column, so rows are taken as views once per block and results
    are written in place (``out=``) rather than copied."""
    maxq = 2**bits - 1
    diagonal = U1.diagonal().tolist()
    w_rows, e_rows, u_rows, q_rows = W1.unbind(0), E1.unbind(0), U1.unbind(0), Q[start:end].unbind(0)
    for i in range(end - start):
        group = group_of[start + i]
        if not ready[group]:           # natural order: the group begins at this column
            current = torch.cat([W1[i:].t(), W[:, end:]], 1)[:, :size]  # up-to-date columns
            scale, zero = minmax_grid(current, bits, symmetric)
            scales[group], zeros[group] = scale[:, 0], zero[:, 0]
            ready[group] = True
        w, scale, zero, q, error = w_rows[i], scales[group], zeros[group], q_rows[i], e_rows[i]
        torch.div(w, scale, out=q).round_().add_(zero).clamp_(0, maxq)
        if keep1 is not None:
            q.copy_(torch.where(keep1[i], q, zero))
        torch.sub(w, (q - zero).mul_(scale), out=error).div_(diagonal[i])
        W1[i:].addr_(u_rows[i][i:], error, alpha=-1)
        if keep1 is not None:
            W1[i:] *= keep1[i:]


# ------------------------------------------------------------------------------ handler


class GPTQHandler(LayerHandler):
    """Layer-walker handler: accumulate each selected linear's Hessian in ``observe``; in
    ``solve`` run :func:`gptq_quantize`, put a ``QuantizedLinear`` in place and free the Hessian.
    Linears of a group that read the same input tensor (q/k/v, gate/up) share one Hessian."""

    changes_only_selected = True   # solve touches only the linears it is given (walker may replay)
    observes_outputs = False       # a Hessian needs only inputs: the walker may skip running them
    layers_independent = True      # nothing carries from one layer to the next: a stage may resume mid-walk

    def __init__(self, layers_path: str, selected: dict[str, nn.Module], options: GPTQOptions, fit=None,
                 context=None, head=None):
        self.head = head                          # solve_head's work, given the head's Hessian (None: no head)
        self.head_hessian: list | None = None     # [H, n] of the head's inputs
        self.options = options
        self.fit = fit
        self.context = context                    # sums the Hessians of a data-parallel run
        self.layers_path = layers_path
        self.selected = selected
        self.hessians: dict[str, list] = {}       # owner name -> [H, n]
        self.owner: dict[str, str] = {}           # linear name -> name whose Hessian it reads
        self._last: tuple | None = None           # (input tensor, owner) of the latest call

    def _full(self, index: int, name: str) -> str:
        return f"{self.layers_path}.{index}.{name}"

    def select(self, index, layer, names):
        return [n for n in names if self._full(index, n) in self.selected]

    def observe(self, name, module, args, kwargs, output):
        x = module_input(args, kwargs)
        if self._last is not None and self._last[0] is x:
            self.owner[name] = self._last[1]      # same input as the previous linear
            return
        self.owner[name] = name
        H, n = self.hessians.get(name, (None, 0))
        self.hessians[name] = list(hessian_update(H, n, x))
        self._last = (x, name)

    def solve(self, index, layer, names):
        """Quantize the group. Linears sharing a Hessian are stacked row-wise and quantized in
        one call: GPTQ treats rows independently given H, so this is the same result with a
        third of the column loop for q/k/v."""
        self._last = None
        o = self.options
        by_owner: dict[str, list[str]] = {}
        for name in names:
            by_owner.setdefault(self.owner[name], []).append(name)
        for owner, members in by_owner.items():
            modules = [get_module(layer, n) for n in members]
            weights = [linear_weight(m) for m in modules]
            masks = [get_mask(m) for m in modules]
            mask = None
            if any(m is not None for m in masks):
                mask = torch.cat([torch.ones_like(w, dtype=torch.bool) if m is None else m
                                  for w, m in zip(weights, masks)])
            q, scales, zeros, _ = gptq_quantize(torch.cat(weights), self._summed(*self.hessians.pop(owner)), o.bits,
                                                o.group_size, o.symmetric, o.damp, o.block_size, o.act_order, mask,
                                                self.fit, own_hessian=True)
            start = 0
            for name, weight in zip(members, weights):
                rows = slice(start, start + weight.shape[0])
                replace_with_grid(layer, name, Grid(q[rows], scales[rows], zeros[rows]), o)
                start += weight.shape[0]
        self.hessians.clear()
        self.owner.clear()

    @property
    def observes_head(self) -> bool:
        return self.head is not None

    def observe_head(self, hidden):
        self.head_hessian = list(hessian_update(*(self.head_hessian or (None, 0)), hidden))

    def solve_head(self):
        H = self._summed(*self.head_hessian)
        self.head_hessian = None
        self.head(H)

    def _summed(self, H: torch.Tensor, n: int) -> torch.Tensor:
        """The Hessian over every process's tokens in a data-parallel run: each process holds
        ``2/n_p sum x x^T`` over its own ``n_p`` tokens. In one process, ``H`` itself."""
        if getattr(self.context, "processes", 1) == 1:
            return H
        total = self.context.all_reduce_count(n, H.device)
        return self.context.all_reduce(H * n).div_(total)


# ----------------------------------------------------------------------------- the stage


def compress_gptq(model: nn.Module, options: GPTQOptions, context) -> nn.Module:
    architecture = context.architecture(model)
    selection = select_targets(model, options, architecture, "gptq")
    check_group_size(model, selection, options, "gptq")
    if options.backend == "llmcompressor":
        from .backend_llmcompressor import compress_with_llmcompressor

        return compress_with_llmcompressor(model, options, context, selection)
    rule = grid_rule(context, options.grid, options)
    fit = None if rule.name == "minmax" else rule.fit   # None: min-max, group by group as before
    head = solved_head(selection, architecture, options)
    if head != "embedding":     # an embedding tied to a solved head waits for the head's inputs
        line = quantize_embedding(model, selection, options, fit)
        if line:
            context.log(line)
    prefix = architecture.layers + "."
    in_layers = {n: m for n, m in selection.linears.items() if n.startswith(prefix)}
    def finish_head(H: torch.Tensor) -> None:
        context.log(solve_head(model, selection, H, options, fit))

    handler = GPTQHandler(architecture.layers, in_layers, options, fit, context,
                          head=None if head is None else finish_head)
    context.walk(model, handler, sequential=options.true_sequential, description="gptq")
    # Other linears outside the decoder layers see no walked inputs: round them.
    for name, module in selection.linears.items():
        if name not in in_layers and not (head == "head" and name == selection.head):
            grid = round_to_grid(linear_weight(module), options.bits, options.group_size, options.symmetric,
                                 get_mask(module), fit)
            replace_with_grid(model, name, grid, options)
            context.log(f"gptq: {name} is outside the decoder layers; rounded to nearest")
    if in_layers:   # (a stage for the embedding alone has said what it did)
        context.log(f"gptq: {len(in_layers)} linears to {options.bits} bits, group {options.group_size}"
                    f"{', act-order' if options.act_order else ''}{'' if fit is None else ', grid ' + rule.name}")
    return model


# ----------------------------------------------------------------------------- the output head


HEAD_ROWS = 16384   # head rows solved at once: GPTQ treats rows independently, so chunks bound the copies


def solved_head(selection: Selection, architecture, options: GPTQOptions) -> str | None:
    """What ``head = "solve"`` solves after the walk: ``"embedding"`` (the selected embedding, tied to
    the head), ``"head"`` (a selected untied head) or None. An encoder's masked-LM head reads a
    transform of the last layer's output, not the final norm's, so encoders keep rounding."""
    if options.head != "solve" or architecture.encoder:
        return None
    if selection.embed is not None and selection.tied:
        return "embedding"
    return "head" if selection.head in selection.linears else None


def solve_head(model: nn.Module, selection: Selection, H: torch.Tensor, options: GPTQOptions, fit=None) -> str:
    """GPTQ on the output head with ``H``, the Hessian of its inputs; a tied head's solution is the
    embedding's grid, shared by both. The solve runs where ``H`` is (the layers' device), a chunk
    of rows at a time, and the grid goes where the weight lives. Returns a line for the log."""
    tied = selection.embed is not None and selection.tied
    module = get_module(model, selection.embed if tied else selection.head)
    weight = module.weight if tied else linear_weight(module)
    mask = None if tied else get_mask(module)
    o = options
    parts = []
    for start in range(0, weight.shape[0], HEAD_ROWS):
        rows = slice(start, start + HEAD_ROWS)
        parts.append(gptq_quantize(weight[rows].to(H.device), H, o.bits, o.group_size, o.symmetric, o.damp,
                                   o.block_size, o.act_order, None if mask is None else mask[rows].to(H.device),
                                   fit))
    q, scales, zeros = (torch.cat([p[i] for p in parts]).to(weight.device) for i in range(3))
    if not tied:
        replace_with_grid(model, selection.head, Grid(q, scales, zeros), options)
        return f"gptq: {selection.head} solved with the Hessian of its inputs"
    embedding = QuantizedEmbedding.from_grid(q, scales, zeros, bits=o.bits, group_size=o.group_size,
                                             symmetric=o.symmetric, padding_idx=module.padding_idx)
    set_module(model, selection.embed, embedding)
    set_module(model, selection.head, embedding.tied_head())
    return (f"gptq: {selection.embed} and its tied {selection.head} solved as the head, with the Hessian "
            f"of its inputs (one shared {o.bits}-bit grid)")
