"""The ``gguf`` exporter: one llama.cpp ``.gguf`` file for a Llama-family model.

* Quantized layers (:class:`pocketlm.weights.QuantizedLinear` / ``QuantizedEmbedding``) whose grid
  fits a ggml block format are written exactly: a GPTQ, AWQ or RTN 4-bit grid with groups of 32
  (or any multiple of 32) becomes Q4_0 (symmetric) or Q4_1 (asymmetric), an 8-bit symmetric grid
  Q8_0 (see :mod:`pocketlm_gguf.blocks`). llama.cpp then runs the optimized weights themselves.
  Q4_1 stores the offset ``m = -zero * scale`` as a float16, which rounds in most blocks: the
  log says in how many, and ``pocketlm.tensors`` counts those matrices as ``Q4_1 m-rounded``.
* Grids that do not fit (act-order ``g_idx``, group sizes 32 does not divide, 8-bit asymmetric)
  are re-quantized from their dequantized weights to the ``fallback`` format, with a notice in
  the run log that says how much changed.
* Dense linears are written in ``dtype`` (F16/F32), or quantized with llama.cpp's own
  round-to-nearest when ``quantize`` is set; norms and biases stay F32.
* q/k projection rows get llama.cpp's rotary permutation (``general.architecture = "llama"``);
  Qwen2 (``"qwen2"``, NeoX rotary) keeps them as they are.
* The tokenizer, the hyperparameters and provenance (``pocketlm.recipe``, ``pocketlm.versions``,
  ``pocketlm.tensors``) go into the metadata.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

import pocketlm
from pocketlm import PocketError, streaming
from pocketlm.card import card_metadata
from pocketlm.modules import decoder_layers, get_module, matches
from pocketlm.weights import PackedGrid, QuantizedEmbedding, QuantizedLinear, is_linear, linear_shape, linear_weight

from . import EXPORTER, blocks, kquants  # noqa: F401  (EXPORTER: the package registers it; kept importable here)
from .options import GGUFOptions
from .tokenizer import vocab_from_tokenizer, write_vocab

# What GGUF needs beyond the model's registered Architecture (where its layers, heads and MLP
# are comes from context.architecture): config.model_type -> (general.architecture, whether
# llama.cpp's rotary permutation applies to the q/k rows).
FAMILIES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}

_FILE_TYPES = {
    gguf.GGMLQuantizationType.F32: gguf.LlamaFileType.ALL_F32,
    gguf.GGMLQuantizationType.F16: gguf.LlamaFileType.MOSTLY_F16,
    gguf.GGMLQuantizationType.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
    gguf.GGMLQuantizationType.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
    gguf.GGMLQuantizationType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    gguf.GGMLQuantizationType.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0,
    gguf.GGMLQuantizationType.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1,
    gguf.GGMLQuantizationType.Q2_K: gguf.LlamaFileType.MOSTLY_Q2_K,
    gguf.GGMLQuantizationType.Q3_K: gguf.LlamaFileType.MOSTLY_Q3_K_M,
    gguf.GGMLQuantizationType.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_M,
    gguf.GGMLQuantizationType.Q5_K: gguf.LlamaFileType.MOSTLY_Q5_K_M,
    gguf.GGMLQuantizationType.Q6_K: gguf.LlamaFileType.MOSTLY_Q6_K,
}
SCRATCH_IN_MEMORY = 64 << 20  # packed tensors up to this many bytes wait in memory, the rest on disk
# What llama.cpp's quantizer (llama-quant.cpp) writes for a row length that 256 does not divide.
# IQ4_NL (a non-uniform 4-bit codebook) has no quantizer in gguf-py: pocketlm writes Q4_0, the
# same 4.5 bits per weight, instead.
KQUANT_ROW_FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


# ----------------------------------------------------------------------------- check


def _rope_theta(config) -> float:
    parameters = getattr(config, "rope_parameters", None) or {}
    theta = parameters.get("rope_theta", getattr(config, "rope_theta", None))
    return float(theta if theta is not None else 10000.0)


def _rope_type(config) -> str:
    parameters = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return parameters.get("rope_type", parameters.get("type", "default")) or "default"


def architecture_of(model, context=None):
    """The model's registered :class:`pocketlm.Architecture`: the run's (``context``), or the
    installed plugins' for a call without one."""
    if context is None:
        context = pocketlm.Context(plugins=pocketlm.installed_plugins())
    return context.architecture(model)


def check(model, options, context=None) -> list[str]:
    """Problems that stop a GGUF export before anything is written. The layout (where the
    decoder layers are) is the run's registered architecture (``context.architecture``)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        return [f"the gguf exporter writes Llama-family models ({', '.join(sorted(FAMILIES))}); this model is "
                f"{model_type!r}. Export it with the 'hf' exporter and convert it with llama.cpp's "
                "convert_hf_to_gguf.py instead"]
    problems = []
    try:
        layers = decoder_layers(model, architecture_of(model, context))
    except (PocketError, AttributeError) as error:
        return [f"the decoder layers of this {model_type} model are not where its registered architecture "
                f"says ({error}); the gguf exporter expects the transformers layout"]
    if _rope_type(config) != "default":
        problems.append(f"rotary scaling {_rope_type(config)!r} is not written by the gguf exporter (only plain RoPE)")
    if model_type == "llama" and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)):
        problems.append("Llama models with attention_bias or mlp_bias are not written (transformers' GGUF loader "
                        "cannot read the biases back)")
    shapes = {_layer_shapes(layer) for layer in layers}
    if len(shapes) > 1:
        problems.append("the decoder layers differ in shape (width-pruned per layer); a GGUF file holds one "
                        "feed-forward and head layout for every layer")
    return problems


def _layer_shapes(layer) -> tuple:
    return tuple(linear_shape(m) for _, m in sorted(layer.named_modules()) if is_linear(m))


# ---------------------------------------------------------------------------- tensors


def _is_tied(model) -> bool:
    """True where the head reads the token embedding's own storage (then only token_embd is written)."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None:
        return True
    if isinstance(embed, QuantizedEmbedding) and isinstance(head, QuantizedLinear):
        return head.storage is embed.storage
    head_weight, embed_weight = getattr(head, "weight", None), getattr(embed, "weight", None)
    return head_weight is not None and embed_weight is not None and head_weight is embed_weight


def _owners(named_modules):
    """``(name, module)`` for every module that owns tensors to write, storage-holders excluded."""
    for name, module in named_modules:
        if isinstance(module, (QuantizedLinear, QuantizedEmbedding)) or is_linear(module) or isinstance(module, nn.Embedding):
            yield name, module
        elif isinstance(module, PackedGrid):
            continue
        elif any(True for _ in module.parameters(recurse=False)):
            yield name, module


def _leaf_modules(model):
    """:func:`_owners` of the whole model in module order. A model streamed from disk has its
    decoder layers materialized one at a time, each freed before the next is read."""
    stream = streaming.stream_of(model)
    if stream is None:
        yield from _owners(model.named_modules())
        return
    with streaming.without_layers(model, stream.layers_path):
        rest = list(model.named_modules())  # the layers' place holds an empty list meanwhile
    for name, module in rest:
        if name != stream.layers_path:
            yield from _owners([(name, module)])
            continue
        for index, layer in stream.each():
            yield from _owners(layer.named_modules(prefix=f"{name}.{index}"))


class _Report:
    """What happened to each matrix, for the notices and the ``pocketlm.tensors`` metadata key."""

    def __init__(self):
        self.kinds: Counter = Counter()
        self.fallbacks: dict[str, list[tuple[str, float]]] = defaultdict(list)
        self.unquantized: dict[str, list[str]] = defaultdict(list)
        self.row_fallbacks: dict[str, list[str]] = defaultdict(list)
        self.rounded_offsets: list[tuple[str, int, int, float]] = []  # Q4_1: name, rounded, blocks, worst

    def fallback(self, reason: str, fmt: str, name: str, change: float) -> None:
        self.fallbacks[f"{reason}; re-quantized from the dequantized weights to {fmt.upper()}"].append((name, change))

    def notices(self) -> list[str]:
        lines = []
        for what, items in self.fallbacks.items():
            worst = max(items, key=lambda item: item[1])
            mean = sum(change for _, change in items) / len(items)
            lines.append(f"gguf: {len(items)} layer(s): {what}; relative RMS change of the weights "
                         f"{mean:.2%} on average, worst {worst[1]:.2%} ({worst[0]}). The exact optimized grid "
                         "is lost for these layers.")
        if any(kind.endswith("_K exact") or "_K round" in kind for kind in self.kinds):
            for what, names in self.row_fallbacks.items():
                lines.append(f"gguf: {len(names)} layer(s): {what} ({', '.join(names[:3])}"
                             f"{', ...' if len(names) > 3 else ''})")
        if self.rounded_offsets:
            rounded = sum(item[1] for item in self.rounded_offsets)
            blocks_ = sum(item[2] for item in self.rounded_offsets)
            worst = max(self.rounded_offsets, key=lambda item: item[3])
            lines.append(f"gguf: {len(self.rounded_offsets)} layer(s): asymmetric grids as Q4_1 keep q and d = scale "
                         f"exactly, but the offset m = -zero * scale is stored as a float16 and rounds in {rounded} of "
                         f"{blocks_} blocks (by at most {worst[3]:.2%} of a grid step, worst {worst[0]}): the weights "
                         "are not bit-exact (symmetric grids are, as Q4_0).")
        for what, names in self.unquantized.items():
            lines.append(f"gguf: {len(names)} layer(s) not quantized: {what} ({', '.join(names[:3])}"
                         f"{', ...' if len(names) > 3 else ''})")
        return lines


def _relative_change(before: torch.Tensor, packed: blocks.Packed, cols: int) -> float:
    after = blocks.decode(packed, cols)
    return float((after - before).norm() / before.norm().clamp_min(1e-12))


def _matrix(name: str, module, options: GGUFOptions, report: _Report) -> blocks.Packed:
    """The packed matrix of a linear or embedding module."""
    if isinstance(module, (QuantizedLinear, QuantizedEmbedding)):
        storage = module.storage
        exact = blocks.exact_blocks(storage)
        if not isinstance(exact, str):
            # a Q4_1 whose float16 offsets round keeps the grid, not the weights, bit for bit
            report.kinds[f"{exact.qtype.name} {'m-rounded' if exact.offsets_rounded else 'exact'}"] += 1
            if exact.offsets_rounded:
                report.rounded_offsets.append((name, exact.offsets_rounded, storage.rows * storage.cols // blocks.QK,
                                               exact.offset_step_fraction))
            kind = kquants.BY_BITS.get(storage.bits)
            if kind is not None and storage.cols % kquants.QK_K and exact.qtype != kind.qtype:
                report.row_fallbacks[
                    f"input width {storage.cols} is not a multiple of {kquants.QK_K}, so no {kind.name.upper()}: "
                    f"written exactly as {exact.qtype.name} (llama.cpp's quantizer falls back to "
                    f"{kind.llama_fallback.upper()} here)"].append(name)
            return exact
        fmt = blocks.closest_format(storage) if options.fallback == "auto" else options.fallback
        if fmt == "f16" and options.fallback == "auto":
            fmt = options.dtype
        if fmt.startswith("q") and storage.cols % blocks.QK:
            fmt = options.dtype
        dense = storage.dequantize()
        packed = blocks.encode(dense, fmt)
        report.fallback(f"{storage.bits}-bit grid: {exact}", fmt, name, _relative_change(dense, packed, storage.cols))
        report.kinds[f"{packed.qtype.name} re-quantized"] += 1
        return packed
    weight = (linear_weight(module) if is_linear(module) else module.weight).detach().float()
    selected = (is_linear(module) and options.quantize != "none" and matches(name, options.targets)
                and not matches(name, options.ignore))
    if selected and weight.shape[-1] % blocks.QK:
        report.unquantized[f"input width {weight.shape[-1]} is not a multiple of {blocks.QK}, so no "
                           f"{options.quantize.upper()} blocks; kept in {options.dtype.upper()}"].append(name)
        selected = False
    fmt = options.quantize if selected else options.dtype
    if selected and fmt in KQUANT_ROW_FALLBACK and weight.shape[-1] % kquants.QK_K:
        fmt = KQUANT_ROW_FALLBACK[fmt]
        llama = kquants.KQUANTS[options.quantize].llama_fallback
        report.row_fallbacks[
            f"input width {weight.shape[-1]} is not a multiple of {kquants.QK_K}, so no {options.quantize.upper()}: "
            f"{fmt.upper()} instead" + ("" if llama == fmt else f" (llama.cpp writes {llama.upper()}, the same "
                                        "4.5 bits per weight, which gguf-py cannot quantize)")
            + ", as llama.cpp's quantizer does"].append(name)
    packed = blocks.encode(weight, fmt)
    report.kinds[f"{packed.qtype.name} {'round-to-nearest' if selected else 'dense'}"] += 1
    return packed


def _heads(config, layout) -> tuple[int, int]:
    """(query heads, key/value heads), from the config keys the architecture names."""
    heads = int(getattr(config, layout.attention.get("heads_key", "num_attention_heads")))
    kv_heads = getattr(config, layout.attention.get("kv_heads_key", "num_key_value_heads"), None)
    return heads, int(kv_heads or heads)


def _tensors(model, options: GGUFOptions, report: _Report, architecture: str, permute: bool, layout):
    """``(gguf name, array, raw qtype or None)`` for every tensor of the file; ``layout`` is the
    model's registered :class:`pocketlm.Architecture`."""
    config = model.config
    layers = getattr(config, layout.layer_count_key)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if architecture == "llama" else gguf.MODEL_ARCH.QWEN2,
                                        layers)
    heads, kv_heads = _heads(config, layout)
    tied = _is_tied(model)
    head_name = next((n for n, m in model.named_modules() if m is model.get_output_embeddings()), None)
    for name, module in _leaf_modules(model):
        if tied and name == head_name:
            continue
        target = name_map.get_name(name)
        if target is None:
            raise PocketError(f"the gguf exporter does not know where module {name!r} goes in a GGUF file",
                              fix="export with the 'hf' exporter instead")
        if is_linear(module) or isinstance(module, (nn.Embedding, QuantizedEmbedding)):
            packed = _matrix(name, module, options, report)
            data = packed.data
            if permute and target.endswith((".attn_q", ".attn_k")):
                data = data[blocks.rope_permutation(data.shape[0], heads if target.endswith("attn_q") else kv_heads)]
            yield target + ".weight", np.ascontiguousarray(data), packed.qtype
            bias = getattr(module, "bias", None)
            if bias is not None:
                bias = bias.detach().float().numpy()
                if permute and target.endswith((".attn_q", ".attn_k")):
                    bias = bias[blocks.rope_permutation(bias.shape[0], heads if target.endswith("attn_q") else kv_heads)]
                yield target + ".bias", np.ascontiguousarray(bias, dtype=np.float32), None
            continue
        for parameter_name, parameter in module.named_parameters(recurse=False):
            yield f"{target}.{parameter_name}", parameter.detach().float().numpy().astype(np.float32), None


# --------------------------------------------------------------------------- metadata


def _versions(context) -> dict[str, str]:
    versions = {"pocketlm": pocketlm.__version__}
    plugins = getattr(context, "plugins", None) or pocketlm.installed_plugins()
    for info in plugins.infos:
        if not info.builtin and info.distribution:
            versions[info.distribution] = info.version or "unknown"
    return versions


def _hyperparameters(writer: gguf.GGUFWriter, model, layout) -> None:
    config = model.config
    gate = get_module(decoder_layers(model, layout)[0], layout.mlp_in[0])
    heads, kv_heads = _heads(config, layout)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    # the layer's own width: a width-pruned model's config may still hold the original one
    intermediate = linear_shape(gate)[0] if is_linear(gate) else getattr(config, layout.intermediate_size_key)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(getattr(config, layout.layer_count_key)))
    writer.add_feed_forward_length(int(intermediate))
    writer.add_head_count(int(heads))
    writer.add_head_count_kv(int(kv_heads))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(model.get_input_embeddings().num_embeddings))
    writer.add_rope_dimension_count(int(head_dim))
    if head_dim * heads != config.hidden_size:
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))


def _card_metadata(writer: gguf.GGUFWriter, recipe: dict) -> None:
    """The model card's facts as ``general.*`` keys: base model, tags, who quantized it."""
    metadata = card_metadata(recipe, EXPORTER.library, EXPORTER.name)
    base = metadata.get("base_model")
    if base:
        organization, base_name = base.split("/", 1)
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, base_name)
        writer.add_base_model_organization(0, organization)
        writer.add_base_model_repo_url(0, f"https://huggingface.co/{base}")
    writer.add_tags(metadata["tags"])
    writer.add_quantized_by("pocketlm")


def export_gguf(model, path, options: GGUFOptions, context) -> None:
    problems = check(model, options, context)
    if problems:
        raise PocketError("cannot export to GGUF: " + "; ".join(problems))
    log = context.log if context is not None else print
    layout = architecture_of(model, context)
    architecture, permute = FAMILIES[model.config.model_type]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    report = _Report()
    writer = gguf.GGUFWriter(path / options.filename, architecture, use_temp_file=True)
    # The header lists every tensor before the first byte of data, so each packed tensor waits in
    # a scratch file beside the export (not in memory) until the header is written: a model
    # streamed from disk is packed one decoder layer at a time.
    writer.temp_file = tempfile.SpooledTemporaryFile(max_size=SCRATCH_IN_MEMORY, dir=path)
    matrix_types: Counter = Counter()
    with torch.no_grad():
        for tensor_name, data, qtype in _tensors(model, options, report, architecture, permute, layout):
            writer.add_tensor(tensor_name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
            if qtype is not None and data.ndim == 2:
                matrix_types[qtype] += 1

    # (a general.name of exactly "mistral" would make transformers' loader look for a GGUF
    # architecture gguf-py does not have, so the fallback name is never the bare family name)
    name = options.name or getattr(model.config, "_name_or_path", None) or f"pocketlm-{model.config.model_type}"
    writer.add_name(str(name))
    _card_metadata(writer, getattr(context, "recipe", None) or {})
    _hyperparameters(writer, model, layout)
    quantized = [t for t in matrix_types if t not in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32)]
    dominant = max(quantized or matrix_types, key=lambda t: matrix_types[t])
    writer.add_file_type(_FILE_TYPES[dominant])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    window = getattr(model.config, "sliding_window", None)
    if window and getattr(model.config, "use_sliding_window", True) and window < model.config.max_position_embeddings:
        log(f"gguf: the model's sliding window ({window} tokens) is not written; llama.cpp attends to the whole "
            "context, which only differs on sequences longer than the window")
    tokenizer = getattr(context, "tokenizer", None) if context is not None else None
    if tokenizer is not None and options.tokenizer:
        try:
            vocab = vocab_from_tokenizer(tokenizer, model.get_input_embeddings().num_embeddings, options.tokenizer_pre)
        except ValueError as error:
            raise PocketError(f"cannot write the tokenizer into the GGUF file: {error}", field="export.tokenizer",
                              fix="set the exporter option tokenizer = false to write the weights without it "
                                  "(llama.cpp needs a tokenizer to run the file)") from error
        write_vocab(writer, vocab)
        for note in vocab.notes:
            log("gguf: " + note)
    else:
        log("gguf: no tokenizer written; the file has no tokenizer.ggml.* metadata, which llama.cpp needs to run it")

    recipe = getattr(context, "recipe", None) or {}
    writer.add_string("pocketlm.recipe", json.dumps(recipe, default=str, sort_keys=True))
    writer.add_string("pocketlm.versions", json.dumps(_versions(context), sort_keys=True))
    writer.add_string("pocketlm.tensors", json.dumps(dict(sorted(report.kinds.items()))))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for line in report.notices():
        log(line)
    log(f"gguf: wrote {options.filename} ({(path / options.filename).stat().st_size / 1e6:.1f} MB; "
        + ", ".join(f"{count} {kind}" for kind, count in sorted(report.kinds.items())) + ")")
