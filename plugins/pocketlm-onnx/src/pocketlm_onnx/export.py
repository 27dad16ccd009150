"""The ``onnx`` exporter: a sentence encoder as one ONNX graph that ONNX Runtime runs on its
integer kernels.

The folder holds ``model.onnx`` (inputs ``input_ids``, ``attention_mask`` and, where the model
reads them, ``token_type_ids``, with dynamic batch and sequence axes; outputs
``last_hidden_state`` and ``sentence_embedding``, the pooled and, where the model's pipeline
says so, L2-normalized vector computed inside the graph), the tokenizer, ``config.json`` and
``pocketlm-onnx.json`` (inputs, outputs, pooling, and how each quantized layer was written).

How it is built: a dense copy of the encoder (a masked-LM head is left out: the export makes
sentence embeddings) is traced by torch's TorchScript ONNX exporter, then each quantized layer's
float ``MatMul``/``Gather`` is rewritten to hold the layer's own integer grid
(:mod:`pocketlm_onnx.rewrite`).
"""

from __future__ import annotations

import copy
import inspect
import io
import json
import warnings
from collections import Counter
from pathlib import Path

import onnx
import torch
from torch import nn

from pocketlm import PocketError, sentence
from pocketlm.modules import dense_copy as dense_model
from pocketlm.weights import QuantizedEmbedding, QuantizedLinear, is_linear, linear_weight

from . import rewrite
from .options import OnnxOptions

MODEL_FILE = "model.onnx"
DESCRIPTION_FILE = "pocketlm-onnx.json"
OUTPUTS = ("last_hidden_state", "sentence_embedding")
OPSET = 17   # LayerNormalization is a single op from 17 on


# ----------------------------------------------------------------------------- check


def encoder_of(model: nn.Module) -> nn.Module:
    """The bare encoder (``BertModel`` inside ``BertForMaskedLM``, or the model itself)."""
    return getattr(model, "base_model", model)


def is_encoder(model: nn.Module, context) -> bool:
    """True for the BERT family as pocketlm registers it (``Architecture.encoder``)."""
    try:
        return context.architecture(model).encoder
    except PocketError:
        return False


def check(model: nn.Module, options: OnnxOptions, context) -> list[str]:
    """Problems that stop an ONNX export before anything is written."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not is_encoder(model, context):
        return [f"the onnx exporter writes sentence encoders (BERT, RoBERTa, DistilBERT); this model is "
                f"{model_type!r}, not an encoder. Export a causal language model with the 'hf' or 'gguf' exporter"]
    if getattr(model, "hf_device_map", None):
        return ["the model is spread over several devices; load it on one device to export it to ONNX"]
    return []


# ----------------------------------------------------------------------------- tracing


class SentenceEncoder(nn.Module):
    """The encoder and its pooling as one module, so one graph gives both outputs."""

    def __init__(self, encoder: nn.Module, mode: str, normalize: bool):
        super().__init__()
        self.encoder, self.mode, self.normalize = encoder, mode, normalize

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        hidden = self.encoder(**inputs).last_hidden_state
        return hidden, sentence.sentence_vectors(hidden, attention_mask, {"mode": self.mode, "normalize": self.normalize})


def takes_token_types(encoder: nn.Module) -> bool:
    return "token_type_ids" in inspect.signature(encoder.forward).parameters


def input_names(encoder: nn.Module) -> list[str]:
    return ["input_ids", "attention_mask"] + (["token_type_ids"] if takes_token_types(encoder) else [])


def dense_copy(encoder: nn.Module) -> nn.Module:
    """A float32 copy of ``encoder`` with every quantized module dequantized (masked weights
    are zeros already)."""
    return dense_model(encoder).float().eval()


def example_inputs(encoder: nn.Module, names: list[str]) -> tuple[torch.Tensor, ...]:
    """Two sequences, the second padded: an all-ones mask would let transformers drop the mask
    from the traced graph."""
    vocab = encoder.get_input_embeddings().num_embeddings
    ids = torch.arange(16).remainder(vocab - 1).add(1).view(2, 8)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return (ids, mask, torch.zeros_like(ids))[:len(names)]


def trace(dense: nn.Module, pooling: dict) -> onnx.ModelProto:
    """The dense encoder and its pooling as an ONNX graph with dynamic batch and sequence.

    Attention is traced in its eager form (matmul, add the mask, softmax, matmul), not through
    PyTorch's fused ``scaled_dot_product_attention``, which the exporter spells out with NaN
    guards and shape arithmetic: all-MiniLM-L6-v2 traces to 532 nodes instead of 685, each a
    fixed cost on a batch-1 sentence (measured 3% to 9% faster in docs/bench/encoders.md)."""
    names = input_names(dense)
    if hasattr(dense, "set_attn_implementation"):
        dense.set_attn_implementation("eager")
    wrapper = SentenceEncoder(dense, pooling["mode"], bool(pooling["normalize"])).eval()
    inputs = example_inputs(dense, names)
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    axes.update({"last_hidden_state": {0: "batch", 1: "sequence"}, "sentence_embedding": {0: "batch"}})
    buffer = io.BytesIO()
    # the tracer warns about Python branches in transformers' masking code; the graph has dynamic
    # axes, which the tests run at other batch sizes and lengths against the model: noise for users
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*aten::index.*", category=UserWarning)
        torch.onnx.export(wrapper, inputs, buffer, dynamo=False, input_names=names,
                          output_names=list(OUTPUTS), dynamic_axes=axes, opset_version=OPSET,
                          do_constant_folding=True)
    return onnx.load_from_string(buffer.getvalue())


# ------------------------------------------------------------------------ the rewrites


def weight_names(dense: nn.Module) -> dict[str, str]:
    """Digest of each linear's weight as the graph stores it (``[in, out]``) and of the token
    embedding's table -> ``"<module>.weight"``."""
    names = {rewrite.digest(linear_weight(m).float().t().numpy()): f"{name}.weight"
             for name, m in dense.named_modules() if is_linear(m)}
    embedding = dense.get_input_embeddings()
    embed_name = next(name for name, m in dense.named_modules() if m is embedding)
    names[rewrite.digest(embedding.weight.detach().float().numpy())] = f"{embed_name}.weight"
    return names


def linear_form(module: QuantizedLinear, options: OnnxOptions) -> str:
    """How a quantized linear is written: ``MatMulInteger``, ``MatMulNBits`` or ``float``."""
    storage = module.storage
    if storage.g_idx is not None:
        return "float"     # act-order columns: neither operator takes a column permutation here
    if storage.bits in (7, 8) and storage.group_size == -1:
        return "MatMulInteger"
    if options.contrib_ops and rewrite.runtime_runs_nbits(rewrite.nbits_width(storage.bits)):
        return "MatMulNBits"
    return "float"


def unattributed_weights(graph: onnx.GraphProto) -> list[str]:
    """Weights of ``MatMul`` nodes that no module was found for (the tracer changed them)."""
    initializers = {init.name for init in graph.initializer}
    return sorted({node.input[1] for node in graph.node if node.op_type == "MatMul"
                   and node.input[1] in initializers and node.input[1].startswith("onnx::")})


def rewrite_linears(graph: onnx.GraphProto, encoder: nn.Module, used: set[str], options: OnnxOptions) -> Counter:
    """Replace each quantized linear's float ``MatMul`` by its integer form; counts per form.
    ``used``: the weights the graph holds (the tracer leaves out what the sentence embedding
    never reads, such as a ``BertModel``'s pooler)."""
    forms: Counter = Counter()
    for name, module in encoder.named_modules():
        if not isinstance(module, QuantizedLinear) or f"{name}.weight" not in used:
            continue
        nodes = rewrite.consumers(graph, f"{name}.weight", "MatMul")
        if not nodes:
            raise PocketError(f"onnx: the traced graph has no MatMul reading {name}'s weight", exit_code=1,
                              fix="report this model type to pocketlm-onnx; export with the 'hf' exporter meanwhile")
        form = linear_form(module, options)
        for node in nodes:
            if form == "MatMulInteger":
                rewrite.integer_matmul(graph, node, name, module.storage)
            elif form == "MatMulNBits":
                rewrite.nbits_matmul(graph, node, name, module.storage)
        widened = form == "MatMulNBits" and rewrite.nbits_width(module.bits) != module.bits
        forms[f"{module.bits}-bit {form}" + (f" ({rewrite.nbits_width(module.bits)}-bit codes)" if widened else "")] += 1
    return forms


def embedding_form(module: QuantizedEmbedding) -> str:
    group = module.group_size
    return "float" if group != -1 and module.embedding_dim % group else "uint8 table"


def rewrite_embedding(graph: onnx.GraphProto, encoder: nn.Module) -> str | None:
    """Replace the quantized token embedding's ``Gather`` by the 1-byte table; its form."""
    embedding = encoder.get_input_embeddings()
    if not isinstance(embedding, QuantizedEmbedding):
        return None
    name = next(n for n, m in encoder.named_modules() if m is embedding)
    form = embedding_form(embedding)
    if form != "float":
        for node in rewrite.consumers(graph, f"{name}.weight", "Gather"):
            rewrite.quantized_gather(graph, node, name, embedding.storage)
    return f"{embedding.bits}-bit {form}"


# ------------------------------------------------------------------------------ files


def description(encoder: nn.Module, pooling: dict, forms: Counter, embedding: str | None, options) -> dict:
    width = encoder.config.hidden_size if hasattr(encoder.config, "hidden_size") else encoder.config.dim
    return {
        "format": "pocketlm-onnx", "model": MODEL_FILE, "opset": OPSET,
        "inputs": input_names(encoder),
        "outputs": {"last_hidden_state": ["batch", "sequence", width], "sentence_embedding": ["batch", width]},
        "pooling": {"mode": pooling["mode"], "normalize": bool(pooling["normalize"]),
                    "max_seq_length": pooling["max_seq_length"]},
        "dense_dtype": options.dtype,
        "quantized_linears": dict(sorted(forms.items())),
        "quantized_embedding": embedding,
    }


def write_config(encoder: nn.Module, path: Path) -> None:
    config = copy.deepcopy(encoder.config)
    config.architectures = [type(encoder).__name__]   # the graph is the bare encoder
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.to_json_file(path / "config.json")


def log_forms(context, forms: Counter, embedding: str | None, options) -> None:
    written = ", ".join(f"{count} {form}" for form, count in sorted(forms.items())) or "no quantized linears"
    context.log(f"onnx: {written}" + (f"; token embedding as a {embedding}" if embedding else ""))
    floats = sum(count for form, count in forms.items() if form.endswith("float"))
    if floats or (embedding or "").endswith("float"):
        why = ("contrib_ops = false" if not options.contrib_ops else
               "act-order grids, embedding groups that do not divide the width, or an ONNX Runtime "
               "without MatMulNBits at that width")
        context.log(f"onnx: layers marked float are written as dequantized float weights ({why}); "
                    "they compute exactly the model's weights but are not stored compactly")


def export_onnx(model: nn.Module, path: Path, options: OnnxOptions | None, context) -> None:
    options = options or OnnxOptions()
    problems = check(model, options, context)
    if problems:
        raise PocketError(problems[0], field="export.format", fix="choose an exporter that writes this model")
    path = Path(path)
    encoder = encoder_of(model)
    pooling = sentence.pooling(model)
    dense = dense_copy(encoder)
    proto = trace(dense, pooling)
    graph = proto.graph
    used = set(rewrite.rename_initializers(graph, weight_names(dense)).values())
    unattributed = unattributed_weights(graph)
    if unattributed:
        raise PocketError(f"onnx: the traced graph holds weights no linear of the model matches ({unattributed[0]}, "
                          f"{len(unattributed)} in all)", exit_code=1,
                          fix="report this model type to pocketlm-onnx; export with the 'hf' exporter meanwhile")
    forms = rewrite_linears(graph, encoder, used, options)
    embedding = rewrite_embedding(graph, encoder)
    if options.dtype == "float16":
        rewrite.store_float16(graph)
    rewrite.drop_unused(graph)
    if any("MatMulNBits" in form for form in forms):
        proto.opset_import.append(onnx.helper.make_opsetid(rewrite.CONTRIB, 1))
    proto.producer_name, proto.producer_version = "pocketlm-onnx", _version()
    onnx.checker.check_model(proto)
    onnx.save_model(proto, str(path / MODEL_FILE))
    write_config(encoder, path)
    if getattr(context, "tokenizer", None) is not None:
        context.tokenizer.save_pretrained(path)
    else:
        context.log("onnx: no tokenizer in the run; the export holds the model only")
    (path / DESCRIPTION_FILE).write_text(json.dumps(description(encoder, pooling, forms, embedding, options),
                                                    indent=2) + "\n")
    log_forms(context, forms, embedding, options)


def _version() -> str:
    from . import __version__

    return __version__
