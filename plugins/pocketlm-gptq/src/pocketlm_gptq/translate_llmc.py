"""llm-compressor's quantization modifiers as rtn and gptq stages (``pocketlm import-recipe``).

* ``QuantizationModifier`` (round-to-nearest) becomes ``rtn``; when a ``GPTQModifier`` without a
  scheme of its own follows in the same stage, the two are one ``gptq`` stage, as in
  llm-compressor, where GPTQ then quantizes with the scheme the first one set.
* ``GPTQModifier`` becomes ``gptq``: ``block_size``, ``dampening_frac`` (``damp``) and
  ``actorder`` (``static`` is pocketlm's ``act_order = true``; ``null`` is false).
* ``SmoothQuantModifier`` is refused with the reason: it prepares 8-bit activations.

Each weight scheme (``scheme`` or one of ``config_groups``) becomes one stage with its own
``targets``; the reading of schemes is the core's (:func:`pocketlm.translate.quantization_schemes`).
"""

from __future__ import annotations

from pocketlm.translate import Arguments, Modifier, Translation, Untranslatable, quantization_schemes

EXPORT = "compressed-tensors"  # what llm-compressor itself saves


def _has_scheme(modifier: Modifier) -> bool:
    return any(k in modifier.arguments for k in ("scheme", "config_groups"))


def act_order(value) -> bool:
    """pocketlm's ``act_order`` for an llm-compressor ``actorder``."""
    if value in (None, False, "null"):
        return False
    if value in ("static", True):
        return True
    raise Untranslatable(f"actorder {value!r} has no counterpart: pocketlm's gptq orders columns with static "
                         "groups (actorder: static) or not at all (actorder: null)",
                         fix="write actorder: static or actorder: null")


def gptq_stages(arguments: Arguments, schemes: list[dict]) -> list[dict]:
    """``gptq`` stages for ``schemes`` with the GPTQ arguments of ``arguments``."""
    options = {}
    if (block_size := arguments.take("block_size")) is not None:
        options["block_size"] = block_size
    if (damp := arguments.take("dampening_frac")) is not None:
        options["damp"] = damp
    explicit = "actorder" in arguments.left
    modifier_order = arguments.take("actorder")
    arguments.ignore("offload_hessians", "pocketlm holds one layer's Hessians at a time anyway")
    arguments.ignore("batched_quantization", "pocketlm solves one linear at a time")
    arguments.ignore("sequential_targets", "pocketlm walks the decoder layers its architecture table names")
    if "true_sequential" in arguments.left:
        options["true_sequential"] = bool(arguments.take("true_sequential"))
    arguments.ignore("sequential_update", "pocketlm's true_sequential decides the order")
    stages = []
    for scheme in schemes:
        written = scheme.pop("actorder", None)
        # llm-compressor's own rule: the modifier's actorder wins when given, else the scheme's, else static
        order = modifier_order if explicit else (written if written is not None else "static")
        stages.append({"method": "gptq", **scheme, "act_order": act_order(order), **options})
    return stages


def translate_gptq(modifier: Modifier, siblings: list[Modifier]) -> Translation:
    arguments = Arguments(modifier)
    arguments.ignore_schedule()
    if not _has_scheme(modifier):
        raise Untranslatable("it names no quantization scheme, and no QuantizationModifier before it in its "
                             "stage sets one", fix="add scheme: W4A16 (or config_groups) to it")
    stages = gptq_stages(arguments, quantization_schemes(arguments))
    return Translation(stages=tuple(stages), notes=arguments.finish("pocketlm's gptq"), export=EXPORT)


def translate_quantization(modifier: Modifier, siblings: list[Modifier]) -> Translation:
    arguments = Arguments(modifier)
    arguments.ignore_schedule()
    schemes = quantization_schemes(arguments)
    notes = arguments.finish("pocketlm's rtn")
    gptq = next((m for m in siblings if m.name == "GPTQModifier"), None)
    if gptq is not None and not _has_scheme(gptq):
        solver = Arguments(gptq)
        solver.ignore_schedule()
        stages = gptq_stages(solver, schemes)
        return Translation(stages=tuple(stages), notes=notes + solver.finish("pocketlm's gptq"), absorbs=(gptq,),
                           export=EXPORT)
    for scheme in schemes:
        scheme.pop("actorder", None)  # round-to-nearest has no column order
    return Translation(stages=tuple({"method": "rtn", **s} for s in schemes), notes=notes, export=EXPORT)


def refuse_smoothquant(modifier: Modifier, siblings: list[Modifier]) -> Translation:
    raise Untranslatable("it moves activation outliers into the weights so that activations quantize to 8 bits; "
                         "pocketlm's quantizers (rtn, gptq) are weight-only, so it has no counterpart",
                         fix="remove SmoothQuantModifier and use a weight-only scheme (W4A16, W8A16)")
