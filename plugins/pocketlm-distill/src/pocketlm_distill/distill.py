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

Encoders (the BERT family, ``Architecture.encoder``) train on sentence and passage chunks (or,
``texts = "pairs"``, each paragraph's first sentence beside the rest of it, whole pairs per
micro-batch: :func:`pair_order`) with their special tokens and an attention mask instead of
causal windows, and their loss is chosen for what the model is for: pooled sentence embeddings (cosine or MSE) for a bare encoder, KL and MLM
cross-entropy on BERT-style masked positions for a masked-LM encoder, hidden states compared per
real token (cosine, as DistilBERT); optionally (``similarity_weight``) the cosine similarities
between the texts of each micro-batch against the teacher's, a relational loss for retrieval,
over the *global* micro-batch (gathered from every process, see :func:`gathered`);
``student_layers`` first cuts the student to some of the teacher's layers (DistilBERT: half of
them, spread from first to last). See :mod:`.encoder`.

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
  are and trains the rest. ``quantized="scales"`` keeps the integer grid and trains only the
  layers' scales (:class:`pocketlm_distill.recovery.ScaleLinear`, what ``qat`` uses); there a
  quantized token embedding trains its scales too, one set shared with the head tied to it
  (:class:`pocketlm_distill.recovery.ScaleEmbedding`), unless ``freeze`` names its
  ``<embedding>.step``. Under ``"ste"`` and ``"freeze"`` quantized embeddings and the heads tied
  to them stay frozen.

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

Text the teacher writes (``generated_windows > 0``, causal LMs, off by default): LLM-QAT (Liu et
al., 2023) distils on the full-precision model's own samples, so the student learns the teacher's
distribution rather than one text's. The first teacher samples that many windows
(:func:`sample_windows`), appended to the text's windows or, ``generated_only``, instead of
them; they are saved to ``distill-generated.safetensors`` in the stage folder and read back by a
resumed run, and with several processes the main process samples and broadcasts them.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import hashlib
import io
import itertools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pocketlm import PocketError, atomic, data, require_whole_model, sentence
from pocketlm.modules import decoder_layers, matches, set_module
from pocketlm.weights import (
    QuantizedLinear,
    fake_quantize,
    get_mask,
    is_transposed,
    linear_shape,
    quantize,
    tied_heads,
)

from .recovery import ScaleLinear, open_embedding_scales, open_scales, trainable_embeddings, trainable_quantized
from .encoder import (
    IGNORE,
    LENGTH_GROUPS,
    Collate,
    Examples,
    Masking,
    chosen_layers,
    embedding_loss,
    keep_layers,
    length_groups,
    masking_for,
    query_passage_pairs,
    sentence_embedding,
    similarity_loss,
    text_chunks,
    token_loss,
    tokenize_chunks,
    tokenize_pairs,
)
# the options live in the light module (registration reads them without torch)
from .options import DistillOptions

STATE_FILE = "distill-state.pt"
TEACHER_FILE = "distill-teacher-{}.safetensors"  # a corrected teacher, by its index


# --------------------------------------------------------------------------- pure functions


def bfloat16_is_native(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 natively (``mixed_precision = "auto"``): a CUDA GPU
    that supports it, or a CPU with AMX. A CPU with AVX512-BF16 alone converts, and runs the
    training steps slower in bfloat16 than in float32 (2.1 s against 1.4 s a step of a 3-layer
    MiniLM on 2 Xeon cores)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # torch's own check (private, hence the guard)
    return bool(probe()) if probe is not None else False


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


def pair_order(n_pairs: int, batch_size: int, count: int, seed: int) -> list[list[int]]:
    """``count`` micro-batches of example indices for ``texts = "pairs"``: :func:`batch_order` over
    the pairs, ``batch_size / 2`` of them a batch, each pair ``i`` as its query ``2i`` followed
    by its passage ``2i + 1``. A batch holds whole pairs; cut over processes in order, a pair
    is torn only where a process's share is odd, and the relational loss still sees it whole
    (it is computed over the gathered global batch)."""
    pairs = batch_order(n_pairs, batch_size // 2, count, seed)
    return [[index for pair in batch for index in (2 * pair, 2 * pair + 1)] for batch in pairs]


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
    """The student and the hidden-state projections, as one module for ``accelerator.prepare``.

    ``hidden_loss`` compares the mapped layers' outputs (``"mse"`` or ``"cosine"`` per token);
    ``states``: always return every layer's output (a masked-LM encoder pools its last one)."""

    def __init__(self, model: nn.Module, layer_map: dict[int, int], projections: nn.ModuleDict,
                 hidden_loss: str = "mse", states: bool = False):
        super().__init__()
        self.model = model
        self.projections = projections
        self.layer_map = layer_map
        self.hidden_loss = hidden_loss
        self.states = states

    def forward(self, inputs: dict, teacher_hidden: tuple[torch.Tensor, ...] | None = None,
                keep: torch.Tensor | None = None):
        """The model's output and the hidden-state loss against ``teacher_hidden`` over the
        tokens ``keep`` marks (None: every token; no teacher states: no loss)."""
        output = self.model(**inputs, output_hidden_states=teacher_hidden is not None or self.states)
        if teacher_hidden is None:
            return output, None
        losses = []
        for i, j in self.layer_map.items():
            hidden = output.hidden_states[i + 1]  # [0] is the embedding output
            if str(i) in self.projections:
                hidden = self.projections[str(i)](hidden)
            if self.hidden_loss == "mse" and keep is None:
                losses.append(F.mse_loss(hidden.float(), teacher_hidden[j + 1].float()))
            else:
                losses.append(token_loss(hidden, teacher_hidden[j + 1], keep, self.hidden_loss))
        return output, torch.stack(losses).mean()


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


def training_text(options: DistillOptions, context) -> Path | None:
    """The file of the training text: the ``text`` option, else the recipe's calibration text;
    None where the context only holds calibration windows."""
    spec = context.calibration
    path = None
    if options.text is not None:  # a relative path is the recipe's folder's, as [calibration] text is
        path = data.resolve_text(options.text, context.recipe_folder)
    elif spec is not None and spec.text is not None:
        path = data.resolve_text(str(spec.text)) if str(spec.text).startswith(data.BUILTIN_PREFIX) else Path(spec.text)
    if path is None:
        return None
    if context.tokenizer is None:
        raise PocketError("distill needs a tokenizer to read its training text")
    if not Path(path).is_file():
        raise PocketError(f"the training text {path} does not exist", field="text",
                          fix="give an existing text file (a relative path is taken from the recipe's folder), "
                          "or remove text to train on the calibration text")
    return Path(path)


def training_windows(options: DistillOptions, context) -> torch.Tensor:
    """The token windows to train on, ``[n, seq_len]``."""
    spec = context.calibration
    seq_len = options.seq_len or (spec.seq_len if spec is not None else 512)
    path = training_text(options, context)
    if path is not None:
        return data.windows(data.tokenize(context.tokenizer, path), seq_len)
    windows = context.calibration_windows()  # a context without text: its calibration windows
    if options.seq_len is not None and options.seq_len != windows.shape[1]:
        windows = data.windows(windows.reshape(-1), options.seq_len)
    return windows


GENERATED_FILE = "distill-generated.safetensors"


def sample_windows(model: nn.Module, count: int, seq_len: int, vocabulary: int, seed: int,
                   batch: int = 16) -> torch.Tensor:
    """``[count, seq_len]`` token windows written by ``model`` itself (LLM-QAT's data-free data),
    by the core's :func:`pocketlm.data.generate_windows`: the same windows a recipe's
    ``[calibration] generated`` gives for the same seed."""
    if not hasattr(model, "generate"):
        raise PocketError(f"generated_windows samples text from the teacher, and {type(model).__name__} "
                          "cannot generate", field="generated_windows", fix="use a transformers causal LM "
                          "as the teacher, or set generated_windows = 0")
    return data.generate_windows(model, count, seq_len, vocabulary, seed, batch)


def generated_windows(options: DistillOptions, teacher: nn.Module, seq_len: int, seed: int, context,
                      accelerator) -> torch.Tensor:
    """The ``generated_windows`` the first teacher writes (:func:`sample_windows`), read back from
    the stage folder when a run with the same settings wrote them there. The main process samples
    and every other process receives its windows, so all train on the same ones."""
    from accelerate.utils import broadcast
    from safetensors import safe_open
    from safetensors.torch import save_file

    vocabulary = teacher.get_input_embeddings().num_embeddings
    if context.tokenizer is not None:   # padded embedding rows are no token the text can hold
        vocabulary = min(vocabulary, len(context.tokenizer))
    described = json.dumps({"count": options.generated_windows, "seq_len": seq_len, "seed": seed,
                            "vocabulary": vocabulary, "teacher": options.teachers or options.teacher})
    path = Path(context.stage_dir) / GENERATED_FILE if context.stage_dir is not None else None
    if not accelerator.is_main_process:   # filled by the main process's broadcast
        windows = torch.zeros(options.generated_windows, seq_len, dtype=torch.long)
    else:
        found = None
        if path is not None and path.is_file():
            with safe_open(str(path), framework="pt") as handle:
                if (handle.metadata() or {}).get("described") == described:
                    found = handle.get_tensor("windows")
        if found is None:
            began = time.perf_counter()
            found = sample_windows(teacher, options.generated_windows, seq_len, vocabulary, seed)
            context.log(f"distill: the teacher wrote {found.shape[0]} windows of {seq_len} tokens in "
                        f"{time.perf_counter() - began:.0f} s")
            if path is not None:
                with atomic.file(path) as temporary:
                    save_file({"windows": found.contiguous()}, str(temporary), metadata={"described": described})
        else:
            context.log(f"distill: reusing the {found.shape[0]} generated windows in {path}")
        windows = found
    return broadcast(windows.to(accelerator.device), from_process=0).cpu()


def encoder_max_length(options: DistillOptions, model: nn.Module, tokenizer) -> int:
    """``seq_len``, else the sentence pipeline's ``max_seq_length``, else 256; never more than the
    model has positions for (RoBERTa's first two are taken by its padding offset)."""
    wanted = options.seq_len or sentence.pooling(model)["max_seq_length"] or 256
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions and getattr(model.config, "model_type", "") in ("roberta", "xlm-roberta"):
        positions -= 2
    limits = [wanted, positions or wanted, getattr(tokenizer, "model_max_length", None) or wanted]
    return int(min(limit for limit in limits if limit < 1_000_000))


def encoder_text(options: DistillOptions, context) -> str:
    """An encoder's training text: the training text file, or the calibration windows decoded
    back to text."""
    if context.tokenizer is None:
        raise PocketError("distill needs the model's tokenizer to train an encoder on text")
    path = training_text(options, context)
    if path is not None:
        return data.read_text(path)
    return "\n".join(context.tokenizer.decode(w, skip_special_tokens=True) for w in context.calibration_windows())


def encoder_chunks(options: DistillOptions, context, model: nn.Module, seed: int) -> list[list[int]]:
    """The tokenized training examples of an encoder for ``texts = "chunks"`` (see :mod:`.encoder`)."""
    text = encoder_text(options, context)
    max_length = encoder_max_length(options, model, context.tokenizer)
    chunks = tokenize_chunks(context.tokenizer, text_chunks(text, seed), max_length)
    if len(chunks) < options.batch_size:
        raise PocketError(f"the training text holds {len(chunks)} sentences or passages, fewer than "
                          f"batch_size {options.batch_size}", fix="use a longer text or a smaller batch_size")
    return chunks


def encoder_pairs(options: DistillOptions, context, model: nn.Module) -> list[list[int]]:
    """The tokenized (query, passage) pairs of an encoder for ``texts = "pairs"``, flattened:
    example ``2i`` is pair ``i``'s query, ``2i + 1`` its passage (:func:`~.encoder.tokenize_pairs`)."""
    text = encoder_text(options, context)
    max_length = encoder_max_length(options, model, context.tokenizer)
    pairs = query_passage_pairs(text, every_sentence=options.queries == "every")
    examples = tokenize_pairs(context.tokenizer, pairs, max_length)
    if len(examples) // 2 < options.batch_size // 2:
        raise PocketError(f"the training text holds {len(examples) // 2} (query, passage) pairs (paragraphs of "
                          f"3 or more sentences), fewer than the {options.batch_size // 2} a micro-batch of "
                          f"batch_size {options.batch_size} holds", field="texts",
                          fix="use a longer text, a smaller batch_size, or texts = 'chunks'")
    return examples


def encoder_loader(chunks: list[list[int]], order: list[list[int]], start: int, options: DistillOptions,
                   seed: int, masking: Masking | None, pad_id: int):
    """Batches of padded examples in ``order`` from micro-batch ``start`` on."""
    flat = [index for batch in order for index in batch]
    size = options.batch_size
    batches = [list(range(p, p + size)) for p in range(start * size, len(flat), size)]
    return torch.utils.data.DataLoader(Examples(chunks, flat, seed, masking),
                                       batch_sampler=_FixedBatches(batches, size), collate_fn=Collate(pad_id))


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


def open_quantized(model: nn.Module, mode: str, freeze: list[str] | None = None) -> dict[str, nn.Module]:
    """Replace trainable quantized linears with :class:`STELinear` (``mode="ste"``) or
    :class:`~pocketlm_distill.recovery.ScaleLinear` (``mode="scales"``); ``"freeze"`` opens none.
    ``"scales"`` also opens each quantized embedding whose ``<name>.step`` ``freeze`` does not
    name (:class:`~pocketlm_distill.recovery.ScaleEmbedding`), with the head tied to it."""
    if mode == "freeze":
        return {}
    if mode == "scales":
        embeddings = [name for name in trainable_embeddings(model, ["*"], [])
                      if not matches(f"{name}.step", freeze or [])]
        opened = open_scales(model, trainable_quantized(model, ["*"], []))
        return {**opened, **open_embedding_scales(model, embeddings)}
    tied = tied_heads(model)
    opened = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear) and name not in tied:
            opened[name] = STELinear(module)
            set_module(model, name, opened[name])
    return opened


def mask_pairs(model: nn.Module, opened: dict[str, nn.Module]) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(parameter, kept-mask in the parameter's layout) for every masked trainable weight (a
    :class:`~pocketlm_distill.recovery.ScaleLinear` needs none: its pruned weights are zeros of a fixed grid)."""
    pairs = []
    for name, module in model.named_modules():
        if isinstance(module, ScaleLinear):
            continue
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

    with atomic.file(path) as temporary:
        save_model(model, str(temporary), metadata={"fingerprint": fingerprint})


def save_state(path: Path, state: dict) -> None:
    """The resumable state (:meth:`Trainer.checkpoint`), written atomically: a resumed run never
    reads half of it."""
    with atomic.file(path) as temporary:
        torch.save(state, temporary)


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
            write_correction_curve(folder / "teacher-correction.csv", index, history)
            if options.checkpoint_every:
                save_corrected(corrected, path, fingerprint)
        accelerator.wait_for_everyone()
        result.append(corrected)
    return result


def write_correction_curve(path: Path, index: int, history: list[float]) -> None:
    """``teacher-correction.csv``: teacher ``index``'s CE per step after the earlier teachers' rows
    (teacher 0 starts the file), rewritten atomically."""
    earlier = path.read_bytes() if index > 0 and path.is_file() else b""
    rows = [[index, step + 1, ce] for step, ce in enumerate(history)]
    atomic.write_bytes(path, earlier + csv_text(["teacher", "step", "ce"] if not earlier else None, rows).encode())


def csv_text(header: list[str] | None, rows: list[list]) -> str:
    """What ``csv.writer`` writes for ``header`` (None: none) and ``rows``."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    if header is not None:
        writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _fingerprint(options: DistillOptions, model: nn.Module, n_windows: int, seed: int) -> str:
    described = options.model_dump(exclude={"checkpoint_every"})
    for unset in ("similarity_weight", "generated_windows", "generated_only", "average_last", "mixed_precision"):
        if described[unset] in (0, False, "no"):  # unset, they leave earlier versions' fingerprint: their states resume
            del described[unset]
    if options.texts == "chunks":  # the same for the default texts
        del described["texts"]
    if options.queries == "first":  # the same for the default queries
        del described["queries"]
    described["seed"] = seed
    described["windows"] = n_windows
    described["params"] = [(n, list(p.shape)) for n, p in model.named_parameters()]
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


def write_curve(history: list[dict], folder: Path) -> None:
    """``loss.csv`` and ``loss.png`` (matplotlib, Agg) of the loss history, each written atomically:
    a crash while writing leaves the previous curve whole."""
    if not history:
        return
    atomic.write_bytes(folder / "loss.csv", curve_csv(history).encode())
    atomic.write_bytes(folder / "loss.png", curve_png(history))


def curve_csv(history: list[dict]) -> str:
    """The loss history as CSV, one row per optimizer step."""
    columns = list(history[0])
    return csv_text(columns, [[row[c] for c in columns] for row in history])


def curve_png(history: list[dict]) -> bytes:
    """The loss curve (the weighted sum, and each term when there are several) as a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.5))
    axes = figure.add_subplot()
    steps = [row["step"] for row in history]
    axes.plot(steps, [row["loss"] for row in history], label="loss (weighted sum)")
    parts = [key for key in ("kl", "ce", "hidden", "embedding", "similarity")
             if any(row.get(key, 0) != 0 for row in history)]  # (a history resumed from an older run lacks similarity)
    if len(parts) > 1:  # with a single term the total is that term
        for key in parts:
            axes.plot(steps, [row.get(key, 0) for row in history], label=key, linewidth=0.8)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    axes.set_title("distill")
    axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


# --------------------------------------------------------------------------- the handler


@dataclass(frozen=True)
class Losses:
    """The loss terms a run uses, resolved from the options for the model in hand.

    ``kind``: ``"causal"`` (next-token LM), ``"masked-lm"`` (an encoder with an MLM head) or
    ``"sentence"`` (a bare encoder: sentence embeddings, no head)."""

    kind: str
    kl: float
    ce: float
    hidden: float
    embedding: float
    hidden_loss: str
    similarity: float = 0.0

    @property
    def needs_teacher(self) -> bool:
        return self.kl > 0 or self.hidden > 0 or self.embedding > 0 or self.similarity > 0

    @property
    def pooled(self) -> bool:
        """Whether a term compares pooled sentence embeddings."""
        return self.embedding > 0 or self.similarity > 0


def resolve_losses(options: DistillOptions, architecture) -> Losses:
    """The weights of each term for this model, with the encoder defaults; a term that cannot
    apply to the model is refused with the option that asked for it."""
    if not architecture.encoder:
        if options.embedding_weight:
            raise PocketError("embedding_weight compares sentence embeddings, and this causal LM makes none",
                              field="embedding_weight", fix="remove embedding_weight (it applies to encoders)")
        if options.similarity_weight:
            raise PocketError("similarity_weight compares the sentence embeddings of a batch's texts, and this "
                              "causal LM makes none", field="similarity_weight",
                              fix="remove similarity_weight (it applies to encoders)")
        if options.texts != "chunks":
            raise PocketError(f"texts = {options.texts!r} chooses the texts an encoder trains on, and this causal "
                              "LM trains on token windows of the text", field="texts",
                              fix="remove texts (it applies to encoders)")
        kind, kl, embedding = "causal", 1.0 if options.kl_weight is None else options.kl_weight, 0.0
    elif architecture.lm_head:
        kind, kl = "masked-lm", 1.0 if options.kl_weight is None else options.kl_weight
        embedding = options.embedding_weight or 0.0
    else:
        for name in ("kl_weight", "ce_weight"):
            if getattr(options, name):
                raise PocketError(f"{name} is a loss on the logits of a head, and this bare encoder has none "
                                  "(it makes sentence embeddings)", field=name,
                                  fix=f"remove {name}: a sentence encoder is distilled through embedding_weight "
                                  "(default 1), similarity_weight and hidden_weight")
        kind, kl = "sentence", 0.0
        embedding = 1.0 if options.embedding_weight is None else options.embedding_weight
    losses = Losses(kind, kl, options.ce_weight, options.hidden_weight, embedding,
                    options.hidden_loss or ("cosine" if architecture.encoder else "mse"), options.similarity_weight)
    if losses.kl + losses.ce + losses.hidden + losses.embedding + losses.similarity == 0:
        raise PocketError("every loss weight is 0 for this model, so there is nothing to train",
                          field="embedding_weight" if kind == "sentence" else "kl_weight",
                          fix="give a positive embedding_weight, similarity_weight or hidden_weight"
                          if kind == "sentence"
                          else "give a positive kl_weight, ce_weight or hidden_weight")
    if architecture.encoder and options.teacher_correction_steps:
        raise PocketError("teacher correction fine-tunes the teacher with next-token cross-entropy, which an "
                          "encoder does not predict", field="teacher_correction_steps",
                          fix="remove teacher_correction_steps for an encoder")
    return losses


def make_student_layers(model: nn.Module, teacher: nn.Module, options: DistillOptions, context) -> list[int]:
    """DistilBERT's initialisation: keep only the ``student_layers`` of a model as deep as its
    teacher (its layers are the teacher's when the teacher is the model before the recipe).
    Returns the kept indices."""
    architecture = context.architecture(model)
    depth = len(decoder_layers(model, architecture))
    teacher_depth = len(decoder_layers(teacher, context.architecture(teacher)))
    if depth != teacher_depth:
        raise PocketError(f"student_layers makes the student from a model as deep as its teacher, but this model "
                          f"has {depth} layers and the teacher {teacher_depth} (an earlier stage removed layers)",
                          field="student_layers",
                          fix="remove student_layers and pair the layers with layer_map, e.g. {'0': 0, '1': 2}")
    keep = chosen_layers(options.student_layers, depth)
    keep_layers(model, architecture, keep)
    context.log(f"distill: student made of layers {keep} of {depth}")
    return keep


def build_layer_map(options: DistillOptions, losses: Losses, kept: list[int] | None) -> dict[int, int]:
    """Student layer -> teacher layer of the hidden-state loss: the ``layer_map`` option, else the
    kept layers of ``student_layers``; empty without a hidden loss."""
    if losses.hidden == 0:
        return {}
    if options.layer_map:
        return {int(k): v for k, v in options.layer_map.items()}
    return dict(enumerate(kept or []))


def build_projections(model: nn.Module, teacher: nn.Module, layer_map: dict[int, int], context) -> nn.ModuleDict:
    """A learned linear per mapped layer where the student's width differs from the teacher's."""
    projections = nn.ModuleDict()
    if not layer_map:
        return projections
    student_width, teacher_width = model.config.hidden_size, teacher.config.hidden_size
    student_layers = len(decoder_layers(model, context.architecture(model)))
    teacher_layers = len(decoder_layers(teacher, context.architecture(teacher)))
    for i, j in layer_map.items():
        if i >= student_layers or j >= teacher_layers:
            raise PocketError(f"layer_map pairs student layer {i} with teacher layer {j}, but they have "
                              f"{student_layers} and {teacher_layers} layers")
        if student_width != teacher_width:
            projections[str(i)] = nn.Linear(student_width, teacher_width, bias=False)
    return projections


def check_embedding_widths(model: nn.Module, teachers: list[nn.Module], losses: Losses) -> None:
    if losses.embedding == 0:
        return
    for teacher in teachers:
        if teacher.config.hidden_size != model.config.hidden_size:
            raise PocketError(f"the embedding loss compares sentence embeddings, but the teacher's are "
                              f"{teacher.config.hidden_size} wide and the student's {model.config.hidden_size}",
                              field="embedding_weight",
                              fix="use a teacher of the student's width, or distil through hidden_weight and layer_map")


def causal_losses(prepared, teachers, ids, losses: Losses, layer_map, options: DistillOptions, vocab):
    """``[total, kl, ce, hidden, embedding, similarity]`` of one micro-batch of token windows (the
    last two are encoders' terms: 0)."""
    teacher_logits, teacher_hidden = [], None
    if losses.needs_teacher:
        with torch.no_grad():
            for teacher in teachers:
                out = teacher(input_ids=ids, use_cache=False, output_hidden_states=bool(layer_map))
                teacher_logits.append(out.logits)
                if layer_map:
                    teacher_hidden = tuple(h.detach() for h in out.hidden_states)
    output, hidden = prepared({"input_ids": ids, "use_cache": False}, teacher_hidden)
    logits = output.logits
    if vocab is not None and teacher_logits and teacher_logits[0].shape[-1] != logits.shape[-1]:
        raise PocketError("the teacher's vocabulary differs from the student's")
    zero = logits.new_zeros((), dtype=torch.float32)
    kl = kd_loss(logits, teacher_logits, options.temperature) if losses.kl > 0 else zero
    ce = ce_loss(logits, ids) if losses.ce > 0 else zero
    hidden = hidden if hidden is not None else zero
    total = losses.kl * kl + losses.ce * ce + losses.hidden * hidden
    return torch.stack([total, kl, ce, hidden, zero, zero])


def gathered(rows: torch.Tensor) -> torch.Tensor:
    """The rows of every process, in rank order: the whole global micro-batch (``split_batches``
    gives rank r the r-th slice of it), with autograd. ``rows`` itself on one process.

    Every process then computes the same loss L over the global batch. The backward pass of the
    gather sums the gradients all processes send back to this process's rows, N * dL/d(rows);
    DDP's average over the N processes of those parameter gradients is dL/d(parameters), what
    one process computes, so no further weighting is needed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(rows.contiguous()))


def encoder_losses(prepared, teachers, batch: dict, losses: Losses, layer_map, options: DistillOptions,
                   poolings: list[dict], shares=(1.0, 1.0), groups: int = 1):
    """``[total, kl, ce, hidden, embedding, similarity]`` of one micro-batch of padded examples:
    logits on the masked positions (masked-LM), hidden states over real tokens, pooled sentence
    embeddings, and their similarities over the global micro-batch (:func:`gathered`).
    ``poolings``: the student's pooling, then each teacher's. ``shares``: this process's masked
    and real token counts over their mean per process (see :meth:`Trainer._token_shares`); the
    per-token means are weighted by them. ``groups``: the rows run as up to this many forward
    passes of texts of similar length (:func:`~.encoder.length_groups`), each padded only to its
    own longest; the terms are those of the whole micro-batch (per-token means weighted by each
    group's tokens, the pooled embeddings put back in the batch's order)."""
    mask = batch["attention_mask"]
    parts = length_groups(mask.sum(1), groups)
    if len(parts) == 1:
        kl, ce, hidden, pooled, targets = _group_terms(prepared, teachers, batch, losses, layer_map, options, poolings)
    else:
        found = [_group_terms(prepared, teachers, {key: value[rows, :int(mask[rows].sum(1).max())]
                                                   for key, value in batch.items()},
                              losses, layer_map, options, poolings) for rows in parts]
        predicted = [(batch["labels"][rows] != IGNORE).sum() for rows in parts] if "labels" in batch else None
        real = [mask[rows].sum() for rows in parts]
        kl = _weighted([group[0] for group in found], predicted)
        ce = _weighted([group[1] for group in found], predicted)
        hidden = _weighted([group[2] for group in found], real)
        back = torch.argsort(torch.cat(parts))  # row i of the concatenated groups is batch row cat(parts)[i]
        pooled = torch.cat([group[3] for group in found])[back] if losses.pooled else None
        targets = [torch.cat([group[4][t] for group in found])[back] for t in range(len(teachers))] \
            if losses.pooled else None
    zero = mask.new_zeros((), dtype=torch.float32)
    embedding = similarity = zero
    if losses.pooled:
        if losses.embedding > 0:
            embedding = embedding_loss(pooled, targets, options.embedding_loss)
        if losses.similarity > 0:
            similarity = similarity_loss(gathered(pooled), [gathered(t) for t in targets])
    masked_share, real_share = shares
    kl, ce, hidden = kl * masked_share, ce * masked_share, hidden * real_share
    total = losses.kl * kl + losses.ce * ce + losses.hidden * hidden + losses.embedding * embedding
    if losses.similarity > 0:  # (a branch, not a term times 0: runs without it stay bit for bit the same)
        total = total + losses.similarity * similarity
    return torch.stack([total, kl, ce, hidden, embedding, similarity])


def _group_terms(prepared, teachers, batch: dict, losses: Losses, layer_map, options: DistillOptions,
                 poolings: list[dict]):
    """The forward passes over one group of rows: (kl, ce, hidden) as means over the group's
    predicted positions and real tokens, and the student's and each teacher's pooled embeddings
    (None where no term pools)."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    keep = batch["attention_mask"]
    states = bool(layer_map) or (losses.pooled and losses.kind == "masked-lm")
    with torch.no_grad():
        outs = [teacher(**inputs, output_hidden_states=states) for teacher in teachers]
    teacher_hidden = tuple(h.detach() for h in outs[0].hidden_states) if layer_map else None
    output, hidden = prepared(inputs, teacher_hidden, keep)
    zero = keep.new_zeros((), dtype=torch.float32)
    kl = ce = zero
    if losses.kl > 0 or losses.ce > 0:
        predicted = batch["labels"] != IGNORE
        logits = output.logits[predicted]
        if losses.kl > 0:
            if any(getattr(out, "logits", None) is None for out in outs):
                raise PocketError("the teacher has no masked-LM head, so its logits cannot be distilled",
                                  field="kl_weight", fix="use a masked-LM teacher, or set kl_weight = 0")
            kl = kd_loss(logits, [out.logits[predicted] for out in outs], options.temperature)
        if losses.ce > 0:
            ce = F.cross_entropy(logits.float(), batch["labels"][predicted])
    pooled = targets = None
    if losses.pooled:
        targets = [sentence_embedding(out, keep, pooling) for out, pooling in zip(outs, poolings[1:])]
        pooled = sentence_embedding(output, keep, poolings[0])
    return kl, ce, hidden if hidden is not None else zero, pooled, targets


def _weighted(means: list[torch.Tensor], weights: list[torch.Tensor] | None) -> torch.Tensor:
    """The mean over a whole batch of per-group means, each weighted by its count (its predicted
    positions or real tokens); the first where there is no count (a term that is not computed)."""
    if weights is None:
        return means[0]
    total = sum(float(w) for w in weights)
    return sum(mean * (float(w) / total) for mean, w in zip(means, weights))


def distill(model: nn.Module, options: DistillOptions, context) -> nn.Module:
    """Distil ``model`` from its teacher(s); changes ``model`` in place and returns it."""
    require_whole_model(model, "distill (training through every layer at once, with a teacher)",
                        fix='set offload = "none" in [model]; for a model larger than one machine\'s memory, '
                        "train data-parallel with accelerate launch (see the README, Big models)")
    trainer = Trainer(model, options, context)
    trainer.resume()
    trainer.correct_teachers()
    trainer.prepare()
    trainer.train()
    return trainer.finish()


class Trainer:
    """One ``distill`` run, in the order :func:`distill` calls its steps.

    * construction, the setup: the accelerator, the teachers, the data (how many steps of how
      many tokens), the student (quantized layers opened, masks applied, projections built,
      frozen parameters) and its optimizer and schedule;
    * :meth:`resume`: the state the last checkpoint of a run with the same options saved;
    * :meth:`correct_teachers`: Minitron's teacher correction, when asked for;
    * :meth:`prepare`: the loader from the resumed step on, everything through ``accelerator.prepare``,
      the RNG where the checkpoint left it;
    * :meth:`train`: :meth:`step` after step, :meth:`checkpoint` every ``checkpoint_every``;
    * :meth:`finish`: quantized layers closed onto their grids, flags and devices restored, the
      loss curve written and the resume state dropped.

    Every file goes through :mod:`pocketlm.atomic`: a reader or a resumed run never sees half
    of one."""

    def __init__(self, model: nn.Module, options: DistillOptions, context):
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs

        self.options, self.context = options, context
        self.seed = context.seed if options.seed is None else options.seed
        architecture = context.architecture(model)
        self.losses = resolve_losses(options, architecture)
        self.encoder = architecture.encoder
        # a bare encoder's pooler (and a head left out of the loss) gets no gradient, which DDP must expect
        unused = DistributedDataParallelKwargs(find_unused_parameters=self.encoder)
        self.accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(split_batches=True),
                                       kwargs_handlers=[unused])
        if options.batch_size % self.accelerator.num_processes:
            raise PocketError(f"batch_size {options.batch_size} does not split over "
                              f"{self.accelerator.num_processes} processes",
                              fix="make batch_size a multiple of the process count")
        self.teachers = load_teachers(options, context) if self.losses.needs_teacher else []  # plain CE runs none
        if options.student_layers is not None and not self.teachers:
            raise PocketError("student_layers makes the student from its teacher's layers, but this run uses no "
                              "teacher", field="student_layers",
                              fix="give a teacher loss (kl_weight, hidden_weight or embedding_weight)")
        kept = make_student_layers(model, self.teachers[0], options, context) \
            if options.student_layers is not None else None
        self._setup_data(model)
        head = model.get_output_embeddings()
        self.vocab = linear_shape(head)[0] if head is not None else None   # a quantized head has no .weight
        self.original_device = next(model.parameters()).device
        self.original_flags = {name: p.requires_grad for name, p in model.named_parameters()}
        check_embedding_widths(model, self.teachers, self.losses)
        self._setup_student(model, kept)
        self.optimizer, self.scheduler = optimizer_and_schedule(self.trainable, options.lr, self.warmup,
                                                                self.total, options)
        self.state_path = Path(context.stage_dir) / STATE_FILE if context.stage_dir is not None else None
        self.fingerprint = _fingerprint(options, self.student, self.n_examples, self.seed)
        self.state, self.start, self.history = None, 0, []
        # the tail average (average_last): the running mean of the trainable parameters from this step on
        self.average_from = self.total - round(self.total * options.average_last)
        self.average: list[torch.Tensor] | None = None
        self.originals = self.teachers   # the teachers handed in; corrected copies may replace them
        self.teacher_devices = [next(t.parameters()).device for t in self.teachers]

    def _setup_data(self, model: nn.Module) -> None:
        """The training examples (token windows, or an encoder's text chunks or pairs), the step
        count and the warm-up."""
        options = self.options
        self.windows, self.chunks = None, None
        if self.encoder and options.generated_windows:
            raise PocketError("generated_windows samples text from a causal LM teacher; an encoder writes none",
                              field="generated_windows", fix="set generated_windows = 0 and train on a text")
        if options.generated_windows and not self.teachers:
            raise PocketError("generated_windows samples text from the teacher, and this run uses no teacher",
                              field="generated_windows", fix="give a teacher loss (kl_weight or hidden_weight)")
        if self.encoder:
            self.chunks = encoder_pairs(options, self.context, model) if options.texts == "pairs" \
                else encoder_chunks(options, self.context, model, self.seed)
            self.n_examples = len(self.chunks)
            mean_length = sum(map(len, self.chunks)) / len(self.chunks)
            self.tokens_per_step = round(options.batch_size * options.grad_accum * mean_length)
        else:
            self.windows = training_windows(options, self.context)
            if options.generated_windows:
                generated = generated_windows(options, self.teachers[0], self.windows.shape[1], self.seed,
                                              self.context, self.accelerator)
                self.windows = generated if options.generated_only else torch.cat([self.windows, generated])
            self.n_examples = self.windows.shape[0]
            self.tokens_per_step = options.batch_size * options.grad_accum * self.windows.shape[1]
        self.total = options.steps if options.steps is not None else math.ceil(options.tokens / self.tokens_per_step)
        self.warmup = options.warmup_steps if options.warmup_steps is not None else min(100, self.total // 20)

    def _setup_student(self, model: nn.Module, kept: list[int] | None) -> None:
        """Quantized layers opened, projections built, frozen parameters set, masks applied."""
        options = self.options
        self.opened = open_quantized(model, options.quantized, options.freeze)
        torch.manual_seed(self.seed)   # the projections' initialisation
        self.layer_map = build_layer_map(options, self.losses, kept)
        projections = build_projections(model, self.teachers[0], self.layer_map, self.context) \
            if self.layer_map else nn.ModuleDict()
        self.student = Student(model, self.layer_map, projections, self.losses.hidden_loss,
                               states=self.losses.kind == "masked-lm" and self.losses.pooled)
        for name, parameter in self.student.named_parameters():
            frozen = options.freeze and matches(name.removeprefix("model."), options.freeze)
            parameter.requires_grad_(not frozen)
        if options.quantized in ("freeze", "scales"):   # scales: the grid's bias stays as the quantizer left it
            for module in model.modules():
                if isinstance(module, QuantizedLinear) and module.bias is not None:
                    module.bias.requires_grad_(False)
        self.masked = mask_pairs(model, self.opened)
        with torch.no_grad():
            for parameter, mask in self.masked:
                parameter.mul_(mask.to(parameter.dtype))
        self.trainable = [p for p in self.student.parameters() if p.requires_grad]

    def resume(self) -> None:
        """Load the state a run with the same options saved (:meth:`checkpoint`); one written
        with other options is ignored, and said."""
        path = self.state_path
        if path is None or not path.is_file():
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("fingerprint") != self.fingerprint:
            self.context.log(f"distill: ignoring {path}: it was written with other options")
            return
        self.state, self.start, self.history = state, int(state["step"]), list(state["history"])
        self.context.log(f"distill: resuming at step {self.start} of {self.total}")

    def correct_teachers(self) -> None:
        """Replace the teachers by corrected copies (:func:`corrected_teachers`) when asked to."""
        if not self.options.teacher_correction_steps:
            return
        self.teachers = corrected_teachers(self.teachers, self.windows, self.options, self.seed, self.accelerator,
                                           self.context, self.fingerprint)
        self.accelerator.free_memory()  # drop the corrections' prepared copies, optimizers and loaders

    def prepare(self) -> None:
        """The loader from the resumed step on; student, optimizer and loader prepared by the
        accelerator; the resumed state (or the seed) loaded."""
        options, accelerator, state = self.options, self.accelerator, self.state
        order = self._order()
        skipped = self.start * options.grad_accum
        if self.encoder:
            tokenizer = self.context.tokenizer
            masking = masking_for(tokenizer, self.student.model, options.mlm_probability) \
                if self.losses.kind == "masked-lm" else None
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            loader = encoder_loader(self.chunks, order, skipped, options, self.seed, masking, pad_id)
            self.poolings = [sentence.pooling(self.student.model)] + [sentence.pooling(t) for t in self.teachers]
        else:
            loader = torch.utils.data.DataLoader(_Windows(self.windows),
                                                 batch_sampler=_FixedBatches(order[skipped:], options.batch_size))
        self.prepared, self.optimizer, loader = accelerator.prepare(self.student, self.optimizer, loader)
        self.device = accelerator.device
        self.bf16 = options.mixed_precision == "bf16" or (options.mixed_precision == "auto"
                                                          and bfloat16_is_native(self.device))
        self.teachers = [t.to(self.device) for t in self.teachers]  # a no-op on CPU; originals go back in finish
        self.masked = [(p, m.to(self.device)) for p, m in self.masked]
        # the first batch is drawn before the RNG is set: starting the loader draws from that RNG,
        # and a resumed run must continue the dropout stream where the checkpoint left it
        batches = iter(loader)
        self.batches = itertools.chain([next(batches)], batches)
        if state is not None:
            accelerator.unwrap_model(self.prepared).load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if state.get("average") is not None:
                self.average = [mean.to(self.device) for mean in state["average"]]
            torch.set_rng_state(state["rng"]["torch"])
            if torch.cuda.is_available() and state["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        else:
            torch.manual_seed(self.seed)
        self.prepared.train()
        self.context.log(self._describe())

    def _order(self) -> list[list[int]]:
        """Every micro-batch of the run, as indices of the training examples (seeded)."""
        options, count = self.options, self.total * self.options.grad_accum
        if self.encoder and options.texts == "pairs":
            return pair_order(self.n_examples // 2, options.batch_size, count, self.seed)
        return batch_order(self.n_examples, options.batch_size, count, self.seed)

    def _describe(self) -> str:
        options, losses = self.options, self.losses
        line = (f"distill: {self.total} steps of {self.tokens_per_step} tokens ({len(self.teachers)} teacher(s), "
                f"{sum(p.numel() for p in self.trainable)} trainable parameters, {len(self.opened)} quantized layers "
                f"trained {'through STE' if options.quantized == 'ste' else 'by their scales'}, "
                f"{len(self.masked)} masks kept) on {self.accelerator.num_processes} process(es)"
                + (" in bf16" if self.bf16 else ""))
        if not self.encoder:
            return line
        terms = (("kl", losses.kl), ("ce", losses.ce), ("hidden", losses.hidden), ("embedding", losses.embedding),
                 ("similarity", losses.similarity))
        examples = f"{self.n_examples // 2} (query, passage) pairs" if options.texts == "pairs" \
            else f"{self.n_examples} text chunks"
        if options.texts == "pairs" and options.queries == "every":
            examples += " (every sentence a query)"
        return (line + f"; {losses.kind} encoder on {examples}, losses: "
                + ", ".join(f"{name} {weight:g}" for name, weight in terms if weight > 0))

    def train(self) -> None:
        """Every remaining step, with a checkpoint every ``checkpoint_every`` steps (not after the last)."""
        every = self.options.checkpoint_every
        with self.context.progress.task("distill", self.total) as advance:
            if self.start:
                advance(self.start)
            for step in range(self.start, self.total):
                row = self.step(step)
                if self.state_path is not None and every and (step + 1) % every == 0 and step + 1 < self.total:
                    self.checkpoint(step + 1)
                advance(1, loss=round(row["loss"], 4),
                        tokens_per_s=round(row["step_tokens"] / max(row["seconds"], 1e-9)))

    def step(self, step: int) -> dict:
        """One optimizer step of ``grad_accum`` micro-batches (masks kept on gradients and
        weights); appends the step's row to the loss history and returns it, with its tokens."""
        options, accelerator = self.options, self.accelerator
        began = time.perf_counter()
        sums = torch.zeros(7, device=self.device)  # loss, kl, ce, hidden, embedding, similarity; real tokens
        for micro in range(options.grad_accum):
            batch = next(self.batches)
            sync = micro == options.grad_accum - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(self.prepared):
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    terms, count = self._losses(batch)
                accelerator.backward(terms[0] / options.grad_accum)
            sums[:6] += terms.detach().float() / options.grad_accum
            sums[6] += count.float()
        for parameter, mask in self.masked:
            if parameter.grad is not None:
                parameter.grad.mul_(mask.to(parameter.grad.dtype))
        if options.max_grad_norm > 0:
            accelerator.clip_grad_norm_(self.trainable, options.max_grad_norm)
        self.optimizer.step()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for parameter, mask in self.masked:
                parameter.mul_(mask.to(parameter.dtype))
        if step >= self.average_from:
            self._fold_into_average(step - self.average_from + 1)
        if accelerator.num_processes > 1:
            sums = accelerator.reduce(sums, reduction="mean")
            sums[6] *= accelerator.num_processes  # a count: the sum over processes
        seconds = time.perf_counter() - began
        loss, kl, ce, hidden, embedding, similarity, step_tokens = sums.tolist()
        tokens = (self.history[-1]["tokens"] if self.history else 0) + int(round(step_tokens))
        self.history.append({"step": step + 1, "loss": loss, "kl": kl, "ce": ce, "hidden": hidden,
                             "embedding": embedding, "similarity": similarity, "lr": lr, "tokens": tokens,
                             "seconds": seconds})
        return {**self.history[-1], "step_tokens": step_tokens}

    @torch.no_grad()
    def _fold_into_average(self, count: int) -> None:
        """Fold the parameters after this step, the ``count``-th of the tail, into their running
        mean (float32, so a low-precision parameter's mean does not round at every step)."""
        if count == 1 or self.average is None:
            self.average = [parameter.detach().float().clone() for parameter in self.trainable]
            return
        for mean, parameter in zip(self.average, self.trainable):
            mean.add_(parameter.detach().float() - mean, alpha=1.0 / count)

    def _losses(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss terms of one micro-batch and its count of real tokens."""
        if self.encoder:
            # one forward pass per process: DDP expects one before each backward
            groups = LENGTH_GROUPS if self.accelerator.num_processes == 1 else 1
            terms = encoder_losses(self.prepared, self.teachers, batch, self.losses, self.layer_map, self.options,
                                   self.poolings, self._token_shares(batch), groups)
            return terms, batch["attention_mask"].sum()
        terms = causal_losses(self.prepared, self.teachers, batch, self.losses, self.layer_map, self.options,
                              self.vocab)
        return terms, torch.tensor(batch.numel(), device=self.device)

    def _token_shares(self, batch):
        """(masked, real) token counts of this process's part of the micro-batch over their mean
        per process: ``(1, 1)`` on one process. The halves of a global batch hold different
        numbers of masked and real tokens; a per-token mean on each process weighted by its share
        is, once the gradients are averaged over processes, the mean over every token of the
        global batch, so N processes train as one does."""
        if self.accelerator.num_processes == 1:
            return 1.0, 1.0
        mask = batch["attention_mask"]
        masked = (batch["labels"] != IGNORE).sum() if "labels" in batch else mask.sum()
        local = torch.stack([masked, mask.sum()]).float()
        mean = self.accelerator.reduce(local.clone(), reduction="mean")
        return tuple(local / mean.clamp_min(1))

    def checkpoint(self, step: int) -> None:
        """Save what :meth:`resume` needs to continue after ``step`` steps (the main process writes)."""
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            rng = {"torch": torch.get_rng_state(),
                   "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
            save_state(self.state_path, {"fingerprint": self.fingerprint, "step": step,
                                         "model": accelerator.unwrap_model(self.prepared).state_dict(),
                                         "optimizer": self.optimizer.state_dict(),
                                         "scheduler": self.scheduler.state_dict(),
                                         "rng": rng, "history": self.history, "average": self.average})
        accelerator.wait_for_everyone()

    def finish(self) -> nn.Module:
        """Close the quantized layers onto their grids, restore devices and flags, write the loss
        curve and drop the resume state; returns the model."""
        accelerator = self.accelerator
        self.prepared.eval()
        accelerator.wait_for_everyone()
        if self.average is not None:   # masked weights average to zero, so masks still hold
            with torch.no_grad():
                for mean, parameter in zip(self.average, self.trainable):
                    parameter.copy_(mean.to(parameter.dtype))
            self.context.log(f"distill: the trained parameters are the mean of the last "
                             f"{self.total - self.average_from} steps' values")
        model = accelerator.unwrap_model(self.prepared).model
        for name, ste in self.opened.items():
            set_module(model, name, ste.close())
        accelerator.free_memory()
        model.to(self.original_device)
        for teacher, device in zip(self.originals, self.teacher_devices):
            teacher.to(device)
        self.teachers = []  # corrected copies, if any, are dropped
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(self.original_flags.get(name, True))
        model.eval()
        if self.context.stage_dir is not None and accelerator.is_main_process:
            folder = Path(self.context.stage_dir)
            folder.mkdir(parents=True, exist_ok=True)
            write_curve(self.history, folder)
            if self.state_path is not None:
                self.state_path.unlink(missing_ok=True)
            for index in range(len(self.originals)):
                (folder / TEACHER_FILE.format(index)).unlink(missing_ok=True)
        if self.history:
            first, last = self.history[0], self.history[-1]
            self.context.log(f"distill: loss {first['loss']:.4f} -> {last['loss']:.4f} over {self.total} steps, "
                             f"{last['tokens']} tokens")
        return model
