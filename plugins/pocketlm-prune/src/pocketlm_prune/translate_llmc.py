"""llm-compressor's pruning modifiers as pocketlm stages (``pocketlm import-recipe``).

* ``SparseGPTModifier`` becomes ``sparsegpt`` and ``WandaPruningModifier`` becomes ``wanda``:
  ``sparsity``, ``mask_structure`` (``2:4`` and ``4:8`` become ``pattern``), ``block_size``,
  ``dampening_frac`` (``damp``), ``sparsity_profile = "owl"`` with ``owl_m`` and ``owl_lmbda``,
  ``targets`` and ``ignore``.
* ``MagnitudePruningModifier`` (and SparseML's ``GMPruningModifier``) becomes ``magnitude`` at
  its final sparsity when it prunes once; a schedule over training epochs is refused.
* ``ConstantPruningModifier`` needs no stage: it keeps a mask at zero while training, and every
  pocketlm stage after a pruner keeps the mask (the feature ``masked``).
"""

from __future__ import annotations

from pocketlm.translate import Arguments, Modifier, Translation, Untranslatable, module_patterns

PATTERNS = {"0:0": None, "2:4": "2:4", "4:8": "4:8"}


def _prune_stage(method: str, arguments: Arguments) -> dict:
    arguments.ignore_schedule()
    sparsity = arguments.take("sparsity", 0.0)
    if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool):
        raise Untranslatable(f"sparsity {sparsity!r} is not one number; pocketlm prunes every targeted layer to one "
                             "sparsity (or varies it by OWL)", fix="write sparsity as a number, such as 0.5")
    structure = arguments.take("mask_structure", "0:0")
    if structure not in PATTERNS:
        raise Untranslatable(f"mask_structure {structure!r} has no counterpart (pocketlm has 2:4 and 4:8)",
                             fix="use mask_structure: 2:4, 4:8 or 0:0")
    stage = {"method": method, "sparsity": float(sparsity)}
    if PATTERNS[structure]:
        stage["pattern"] = PATTERNS[structure]
    profile = arguments.take("sparsity_profile")
    owl_m, owl_lambda = arguments.take("owl_m"), arguments.take("owl_lmbda")
    if profile not in (None, "owl"):
        raise Untranslatable(f"sparsity_profile {profile!r} has no counterpart (pocketlm has owl)")
    if profile == "owl":
        stage["layer_sparsity"] = "owl"
        if owl_m is not None:
            stage["owl_threshold"] = float(owl_m)
        if owl_lambda is not None:
            stage["owl_lambda"] = float(owl_lambda)
    targets = module_patterns(arguments.take("targets", ["Linear"]), "targets")
    ignore = module_patterns(arguments.take("ignore", []), "ignore")
    stage["targets"] = targets
    # llm-compressor prunes lm_head when Linear is targeted and it is not ignored; with tied
    # embeddings that would prune the input embedding too, so pocketlm never prunes the head
    stage["ignore"] = list(dict.fromkeys(["lm_head", *ignore]))
    if "*" in targets and "lm_head" not in ignore:
        arguments.notes.append(f"{arguments.modifier.name} leaves lm_head dense: pocketlm's pruners never prune "
                               "the head (llm-compressor would, unless ignored)")
    if arguments.take("preserve_sparsity_mask"):
        raise Untranslatable("preserve_sparsity_mask has no counterpart: pocketlm's pruners choose a fresh mask",
                             fix="remove preserve_sparsity_mask")
    arguments.ignore("sequential_update", "pocketlm walks the layers in order")
    arguments.ignore("offload_hessians", "pocketlm holds one layer's statistics at a time anyway")
    arguments.ignore("sequential_targets", "pocketlm walks the decoder layers its architecture table names")
    return stage


def translate_sparsegpt(modifier: Modifier, siblings: list[Modifier]) -> Translation:
    arguments = Arguments(modifier)
    stage = _prune_stage("sparsegpt", arguments)
    if (block_size := arguments.take("block_size")) is not None:
        stage["block_size"] = block_size
    damp = arguments.take("dampening_frac")
    damp = arguments.take("percdamp") if damp is None else damp  # SparseML's name for it
    if damp is not None:
        stage["damp"] = damp
    return Translation(stages=(stage,), notes=arguments.finish("pocketlm's sparsegpt"))


def translate_wanda(modifier: Modifier, siblings: list[Modifier]) -> Translation:
    arguments = Arguments(modifier)
    stage = _prune_stage("wanda", arguments)
    return Translation(stages=(stage,), notes=arguments.finish("pocketlm's wanda"))


def translate_magnitude(modifier: Modifier, siblings: list[Modifier]) -> Translation:
    """One-shot magnitude pruning to ``final_sparsity``; a schedule over training is refused."""
    arguments = Arguments(modifier)
    start, end = arguments.take("start_epoch"), arguments.take("end_epoch")  # SparseML's names
    if start is not None and end is not None and end > start:
        raise Untranslatable(f"start_epoch {start} to end_epoch {end} prunes gradually while training; pocketlm "
                             "prunes once", fix="prune once with pocketlm's magnitude, then recover with distill")
    init, final = arguments.take("init_sparsity"), arguments.take("final_sparsity")
    arguments.left.setdefault("sparsity", final if final is not None else init)
    arguments.ignore("update_frequency", "pruning happens once")
    arguments.ignore("leave_enabled", "every later pocketlm stage keeps the mask")
    params = arguments.take("params")
    if params is not None and params != "__ALL_PRUNABLE__":
        arguments.left.setdefault("targets", params)
    arguments.take("mask_type") in (None, "unstructured") or _refuse_mask_type(modifier)
    stage = _prune_stage("magnitude", arguments)
    return Translation(stages=(stage,), notes=arguments.finish("pocketlm's magnitude"))


def _refuse_mask_type(modifier: Modifier) -> None:
    raise Untranslatable(f"mask_type {modifier.arguments['mask_type']!r} has no counterpart (pocketlm prunes "
                         "unstructured, or N:M with mask_structure)", fix="remove mask_type")


def translate_constant(modifier: Modifier, siblings: list[Modifier]) -> Translation:
    arguments = Arguments(modifier)
    arguments.ignore_schedule()
    arguments.take("targets")
    arguments.ignore("ignore", "every mask is kept")
    notes = arguments.finish("pocketlm")
    return Translation(notes=notes + ("ConstantPruningModifier needs no stage: every pocketlm stage after a pruner "
                                      "keeps its mask at zero",))
