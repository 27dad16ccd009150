"""pocketlm-awq: activation-aware weight quantization (AWQ) and the AWQ GEMM checkpoint format.

* method ``awq`` (kind ``quantize``): per-channel scale search, scale folding through the
  architecture table's ``smooth`` pairs, clipping search and rounding into pocketlm's
  ``QuantizedLinear``;
* exporter ``awq``: AutoAWQ's GEMM layout, read by transformers, vLLM and GPTQModel;
* loader ``awq-checkpoint``: an AutoAWQ GEMM folder as a model source, its grids kept exactly.
"""

from __future__ import annotations

from pocketlm import PHASE_QUANTIZE, Exporter, Method, hookimpl

from . import awq, export_awq

__version__ = "0.5.0"
POCKETLM_API = ">=1.7,<2"


@hookimpl
def register_methods(register):
    register(Method(
        name="awq", kind="quantize", options=awq.AWQOptions, compress=awq.compress,
        summary="activation-aware weight quantization: scale search + folding, clipping, group-wise rounding",
        needs_calibration=True, effect=awq.effect, phase=PHASE_QUANTIZE, exclusive=True))


@hookimpl
def register_loaders(register):
    from pocketlm import Loader

    from . import import_awq

    register(Loader("awq-checkpoint", import_awq.is_awq_folder, import_awq.load_awq,
                    "an AutoAWQ GEMM checkpoint folder (AutoAWQ, transformers), its grids kept exactly"))


@hookimpl
def register_exporters(register):
    register(Exporter(
        name="awq", options=export_awq.AWQExportOptions, export=export_awq.export_awq,
        represents=frozenset({"quantized", "dense", "masked", "restructured"}), packs=frozenset({"quantized"}),
        check=export_awq.check, streams=True,
        summary="AutoAWQ GEMM checkpoint (4-bit, grouped) for transformers, vLLM and GPTQModel"))


@hookimpl
def register_translators(register):
    from pocketlm import Translator

    from .translate_llmc import translate_awq

    register(Translator("AWQModifier", translate_awq, "an awq stage, with the scheme of the QuantizationModifier after it"))
