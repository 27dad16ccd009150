"""pocketlm-gptq: weight-only quantization (``rtn``, ``gptq``) and the ``gptq`` and
``compressed-tensors`` exporters.

Methods write ``pocketlm.weights.QuantizedLinear`` (and ``QuantizedEmbedding`` for a targeted
token embedding), so any exporter that represents ``"quantized"`` can write their results.
"""

from __future__ import annotations

import pocketlm
from pocketlm import PHASE_QUANTIZE, Exporter, Loader, Method, Translator, hookimpl, lazy

from . import options

__version__ = "0.5.1"
POCKETLM_API = ">=1.9,<2"

# Registration reads only the options models, size effect and plans (``options``); the tensor
# code is imported when a stage, export, load or translation first runs (``pocketlm.lazy``).


@hookimpl
def register_methods(register):
    register(Method(
        name="rtn", kind="quantize", options=options.RTNOptions, compress=lazy("pocketlm_gptq.rtn:compress_rtn"),
        summary="round-to-nearest weight quantization (2/3/4/8 bit, per channel or grouped; embeddings too)",
        needs_calibration=False, effect=options.effect, phase=PHASE_QUANTIZE, exclusive=True,
        plan=options.plan_rtn))
    register(Method(
        name="gptq", kind="quantize", options=options.GPTQOptions, compress=lazy("pocketlm_gptq.gptq:compress_gptq"),
        summary="GPTQ: Hessian-aware weight quantization, layer by layer on calibration data",
        needs_calibration=True, effect=options.effect, phase=PHASE_QUANTIZE, exclusive=True,
        plan=options.plan_gptq))


@hookimpl
def register_loaders(register):
    register(Loader("gptq-checkpoint", lazy("pocketlm_gptq.import_gptq:is_gptq_folder"),
                    lazy("pocketlm_gptq.import_gptq:load_gptq"),
                    "a GPTQ checkpoint folder (AutoGPTQ, GPTQModel, transformers), its grids kept exactly"))
    register(Loader("compressed-tensors-checkpoint",
                    lazy("pocketlm_gptq.import_compressed_tensors:is_compressed_tensors_folder"),
                    lazy("pocketlm_gptq.import_compressed_tensors:load_compressed_tensors"),
                    "a compressed-tensors pack-quantized folder (llm-compressor), its grids kept exactly"))


@hookimpl
def register_exporters(register):
    register(Exporter(
        name="gptq", options=options.GPTQExportOptions, export=lazy("pocketlm_gptq.export_gptq:export_gptq"),
        represents=frozenset({"dense", "quantized", "masked", "restructured"}), packs=frozenset({"quantized"}),
        check=lazy("pocketlm_gptq.export_gptq:check_gptq"), streams=True,
        summary="GPTQ checkpoint (qweight/qzeros/scales/g_idx) for transformers+gptqmodel, GPTQModel, vLLM"))
    register(Exporter(
        name="compressed-tensors", options=options.CTExportOptions,
        export=lazy("pocketlm_gptq.export_compressed_tensors:export_compressed_tensors"),
        represents=frozenset({"dense", "quantized", "masked", "restructured"}), packs=frozenset({"quantized"}),
        check=lazy("pocketlm_gptq.export_compressed_tensors:check_compressed_tensors"),
        summary="compressed-tensors pack-quantized checkpoint for transformers and vLLM", streams=True))


@hookimpl
def register_translators(register):
    translators = "pocketlm_gptq.translate_llmc"
    register(Translator("GPTQModifier", lazy(f"{translators}:translate_gptq"), "a gptq stage per weight scheme"))
    register(Translator("QuantizationModifier", lazy(f"{translators}:translate_quantization"),
                        "an rtn stage per weight scheme (gptq when a GPTQModifier without a scheme follows)"))
    register(Translator("SmoothQuantModifier", lazy(f"{translators}:refuse_smoothquant"),
                        "refused: it prepares 8-bit activations"))


__all__ = ["POCKETLM_API", "__version__", "pocketlm"]
