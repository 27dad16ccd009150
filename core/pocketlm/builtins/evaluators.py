"""Built-in evaluators: perplexity, size, sparsity, parameters, latency, and the distance from
the original model's next-token distribution (kl-divergence, top1-agreement)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import streaming
from ..calibration import LayerInputs, capture_inputs
from ..devices import module_device
from ..errors import PocketError
from ..data import DEFAULT_EVALUATION_TEXT, evaluation_windows, resolve_text
from ..modules import get_module
from ..weights import QuantizedLinear, distinct_storages, is_linear, linear_weight
from .options import DivergenceOptions, LatencyOptions, PerplexityOptions  # noqa: F401
from .encoder_evaluators import encoder_latency, is_encoder, refuse_encoder, timed


def perplexity(model, options: PerplexityOptions, context) -> dict[str, float]:
    """exp(mean next-token NLL) over the first ``windows`` non-overlapping windows."""
    refuse_encoder(model, context, "perplexity")
    base = Path(context.recipe.get("_base", ".")) if context and context.recipe else None
    check_context_length(model, options.seq_len, "evaluate.perplexity.seq_len")
    text = resolve_text(options.text, base)
    ids = evaluation_windows(context.tokenizer, text, options.windows, options.seq_len)
    if ids.shape[0] == 0:
        raise PocketError(f"evaluation text {text} holds fewer than {options.seq_len} tokens, not one window",
                          field="evaluate.perplexity.text", fix="use a longer text, or lower seq_len")
    torch.manual_seed(0)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    if streaming.is_streamed(model):  # layer by layer over all windows; the head in vocabulary chunks
        with torch.no_grad(), context.progress.task("perplexity", ids.shape[0]) as advance:
            total, count = streamed_perplexity(model, context.architecture(model), ids,
                                                         options.batch_size, advance)
        return {"perplexity": math.exp(total / count), "eval_tokens": count}
    device = module_device(model)    # the model's device (with offload = "cpu", the CPU)
    with torch.no_grad(), context.progress.task("perplexity", ids.shape[0]) as advance:
        for start in range(0, ids.shape[0], options.batch_size):
            batch = ids[start:start + options.batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits.float()
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
            total += nll.item()
            count += batch[:, 1:].numel()
            advance(batch.shape[0])
    model.train(was_training)
    return {"perplexity": math.exp(total / count), "eval_tokens": count}


def context_length(model) -> int | None:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def check_context_length(model, seq_len: int, field: str) -> None:
    """Windows longer than the model's positions fail (GPT-2) or give meaningless numbers (RoPE)."""
    limit = context_length(model)
    if limit is not None and seq_len > limit:
        raise PocketError(f"seq_len {seq_len} is longer than the model's context of {limit} tokens", field=field,
                          fix=f"set seq_len to {limit} or less")
def token_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(P_reference || P) per position, in nats, over the last dimension (llama.cpp's KLD:
    the original model's distribution is the reference)."""
    reference = F.log_softmax(reference_logits.float(), dim=-1)
    log_q = F.log_softmax(logits.float(), dim=-1)
    return (reference.exp() * (reference - log_q)).sum(-1)


def top1_agreement_mask(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Whether the most likely next token is the same, per position."""
    return reference_logits.argmax(-1) == logits.argmax(-1)


def _first_device(model) -> torch.device:
    return next(model.parameters()).device


def divergence_from_original(model, options: DivergenceOptions, context) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position KL from the original model (``context.teacher()``) and top-1 agreement on
    the first ``windows`` evaluation windows; each model's logits are made on its own device."""
    # kl-divergence and top1-agreement asked together share one pass over both models: the
    # context lives for one evaluation of one model, so (model, options) identifies the result
    cache = context.__dict__.setdefault("_divergence", {})
    key = (id(model), options.model_dump_json())
    if key not in cache:
        cache[key] = _divergence_pass(model, options, context)
    return cache[key]


def _divergence_pass(model, options: DivergenceOptions, context) -> tuple[torch.Tensor, torch.Tensor]:
    base = Path(context.recipe.get("_base", ".")) if context and context.recipe else None
    ids = evaluation_windows(context.tokenizer, resolve_text(options.text, base), options.windows, options.seq_len)
    original = context.teacher()
    kls, agrees = [], []
    was_training = model.training
    model.eval()
    with torch.no_grad(), context.progress.task("divergence from the original", ids.shape[0]) as advance:
        for start in range(0, ids.shape[0], options.batch_size):
            batch = ids[start:start + options.batch_size]
            logits = model(input_ids=batch.to(_first_device(model)), use_cache=False).logits
            reference = original(input_ids=batch.to(_first_device(original)), use_cache=False).logits.to(logits.device)
            kls.append(token_kl(reference, logits).flatten().cpu())
            agrees.append(top1_agreement_mask(reference, logits).flatten().cpu())
            advance(batch.shape[0])
    model.train(was_training)
    return torch.cat(kls), torch.cat(agrees)


def kl_divergence(model, options: DivergenceOptions, context) -> dict[str, float]:
    """Mean and 99th percentile of KL(original || model) per token, in nats."""
    refuse_encoder(model, context, "kl-divergence")
    kl, _ = divergence_from_original(model, options, context)
    return {"kl_divergence": kl.mean().item(), "kl_divergence_p99": torch.quantile(kl.double(), 0.99).item()}


def top1_agreement(model, options: DivergenceOptions, context) -> dict[str, float]:
    """Share of positions where the model's most likely next token is the original's."""
    refuse_encoder(model, context, "top1-agreement")
    _, agree = divergence_from_original(model, options, context)
    return {"top1_agreement": agree.float().mean().item()}


def _unique_tensors(model) -> list[torch.Tensor]:
    seen, tensors = set(), []
    for tensor in list(model.parameters()) + list(model.buffers()):
        key = tensor.data_ptr()
        if key not in seen:
            seen.add(key)
            tensors.append(tensor)
    return tensors


def parameter_count(model) -> int:
    """Dense-equivalent parameters: a quantized linear counts its in*out weights; shared
    tensors (tied embeddings) count once."""
    if streaming.is_streamed(model):
        return sum(streaming.sum_over_parts(model, _parameter_count))
    return _parameter_count(model)


def _parameter_count(model) -> int:
    storages = distinct_storages(model).values()
    count = sum(storage.rows * storage.cols for storage in storages)
    grid_buffers = {id(b) for storage in storages for b in storage.buffers()}
    seen = set()
    for parameter in model.parameters():
        if parameter.data_ptr() not in seen and id(parameter) not in grid_buffers:
            seen.add(parameter.data_ptr())
            count += parameter.numel()
    return count


def storage_bytes(model) -> int:
    """Bytes to store the model: quantized grids as they are, everything else in float16."""
    if streaming.is_streamed(model):
        return sum(streaming.sum_over_parts(model, _storage_bytes))
    return _storage_bytes(model)


def _storage_bytes(model) -> int:
    storages = distinct_storages(model).values()
    total = sum(storage.storage_bytes() for storage in storages)
    grid = {b.data_ptr() for storage in storages for b in storage.buffers() if b is not None}
    seen = set()
    for parameter in model.parameters():
        if parameter.data_ptr() not in seen and parameter.data_ptr() not in grid:
            seen.add(parameter.data_ptr())
            total += parameter.numel() * 2
    return total


def folder_bytes(path: Path) -> int:
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def size(model, options, context) -> dict[str, float]:
    """``size_mb``: bytes on disk of the export when there is one, else the float16/packed
    storage estimate; ``bits_per_weight`` relative to the dense-equivalent parameter count."""
    export_path = getattr(context, "export_path", None)
    measured = folder_bytes(export_path) if export_path and Path(export_path).exists() else storage_bytes(model)
    return {"size_mb": measured / 1e6, "bits_per_weight": 8 * measured / parameter_count(model),
            "size_on_disk": float(bool(export_path and Path(export_path).exists()))}


def sparsity(model, options, context) -> dict[str, float]:
    """Fraction of exactly-zero weights over all linear layers except the output head."""
    parts = streaming.sum_over_parts(model, _zero_count) if streaming.is_streamed(model) else [_zero_count(model)]
    zeros, total = sum(p[0] for p in parts), sum(p[1] for p in parts)
    return {"sparsity": zeros / max(total, 1)}


def _zero_count(model) -> tuple[int, int]:
    zeros = total = 0
    for name, module in model.named_modules():
        if is_linear(module) and not name.endswith("lm_head"):
            weight = linear_weight(module)
            zeros += int((weight == 0).sum())
            total += weight.numel()
    return zeros, total


def parameters(model, options, context) -> dict[str, float]:
    return {"parameters": parameter_count(model)}


def latency(model, options: LatencyOptions, context) -> dict[str, float]:
    """CPU tokens/s of one forward pass over a prompt, and of greedy generation (batch 1); for an
    encoder, sentences/s one at a time and in a batch of 32 (:func:`encoder_latency`)."""
    if streaming.is_streamed(model):
        from ..errors import PocketError

        raise PocketError("latency measures the whole model in memory; this one streams from disk",
                          field="evaluate.metrics", fix="drop latency from the metrics, or set offload = \"none\"")
    if is_encoder(model, context):
        return encoder_latency(model, context.tokenizer, options.max_length, options.repeats)
    vocab = model.config.vocab_size
    prompt = torch.arange(options.prompt_tokens, device=module_device(model)).remainder(vocab - 10).add(5).unsqueeze(0)
    with torch.no_grad():
        model(input_ids=prompt[:, :8])  # warm-up
        best_forward = min(timed(lambda: model(input_ids=prompt, use_cache=False)) for _ in range(options.repeats))
        generate = lambda: model.generate(prompt, max_new_tokens=options.new_tokens, min_new_tokens=options.new_tokens,
                                          do_sample=False, pad_token_id=0)
        best_generate = min(timed(generate) for _ in range(options.repeats))
    return {"forward_tokens_per_s": options.prompt_tokens / best_forward,
            "generate_tokens_per_s": options.new_tokens / best_generate}


# ------------------------------------------------------------------------- a model streamed from disk


def head_logits_nll(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Summed next-token NLL of ``targets`` given final ``hidden`` states ``[tokens, width]``,
    with the head applied in vocabulary chunks (a running log-sum-exp), never all logits at once."""
    weight_of = _head_rows(head)
    rows = head.out_features if hasattr(head, "out_features") else head.weight.shape[0]
    running_max = torch.full((hidden.shape[0],), float("-inf"))
    running_sum = torch.zeros(hidden.shape[0])
    target_logit = torch.zeros(hidden.shape[0])
    for start in range(0, rows, chunk):
        stop = min(start + chunk, rows)
        weight, bias = weight_of(start, stop)
        logits = hidden @ weight.t()
        if bias is not None:
            logits = logits + bias
        logits = logits.float()
        new_max = torch.maximum(running_max, logits.amax(dim=1))
        running_sum = running_sum * torch.exp(running_max - new_max) + torch.exp(logits - new_max[:, None]).sum(1)
        running_max = new_max
        inside = (targets >= start) & (targets < stop)
        picked = logits.gather(1, (targets - start).clamp(0, stop - start - 1)[:, None])[:, 0]
        target_logit = torch.where(inside, picked, target_logit)
    return (running_max + running_sum.log() - target_logit).sum()


def _head_rows(head: nn.Module):
    bias = getattr(head, "bias", None)
    if isinstance(head, QuantizedLinear):
        return lambda a, b: (head.storage.dequantize(torch.arange(a, b)), None if bias is None else bias[a:b])
    weight = linear_weight(head)
    return lambda a, b: (weight[a:b], None if bias is None else bias[a:b])


def streamed_perplexity(model: nn.Module, architecture, ids: torch.Tensor, batch_size: int, advance) -> tuple[float, int]:
    """Summed NLL and token count of ``ids`` through a streamed model, layer by layer over
    every window: the embedding, then each decoder layer once, then the norm and the head in
    vocabulary chunks."""
    stream = streaming.stream_of(model)
    inputs = capture_inputs(model, architecture, ids, batch_size)
    for index, layer in stream.each():
        inputs = LayerInputs(stream.park(inputs.run(layer), index), inputs.kwargs)
    norm = get_module(model, architecture.final_norm) if architecture.final_norm else None
    head = get_module(model, architecture.lm_head)
    total, count = 0.0, 0
    with torch.no_grad():
        for start, hidden in zip(range(0, ids.shape[0], batch_size), inputs.hidden):
            batch = ids[start:start + batch_size]
            states = norm(hidden) if norm is not None else hidden
            flat = states[:, :-1].reshape(-1, states.shape[-1])
            total += float(head_logits_nll(flat, head, batch[:, 1:].reshape(-1)))
            count += batch[:, 1:].numel()
            advance(batch.shape[0])
    return total, count
