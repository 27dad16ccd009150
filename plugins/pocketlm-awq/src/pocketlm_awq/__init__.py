"""pocketlm-awq: activation-aware weight quantization (AWQ) and the AWQ GEMM checkpoint format.

* method ``awq`` (kind ``quantize``): per-channel scale search, scale folding through the
  architecture table's ``smooth`` pairs, clipping search and rounding into pocketlm's
  ``QuantizedLinear``;
* exporter ``awq``: AutoAWQ's GEMM layout, read by transformers, vLLM and GPTQModel;
* loader ``awq-checkpoint``: an AutoAWQ GEMM folder as a model source, its grids kept exactly.
"""

from __future__ import annotations

from pocketlm import PHASE_QUANTIZE, Exporter, Loader, Method, Translator, hookimpl, lazy

from . import options

__version__ = "0.5.1"
POCKETLM_API = ">=1.8,<2"

# Registration reads only the options models and the size effect (``options``); the tensor code
# is imported when a stage, export, load or translation first runs (``pocketlm.lazy``).


@hookimpl
def register_methods(register):
    register(Method(
        name="awq", kind="quantize", options=options.AWQOptions, compress=lazy("pocketlm_awq.awq:compress"),
        summary="activation-aware weight quantization: scale search + folding, clipping, group-wise rounding",
        needs_calibration=True, effect=options.effect, phase=PHASE_QUANTIZE, exclusive=True))


@hookimpl
def register_loaders(register):
    register(Loader("awq-checkpoint", lazy("pocketlm_awq.import_awq:is_awq_folder"),
                    lazy("pocketlm_awq.import_awq:load_awq"),
                    "an AutoAWQ GEMM checkpoint folder (AutoAWQ, transformers), its grids kept exactly"))


@hookimpl
def register_exporters(register):
    register(Exporter(
        name="awq", options=options.AWQExportOptions, export=lazy("pocketlm_awq.export_awq:export_awq"),
        represents=frozenset({"quantized", "dense", "masked", "restructured"}), packs=frozenset({"quantized"}),
        check=lazy("pocketlm_awq.export_awq:check"), streams=True,
        summary="AutoAWQ GEMM checkpoint (4-bit, grouped) for transformers, vLLM and GPTQModel"))


@hookimpl
def register_translators(register):
    register(Translator("AWQModifier", lazy("pocketlm_awq.translate_llmc:translate_awq"),
                        "an awq stage, with the scheme of the QuantizationModifier after it"))
