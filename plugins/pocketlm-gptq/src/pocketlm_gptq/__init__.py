"""pocketlm-gptq: weight-only quantization (``rtn``, ``gptq``) and the ``gptq`` and
``compressed-tensors`` exporters.

Methods write ``pocketlm.weights.QuantizedLinear`` (and ``QuantizedEmbedding`` for a targeted
token embedding), so any exporter that represents ``"quantized"`` can write their results.
"""

from __future__ import annotations

import pocketlm
from pocketlm import PHASE_QUANTIZE, Exporter, Method, hookimpl

from . import common, gptq, rtn

__version__ = "0.5.0"
POCKETLM_API = ">=1.7,<2"


@hookimpl
def register_methods(register):
    register(Method(
        name="rtn", kind="quantize", options=rtn.RTNOptions, compress=rtn.compress_rtn,
        summary="round-to-nearest weight quantization (2/3/4/8 bit, per channel or grouped; embeddings too)",
        needs_calibration=False, effect=common.effect, phase=PHASE_QUANTIZE, exclusive=True,
        plan=rtn.plan))
    register(Method(
        name="gptq", kind="quantize", options=gptq.GPTQOptions, compress=gptq.compress_gptq,
        summary="GPTQ: Hessian-aware weight quantization, layer by layer on calibration data",
        needs_calibration=True, effect=common.effect, phase=PHASE_QUANTIZE, exclusive=True,
        plan=gptq.plan))


@hookimpl
def register_loaders(register):
    from pocketlm import Loader

    from . import import_compressed_tensors, import_gptq

    register(Loader("gptq-checkpoint", import_gptq.is_gptq_folder, import_gptq.load_gptq,
                    "a GPTQ checkpoint folder (AutoGPTQ, GPTQModel, transformers), its grids kept exactly"))
    register(Loader("compressed-tensors-checkpoint", import_compressed_tensors.is_compressed_tensors_folder,
                    import_compressed_tensors.load_compressed_tensors,
                    "a compressed-tensors pack-quantized folder (llm-compressor), its grids kept exactly"))


@hookimpl
def register_exporters(register):
    from . import export_compressed_tensors, export_gptq

    register(Exporter(
        name="gptq", options=export_gptq.GPTQExportOptions, export=export_gptq.export_gptq,
        represents=frozenset({"dense", "quantized", "masked", "restructured"}), packs=frozenset({"quantized"}),
        check=export_gptq.check_gptq, streams=True,
        summary="GPTQ checkpoint (qweight/qzeros/scales/g_idx) for transformers+gptqmodel, GPTQModel, vLLM"))
    register(Exporter(
        name="compressed-tensors", options=export_compressed_tensors.CTExportOptions,
        export=export_compressed_tensors.export_compressed_tensors,
        represents=frozenset({"dense", "quantized", "masked", "restructured"}), packs=frozenset({"quantized"}),
        check=export_compressed_tensors.check_compressed_tensors,
        summary="compressed-tensors pack-quantized checkpoint for transformers and vLLM", streams=True))


@hookimpl
def register_translators(register):
    from pocketlm import Translator

    from . import translate_llmc as t

    register(Translator("GPTQModifier", t.translate_gptq, "a gptq stage per weight scheme"))
    register(Translator("QuantizationModifier", t.translate_quantization,
                        "an rtn stage per weight scheme (gptq when a GPTQModifier without a scheme follows)"))
    register(Translator("SmoothQuantModifier", t.refuse_smoothquant, "refused: it prepares 8-bit activations"))


__all__ = ["POCKETLM_API", "__version__", "pocketlm"]
