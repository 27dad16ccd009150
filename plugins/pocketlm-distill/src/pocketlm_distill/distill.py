"""Knowledge distillation: train the current model (the student) to match a teacher.

Loss (per token, averaged over every token of the global batch)::

    kl_weight * T^2 * KL(p_teacher(T) || p_student(T))         logits, at temperature T
  + ce_weight * CE(student, next token)                          optional, default 0
  + hidden_weight * mean_(i->j in layer_map) MSE(P_i h_i^student, h_j^teacher)   optional

``p_teacher`` is the teacher's softmax, or with several teachers the mean of their softmaxes
(the "averaged teacher" of multi-teacher KD). The T^2 factor keeps gradient magnitudes
independent of T (Hinton et al., 2015). ``P_i`` is a learned linear projection where the
student's width differs from the teacher's (trained with the student, never exported), and the
identity otherwise.

Defaults follow Minitron ("LLM Pruning and Distillation in Practice", Sreenivas et al., 2024),
which recovers pruned LLMs by logit-only KD: temperature 1, KL on logits only, AdamW with a
peak learning rate of 1e-4, linear warm-up and cosine decay to a tenth of the peak. 1e-4 is
the rate used there for continued training of an already trained model: large enough to
recover quickly, small enough not to wreck what pruning left.

What stays fixed:

* the teacher is only ever run under ``torch.no_grad`` and never handed to the optimizer;
* sparsity masks (:func:`pocketlm.weights.get_mask`): gradients at pruned positions are zeroed
  before clipping and the mask is re-applied after every optimizer step, so pruned weights are
  exactly zero throughout;
* quantized linears (:class:`pocketlm.weights.QuantizedLinear`), ``quantized="ste"`` (default):
  quantization-aware training with a straight-through estimator. The layer trains a float
  latent weight (starting at its dequantized grid); the forward pass uses the latent rounded
  onto the layer's *own* grid (scales, zero points and ``g_idx`` stay fixed), the backward
  pass treats the rounding as the identity. At the end the latent is rounded once more onto
  the same grid and written back into the same packed storage, so the layer keeps its format,
  bits and size and every exporter still reads it. ``quantized="freeze"`` keeps them as they
  are and trains the rest. Quantized embeddings and the heads tied to them are always frozen.

Training runs through :class:`accelerate.Accelerator` (model, optimizer and dataloader are
prepared; ``accelerator.backward``, ``accelerator.clip_grad_norm_``), so the same code runs on
a CPU, a GPU or several processes (``accelerate launch`` / ``torchrun``). ``batch_size`` is the
*global* micro-batch: with N processes each takes ``batch_size / N`` windows of it
(``split_batches``), so a run gives the same result for any process count.

Resumable: every ``checkpoint_every`` optimizer steps the student (and projections), the
optimizer, the scheduler, the RNG state, the step and the loss history are written atomically
to ``context.stage_dir/distill-state.pt``; a later call with the same options resumes from it
and ends with the same weights as an uninterrupted run. The loss curve is written to
``loss.csv`` and ``loss.png`` in the stage folder.

Teacher correction (``teacher_correction_steps > 0``, off by default): Minitron (Sreenivas et
al., 2024) first fine-tunes the teacher on the distillation text, because a teacher that never
saw that text pulls the student toward a distribution that does not fit it. Here a *copy* of
each teacher is trained with next-token cross-entropy for that many optimizer steps (same
batches, in the same order, as the student's first steps; AdamW, warm-up and cosine, clipping,
through the same accelerator) and then distilled from; the teacher passed in is never changed.
Cost: one CE training step on the teacher (forward and backward, plus its AdamW state in
memory) per correction step. With checkpoints on, each corrected teacher is saved to
``distill-teacher-{i}.safetensors`` in the stage folder and reused by a resumed run.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import model_validator
from torch import nn

from pocketlm import Options, PocketError, data, require_whole_model
from pocketlm.modules import matches, set_module
from pocketlm.weights import (
    QuantizedEmbedding,
    QuantizedLinear,
    fake_quantize,
    get_mask,
    is_transposed,
    quantize,
)

STATE_FILE = "distill-state.pt"
TEACHER_FILE = "distill-teacher-{}.safetensors"  # a corrected teacher, by its index


class DistillOptions(Options):
    """Options of ``distill``."""

    teacher: str | None = None          # a model source; None: the model before the first stage
    teachers: list[str] | None = None   # several sources: their probabilities are averaged
    text: str | None = None             # training text; None: the recipe's calibration text
    seq_len: int | None = None          # None: the calibration seq_len, else 512
    steps: int | None = None            # optimizer steps ...
    tokens: int | None = None           # ... or a token budget (exactly one of the two)
    batch_size: int = 8                 # global micro-batch (windows), split over processes
    grad_accum: int = 1                 # micro-batches per optimizer step
    lr: float = 1e-4                    # Minitron's peak rate for KD recovery
    min_lr_ratio: float = 0.1           # cosine decays to lr * min_lr_ratio
    warmup_steps: int | None = None     # None: 5% of the steps, at most 100
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float = 1.0          # 0 disables clipping
    temperature: float = 1.0
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    hidden_weight: float = 0.0
    layer_map: dict[str, int] | None = None  # student layer -> teacher layer, e.g. {"0": 0, "1": 2}
    quantized: Literal["ste", "freeze"] = "ste"
    freeze: list[str] = []              # parameter name patterns kept fixed (e.g. "model.embed_tokens")
    teacher_correction_steps: int = 0   # CE steps on a copy of the teacher first (Minitron); 0: off
    teacher_correction_lr: float | None = None  # peak rate of the correction; None: lr
    checkpoint_every: int = 50          # optimizer steps between resumable checkpoints; 0: never
    seed: int | None = None             # None: the recipe's seed

    @model_validator(mode="after")
    def _check(self):
        if (self.steps is None) == (self.tokens is None):
            raise ValueError("give exactly one of steps and tokens")
        if (self.steps is not None and self.steps < 1) or (self.tokens is not None and self.tokens < 1):
            raise ValueError("steps and tokens must be positive")
        if self.teacher is not None and self.teachers is not None:
            raise ValueError("give teacher or teachers, not both")
        if self.teachers is not None and len(self.teachers) == 0:
            raise ValueError("teachers must name at least one model")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("batch_size and grad_accum must be at least 1")
        if self.temperature <= 0:
            raise ValueError("temperature must be positive")
        if min(self.kl_weight, self.ce_weight, self.hidden_weight) < 0:
            raise ValueError("loss weights must be non-negative")
        if self.kl_weight + self.ce_weight + self.hidden_weight == 0:
            raise ValueError("at least one of kl_weight, ce_weight and hidden_weight must be positive")
        if self.hidden_weight > 0 and not self.layer_map:
            raise ValueError("hidden_weight needs a layer_map, e.g. {'0': 0, '1': 2}")
        if self.hidden_weight > 0 and self.teachers is not None and len(self.teachers) > 1:
            raise ValueError("the hidden-state loss needs a single teacher")
        if self.layer_map:
            for key, value in self.layer_map.items():
                if not key.isdigit() or value < 0:
                    raise ValueError(f"layer_map entries pair layer indices: {key!r}: {value!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("min_lr_ratio must lie in [0, 1]")
        if self.teacher_correction_steps < 0:
            raise ValueError(f"teacher_correction_steps must be 0 (off) or positive, "
                             f"not {self.teacher_correction_steps}")
        if self.teacher_correction_lr is not None and self.teacher_correction_lr <= 0:
            raise ValueError("teacher_correction_lr must be positive (or None: the student's lr)")
        if self.teacher_correction_steps > 0 and self.kl_weight == 0 and self.hidden_weight == 0:
            raise ValueError("teacher_correction_steps > 0 corrects the teacher, but no teacher is used "
                             "(kl_weight and hidden_weight are 0)")
        return self


# --------------------------------------------------------------------------- pure functions


def kd_loss(student_logits: torch.Tensor, teacher_logits: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """``T^2 * KL(p_t || p_s)`` per token, averaged over tokens; ``p_t`` is the mean of the
    teachers' softmaxes at temperature ``T``."""
    vocab = student_logits.shape[-1]
    log_q = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    if len(teacher_logits) == 1:
        log_p = F.log_softmax(teacher_logits[0].float().reshape(-1, vocab) / temperature, dim=-1)
    else:
        probs = torch.stack([F.softmax(t.float().reshape(-1, vocab) / temperature, dim=-1) for t in teacher_logits])
        log_p = probs.mean(0).clamp_min(1e-30).log()
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="sum") / log_q.shape[0]
    return kl * temperature**2


def ce_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, averaged over the predicted tokens."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from 1 to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def batch_order(n_windows: int, batch_size: int, count: int, seed: int) -> list[list[int]]:
    """``count`` micro-batches of window indices: epoch after epoch of seeded permutations."""
    if n_windows < batch_size:
        raise PocketError(f"the training text holds {n_windows} windows, fewer than batch_size {batch_size}",
                          fix="use a longer text, a shorter seq_len or a smaller batch_size")
    generator = torch.Generator().manual_seed(seed)
    flat: list[int] = []
    while len(flat) < count * batch_size:
        flat.extend(torch.randperm(n_windows, generator=generator, device="cpu").tolist())  # host-side indices
    return [flat[i * batch_size:(i + 1) * batch_size] for i in range(count)]


# --------------------------------------------------------------------------- modules


class STELinear(nn.Module):
    """A :class:`QuantizedLinear` opened for training: a float latent weight whose forward
    value is rounded onto the source layer's fixed grid, with a straight-through gradient."""

    def __init__(self, source: QuantizedLinear):
        super().__init__()
        self.__dict__["source"] = source  # not a submodule: its buffers must not be trained or saved twice
        self.weight = nn.Parameter(source.dequantize().clone())
        self.bias = source.bias  # the same Parameter: trained in place
        groups = source.storage.column_groups()
        self.register_buffer("scale", source.storage.scales.float()[:, groups], persistent=False)
        self.register_buffer("zero", source.storage.zeros.float()[:, groups], persistent=False)
        self.bits = source.bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latent = self.weight
        rounded = fake_quantize(latent, self.scale, self.zero, self.bits)
        weight = latent + (rounded - latent).detach()
        return F.linear(x, weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def close(self) -> QuantizedLinear:
        """Round the latent onto the source grid, write it into the source's storage, return it."""
        storage = self.source.storage
        q = quantize(self.weight.float().cpu(), self.scale.cpu(), self.zero.cpu(), self.bits).to(torch.int64)
        storage.set_grid(q, storage.scales.clone(), storage.zeros.clone(),
                         None if storage.g_idx is None else storage.g_idx.clone())
        return self.source


class Student(nn.Module):
    """The student and the hidden-state projections, as one module for ``accelerator.prepare``."""

    def __init__(self, model: nn.Module, layer_map: dict[int, int], projections: nn.ModuleDict):
        super().__init__()
        self.model = model
        self.projections = projections
        self.layer_map = layer_map

    def forward(self, input_ids: torch.Tensor, teacher_hidden: tuple[torch.Tensor, ...] | None = None):
        output = self.model(input_ids=input_ids, use_cache=False, output_hidden_states=teacher_hidden is not None)
        if teacher_hidden is None:
            return output.logits, None
        losses = []
        for i, j in self.layer_map.items():
            hidden = output.hidden_states[i + 1]  # [0] is the embedding output
            if str(i) in self.projections:
                hidden = self.projections[str(i)](hidden)
            losses.append(F.mse_loss(hidden.float(), teacher_hidden[j + 1].float()))
        return output.logits, torch.stack(losses).mean()


class _Windows(torch.utils.data.Dataset):
    def __init__(self, windows: torch.Tensor):
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.windows[index]


class _FixedBatches:
    """A batch sampler that replays a precomputed list of batches (resumable, deterministic)."""

    def __init__(self, batches: list[list[int]], batch_size: int):
        self.batches, self.batch_size, self.drop_last = batches, batch_size, True

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


# --------------------------------------------------------------------------- pieces of the handler


def training_windows(options: DistillOptions, context) -> torch.Tensor:
    """The token windows to train on, ``[n, seq_len]``."""
    spec = context.calibration
    seq_len = options.seq_len or (spec.seq_len if spec is not None else 512)
    path = None
    if options.text is not None:
        path = data.resolve_text(options.text)
    elif spec is not None and spec.text is not None:
        path = data.resolve_text(str(spec.text)) if str(spec.text).startswith(data.BUILTIN_PREFIX) else Path(spec.text)
    if path is not None:
        if context.tokenizer is None:
            raise PocketError("distill needs a tokenizer to read its training text")
        if not Path(path).is_file():
            raise PocketError(f"the training text {path} does not exist")
        return data.windows(data.tokenize(context.tokenizer, Path(path)), seq_len)
    windows = context.calibration_windows()  # a context without text: its calibration windows
    if options.seq_len is not None and options.seq_len != windows.shape[1]:
        windows = data.windows(windows.reshape(-1), options.seq_len)
    return windows


def load_teachers(options: DistillOptions, context) -> list[nn.Module]:
    sources = options.teachers or ([options.teacher] if options.teacher else [])
    if not sources:
        return [context.teacher()]
    teachers = []
    for source in sources:
        teacher = context.load_model(source).model
        teacher.eval()
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)
        teachers.append(teacher)
    return teachers


def open_quantized(model: nn.Module, mode: str) -> dict[str, STELinear]:
    """Replace trainable quantized linears with :class:`STELinear` (``mode="ste"``)."""
    tied = {id(m.storage) for m in model.modules() if isinstance(m, QuantizedEmbedding)}
    opened = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear) and id(module.storage) not in tied and mode == "ste":
            opened[name] = STELinear(module)
            set_module(model, name, opened[name])
    return opened


def mask_pairs(model: nn.Module, opened: dict[str, STELinear]) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(parameter, kept-mask in the parameter's layout) for every masked trainable weight."""
    pairs = []
    for name, module in model.named_modules():
        if isinstance(module, STELinear):
            mask = get_mask(module.source)
            if mask is not None:
                pairs.append((module.weight, mask))
            continue
        mask = get_mask(module)
        if mask is None or isinstance(module, QuantizedLinear):
            continue
        weight = module.weight
        pairs.append((weight, mask.t() if is_transposed(module) else mask))
    return pairs


def optimizer_and_schedule(parameters: list[nn.Parameter], lr: float, warmup: int, total: int,
                           options: DistillOptions):
    """AdamW at peak rate ``lr`` with :func:`lr_factor`'s warm-up and cosine schedule."""
    optimizer = torch.optim.AdamW(parameters, lr=lr, betas=options.betas,
                                  weight_decay=options.weight_decay, foreach=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup, total, options.min_lr_ratio))
    return optimizer, scheduler


def correct_teacher(teacher: nn.Module, windows: torch.Tensor, options: DistillOptions, seed: int,
                    accelerator) -> tuple[nn.Module, list[float]]:
    """Teacher correction: a copy of ``teacher`` fine-tuned with next-token CE for
    ``options.teacher_correction_steps`` optimizer steps on the batches the student starts with.

    Returns the copy (eval mode, frozen) and its CE per step. ``teacher`` is not changed. The
    copy, its optimizer and loader go through ``accelerator.prepare``; the caller releases
    them (``accelerator.free_memory()``) before preparing anything it keeps."""
    steps, accum = options.teacher_correction_steps, options.grad_accum
    warmup = min(100, steps // 20)
    corrected = copy.deepcopy(teacher)
    corrected.train()
    for parameter in corrected.parameters():
        parameter.requires_grad_(True)
    lr = options.teacher_correction_lr if options.teacher_correction_lr is not None else options.lr
    optimizer, scheduler = optimizer_and_schedule(list(corrected.parameters()), lr, warmup, steps, options)
    order = batch_order(windows.shape[0], options.batch_size, steps * accum, seed)
    loader = torch.utils.data.DataLoader(_Windows(windows), batch_sampler=_FixedBatches(order, options.batch_size))
    torch.manual_seed(seed)  # dropout, where the teacher has any
    prepared, optimizer, loader = accelerator.prepare(corrected, optimizer, loader)
    parameters = [p for p in prepared.parameters() if p.requires_grad]
    history, running = [], torch.zeros((), device=accelerator.device)
    for index, ids in enumerate(loader):
        sync = index % accum == accum - 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(prepared):
            ce = ce_loss(prepared(input_ids=ids, use_cache=False).logits, ids)
            accelerator.backward(ce / accum)
        running += ce.detach().float() / accum
        if not sync:
            continue
        if options.max_grad_norm > 0:
            accelerator.clip_grad_norm_(parameters, options.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        mean = accelerator.reduce(running, reduction="mean") if accelerator.num_processes > 1 else running
        history.append(mean.item())
        running = torch.zeros_like(running)
    corrected = accelerator.unwrap_model(prepared)
    del prepared, optimizer, scheduler, loader
    return _frozen(corrected), history


def _frozen(model: nn.Module) -> nn.Module:
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def load_corrected(teacher: nn.Module, path: Path, fingerprint: str) -> nn.Module | None:
    """The corrected teacher saved at ``path`` by a run with the same fingerprint, else None."""
    from safetensors import safe_open
    from safetensors.torch import load_model

    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as handle:
        if (handle.metadata() or {}).get("fingerprint") != fingerprint:
            return None
    corrected = copy.deepcopy(teacher)
    load_model(corrected, path, device=str(next(teacher.parameters()).device))
    return _frozen(corrected)


def save_corrected(model: nn.Module, path: Path, fingerprint: str) -> None:
    """Atomic safetensors file of ``model`` (tied weights are stored once), tagged with the fingerprint."""
    from safetensors.torch import save_model

    _replace_atomically(path, lambda temporary: save_model(model, str(temporary), metadata={"fingerprint": fingerprint}))


def corrected_teachers(teachers: list[nn.Module], windows: torch.Tensor, options: DistillOptions, seed: int,
                       accelerator, context, fingerprint: str) -> list[nn.Module]:
    """Each teacher corrected (:func:`correct_teacher`), or loaded from the stage folder when a
    run with the same options saved it; saved there for a resume when checkpoints are on."""
    folder = Path(context.stage_dir) if context.stage_dir is not None else None
    result = []
    for index, teacher in enumerate(teachers):
        path = folder / TEACHER_FILE.format(index) if folder is not None else None
        corrected = load_corrected(teacher, path, fingerprint) if path is not None else None
        if corrected is not None:
            context.log(f"distill: teacher correction: loaded teacher {index} from {path}")
            result.append(corrected)
            continue
        corrected, history = correct_teacher(teacher, windows, options, seed, accelerator)
        context.log(f"distill: teacher correction: {len(history)} steps, CE {history[0]:.4f} -> {history[-1]:.4f}"
                    + (f" (teacher {index})" if len(teachers) > 1 else ""))
        if folder is not None and accelerator.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            _append_correction_curve(folder / "teacher-correction.csv", index, history)
            if options.checkpoint_every:
                save_corrected(corrected, path, fingerprint)
        accelerator.wait_for_everyone()
        result.append(corrected)
    return result


def _append_correction_curve(path: Path, index: int, history: list[float]) -> None:
    with open(path, "w" if index == 0 else "a", newline="") as handle:
        writer = csv.writer(handle)
        if index == 0:
            writer.writerow(["teacher", "step", "ce"])
        writer.writerows([index, step + 1, ce] for step, ce in enumerate(history))


def _fingerprint(options: DistillOptions, model: nn.Module, n_windows: int, seed: int) -> str:
    described = options.model_dump(exclude={"checkpoint_every"})
    described["seed"] = seed
    described["windows"] = n_windows
    described["params"] = [(n, list(p.shape)) for n, p in model.named_parameters()]
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


def _replace_atomically(path: Path, write) -> None:
    """``write(temporary)`` next to ``path``, then rename it into place: a resume never reads a
    half-written file, and a failed write leaves nothing behind."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_curve(history: list[dict], folder: Path) -> None:
    """``loss.csv`` and ``loss.png`` (matplotlib, Agg) of the loss history."""
    if not history:
        return
    with open(folder / "loss.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.5))
    axes = figure.add_subplot()
    steps = [row["step"] for row in history]
    axes.plot(steps, [row["loss"] for row in history], label="loss (weighted sum)")
    parts = [key for key in ("kl", "ce", "hidden") if any(row[key] != 0 for row in history)]
    if len(parts) > 1:  # with a single term the total is that term
        for key in parts:
            axes.plot(steps, [row[key] for row in history], label=key, linewidth=0.8)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    axes.set_title("distill")
    axes.legend()
    figure.tight_layout()
    figure.savefig(folder / "loss.png", dpi=100)


# --------------------------------------------------------------------------- the handler


def distill(model: nn.Module, options: DistillOptions, context) -> nn.Module:
    require_whole_model(model, "distill (training through every layer at once, with a teacher)",
                        fix='set offload = "none" in [model]; for a model larger than one machine\'s memory, '
                        "train data-parallel with accelerate launch (see the README, Big models)")
    """Distil ``model`` from its teacher(s); changes ``model`` in place and returns it."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    seed = context.seed if options.seed is None else options.seed
    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(split_batches=True))
    if options.batch_size % accelerator.num_processes:
        raise PocketError(f"batch_size {options.batch_size} does not split over {accelerator.num_processes} processes",
                          fix="make batch_size a multiple of the process count")

    windows = training_windows(options, context)
    seq_len = windows.shape[1]
    tokens_per_step = options.batch_size * options.grad_accum * seq_len
    total = options.steps if options.steps is not None else math.ceil(options.tokens / tokens_per_step)
    warmup = options.warmup_steps if options.warmup_steps is not None else min(100, total // 20)

    need_teacher = options.kl_weight > 0 or options.hidden_weight > 0
    teachers = load_teachers(options, context) if need_teacher else []  # plain CE runs no teacher
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else None
    original_device = next(model.parameters()).device
    original_flags = {name: p.requires_grad for name, p in model.named_parameters()}

    # --- the student: quantized layers opened, masks collected, projections built
    opened = open_quantized(model, options.quantized)
    torch.manual_seed(seed)
    layer_map = {int(k): v for k, v in (options.layer_map or {}).items()} if options.hidden_weight > 0 else {}
    projections = nn.ModuleDict()
    if layer_map:
        student_width, teacher_width = model.config.hidden_size, teachers[0].config.hidden_size
        student_layers = model.config.num_hidden_layers
        teacher_layers = teachers[0].config.num_hidden_layers
        for i, j in layer_map.items():
            if i >= student_layers or j >= teacher_layers:
                raise PocketError(f"layer_map pairs student layer {i} with teacher layer {j}, but they have "
                                  f"{student_layers} and {teacher_layers} layers")
            if student_width != teacher_width:
                projections[str(i)] = nn.Linear(student_width, teacher_width, bias=False)
    student = Student(model, layer_map, projections)
    for name, parameter in student.named_parameters():
        frozen = options.freeze and matches(name.removeprefix("model."), options.freeze)
        parameter.requires_grad_(not frozen)
    if options.quantized == "freeze":
        for module in model.modules():
            if isinstance(module, QuantizedLinear) and module.bias is not None:
                module.bias.requires_grad_(False)
    masked = mask_pairs(model, opened)
    with torch.no_grad():
        for parameter, mask in masked:
            parameter.mul_(mask.to(parameter.dtype))
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer, scheduler = optimizer_and_schedule(trainable, options.lr, warmup, total, options)

    # --- resume?
    state_path = Path(context.stage_dir) / STATE_FILE if context.stage_dir is not None else None
    fingerprint = _fingerprint(options, student, windows.shape[0], seed)
    state, start, history = None, 0, []
    if state_path is not None and state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state.get("fingerprint") != fingerprint:
            context.log(f"distill: ignoring {state_path}: it was written with other options")
            state = None
        else:
            start, history = int(state["step"]), list(state["history"])
            context.log(f"distill: resuming at step {start} of {total}")

    originals, teacher_devices = teachers, [next(t.parameters()).device for t in teachers]
    if options.teacher_correction_steps:
        teachers = corrected_teachers(teachers, windows, options, seed, accelerator, context, fingerprint)
        accelerator.free_memory()  # drop the corrections' prepared copies, optimizers and loaders

    order = batch_order(windows.shape[0], options.batch_size, total * options.grad_accum, seed)
    remaining = order[start * options.grad_accum:]
    loader = torch.utils.data.DataLoader(_Windows(windows), batch_sampler=_FixedBatches(remaining, options.batch_size))

    prepared, optimizer, loader = accelerator.prepare(student, optimizer, loader)
    device = accelerator.device
    teachers = [t.to(device) for t in teachers]  # a no-op on CPU; the originals are moved back at the end
    masked = [(p, m.to(device)) for p, m in masked]
    if state is not None:
        accelerator.unwrap_model(prepared).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        if torch.cuda.is_available() and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    else:
        torch.manual_seed(seed)
    prepared.train()
    context.log(f"distill: {total} steps of {tokens_per_step} tokens ({len(teachers)} teacher(s), "
                f"{sum(p.numel() for p in trainable)} trainable parameters, {len(opened)} quantized layers "
                f"trained through STE, {len(masked)} masks kept) on {accelerator.num_processes} process(es)")

    batches = iter(loader)
    with context.progress.task("distill", total) as advance:
        if start:
            advance(start)
        for step in range(start, total):
            began = time.perf_counter()
            sums = torch.zeros(4, device=device)  # loss, kl, ce, hidden
            for micro in range(options.grad_accum):
                ids = next(batches)
                sync = micro == options.grad_accum - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(prepared):
                    teacher_logits, teacher_hidden = [], None
                    if need_teacher:
                        with torch.no_grad():
                            for teacher in teachers:
                                out = teacher(input_ids=ids, use_cache=False, output_hidden_states=bool(layer_map))
                                teacher_logits.append(out.logits)
                                if layer_map:
                                    teacher_hidden = tuple(h.detach() for h in out.hidden_states)
                    logits, hidden = prepared(ids, teacher_hidden)
                    if vocab is not None and teacher_logits and teacher_logits[0].shape[-1] != logits.shape[-1]:
                        raise PocketError("the teacher's vocabulary differs from the student's")
                    kl = kd_loss(logits, teacher_logits, options.temperature) if options.kl_weight > 0 else logits.new_zeros(())
                    ce = ce_loss(logits, ids) if options.ce_weight > 0 else logits.new_zeros(())
                    hidden = hidden if hidden is not None else logits.new_zeros(())
                    loss = options.kl_weight * kl + options.ce_weight * ce + options.hidden_weight * hidden
                    accelerator.backward(loss / options.grad_accum)
                sums += torch.stack([loss.detach(), kl.detach(), ce.detach(), hidden.detach()]).float() / options.grad_accum
            for parameter, mask in masked:
                if parameter.grad is not None:
                    parameter.grad.mul_(mask.to(parameter.grad.dtype))
            if options.max_grad_norm > 0:
                accelerator.clip_grad_norm_(trainable, options.max_grad_norm)
            optimizer.step()
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for parameter, mask in masked:
                    parameter.mul_(mask.to(parameter.dtype))
            sums = accelerator.reduce(sums, reduction="mean") if accelerator.num_processes > 1 else sums
            seconds = time.perf_counter() - began
            loss_value, kl_value, ce_value, hidden_value = sums.tolist()
            history.append({"step": step + 1, "loss": loss_value, "kl": kl_value, "ce": ce_value,
                            "hidden": hidden_value, "lr": lr, "tokens": (step + 1) * tokens_per_step,
                            "seconds": seconds})
            if state_path is not None and options.checkpoint_every and (step + 1) % options.checkpoint_every == 0 \
                    and step + 1 < total:
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    state_path.parent.mkdir(parents=True, exist_ok=True)
                    rng = {"torch": torch.get_rng_state(),
                           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
                    checkpoint = {"fingerprint": fingerprint, "step": step + 1,
                                  "model": accelerator.unwrap_model(prepared).state_dict(),
                                  "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                  "rng": rng, "history": history}
                    _replace_atomically(state_path, lambda temporary: torch.save(checkpoint, temporary))
                accelerator.wait_for_everyone()
            advance(1, loss=round(loss_value, 4), tokens_per_s=round(tokens_per_step / max(seconds, 1e-9)))

    # --- close: re-round quantized layers, restore flags, write the curve, drop the resume state
    prepared.eval()
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(prepared)
    model = unwrapped.model
    for name, ste in opened.items():
        set_module(model, name, ste.close())
    accelerator.free_memory()
    model.to(original_device)
    for teacher, teacher_device in zip(originals, teacher_devices):
        teacher.to(teacher_device)
    del teachers  # corrected copies, if any, are dropped
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(original_flags.get(name, True))
    model.eval()
    if context.stage_dir is not None and accelerator.is_main_process:
        Path(context.stage_dir).mkdir(parents=True, exist_ok=True)
        write_curve(history, Path(context.stage_dir))
        if state_path is not None and state_path.exists():
            state_path.unlink()
        for index in range(len(originals)):
            (Path(context.stage_dir) / TEACHER_FILE.format(index)).unlink(missing_ok=True)
    if history:
        first, last = history[0], history[-1]
        context.log(f"distill: loss {first['loss']:.4f} -> {last['loss']:.4f} over {total} steps, "
                    f"{last['tokens']} tokens")
    return model
