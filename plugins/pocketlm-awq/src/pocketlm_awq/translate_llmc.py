"""llm-compressor's ``AWQModifier`` as an ``awq`` stage (``pocketlm import-recipe``).

In llm-compressor, AWQ only smooths: the ``QuantizationModifier`` after it in the same stage
sets the grid. pocketlm's ``awq`` searches the scales and quantizes in one stage, so the
translation takes that modifier's scheme and covers it. ``duo_scaling`` and ``n_grid`` carry
over; custom ``mappings`` are refused, because pocketlm reads the smoothing pairs from the
model's architecture table.
"""

from __future__ import annotations

from pocketlm.translate import Arguments, Modifier, Translation, Untranslatable, quantization_schemes

QUANTIZERS = ("QuantizationModifier", "GPTQModifier")


def translate_awq(modifier: Modifier, siblings: list[Modifier]) -> Translation:
    arguments = Arguments(modifier)
    arguments.ignore_schedule()
    absorbs: tuple[Modifier, ...] = ()
    if any(k in modifier.arguments for k in ("scheme", "config_groups")):
        schemes = quantization_schemes(arguments)
    else:
        quantizer = next((m for m in siblings if m.name in QUANTIZERS), None)
        if quantizer is None:
            raise Untranslatable("it smooths for a quantization modifier, and none follows it in its stage",
                                 fix="add a QuantizationModifier with a scheme after it")
        if quantizer.name == "GPTQModifier":
            raise Untranslatable("AWQ smoothing followed by GPTQ has no pocketlm counterpart: pocketlm's awq "
                                 "quantizes with round-to-nearest as it smooths",
                                 fix="use a QuantizationModifier after AWQModifier, or GPTQModifier alone")
        scheme_arguments = Arguments(quantizer)
        scheme_arguments.ignore_schedule()
        schemes = quantization_schemes(scheme_arguments)
        arguments.notes += scheme_arguments.finish("pocketlm's awq")
        absorbs = (quantizer,)
    options = {}
    if "mappings" in arguments.left and arguments.take("mappings") is not None:
        raise Untranslatable("custom mappings have no counterpart: pocketlm takes the smoothing pairs from the "
                             "model's architecture table", fix="remove mappings (the defaults cover Llama-style models)")
    duo = arguments.take("duo_scaling")
    if duo == "both":
        arguments.notes.append("AWQModifier.duo_scaling = 'both' becomes duo_scaling = true: pocketlm searches "
                               "one way")
        duo = True
    if duo is not None:
        options["duo_scaling"] = bool(duo)
    if (n_grid := arguments.take("n_grid")) is not None:
        options["n_grid"] = n_grid
    arguments.ignore("offload_device", "pocketlm keeps one layer's activations, on the CPU between layers")
    stages = []
    for scheme in schemes:
        scheme.pop("actorder", None)
        stages.append({"method": "awq", **scheme, **options})
    return Translation(stages=tuple(stages), notes=arguments.finish("pocketlm's awq"), absorbs=absorbs, export="awq")
