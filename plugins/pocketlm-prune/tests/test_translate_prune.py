"""SparseGPTModifier, WandaPruningModifier and ConstantPruningModifier translated for `pocketlm import-recipe`."""

from __future__ import annotations

import pytest

from pocketlm.translate import Modifier, Untranslatable
from pocketlm_prune.translate_llmc import translate_constant, translate_sparsegpt, translate_wanda


def _modifier(name, **arguments):
    return Modifier(name, arguments, "sparsity_stage", 2)


def test_sparsegpt_with_owl_and_a_pattern():
    translation = translate_sparsegpt(_modifier("SparseGPTModifier", sparsity=0.6, mask_structure="4:8",
                                                sparsity_profile="owl", owl_m=7, owl_lmbda=0.1, block_size=64,
                                                dampening_frac=0.02, ignore=["re:.*lm_head"]), [])
    assert translation.stages == ({"method": "sparsegpt", "sparsity": 0.6, "pattern": "4:8", "layer_sparsity": "owl",
                                   "owl_threshold": 7.0, "owl_lambda": 0.1, "targets": ["*"],
                                   "ignore": ["lm_head", "*lm_head", "*lm_head.*"], "block_size": 64, "damp": 0.02},)


def test_wanda_keeps_the_head_dense_and_says_so():
    translation = translate_wanda(_modifier("WandaPruningModifier", sparsity=0.5), [])
    assert translation.stages[0] == {"method": "wanda", "sparsity": 0.5, "targets": ["*"], "ignore": ["lm_head"]}
    assert "leaves lm_head dense" in translation.notes[0]


def test_constant_pruning_needs_no_stage():
    translation = translate_constant(_modifier("ConstantPruningModifier", targets="__ALL_PRUNABLE__", start=-1), [])
    assert translation.stages == ()
    assert translation.notes[-1].startswith("ConstantPruningModifier needs no stage")


@pytest.mark.parametrize("arguments,message", [
    ({"sparsity": {"re:.*q_proj": 0.5}}, "is not one number"),
    ({"sparsity": 0.5, "mask_structure": "16:32"}, "mask_structure '16:32' has no counterpart"),
    ({"sparsity": 0.5, "preserve_sparsity_mask": True}, "preserve_sparsity_mask has no counterpart"),
    ({"sparsity": 0.5, "start": 1, "end": 5}, "schedules it during training"),
])
def test_what_pruning_cannot_do_is_refused_with_the_reason(arguments, message):
    with pytest.raises(Untranslatable, match=message):
        translate_sparsegpt(_modifier("SparseGPTModifier", **arguments), [])


def test_sparseml_obcq_arguments_and_layer_regexes():
    translation = translate_sparsegpt(_modifier("SparseGPTModifier", sparsity=0.5, percdamp=0.01,
                                                targets=["re:model.layers.\\d*$"]), [])
    assert translation.stages[0]["damp"] == 0.01 and translation.stages[0]["targets"] == ["model.layers.*"]
    with pytest.raises(Untranslatable, match="argument quantize has no counterpart in pocketlm's sparsegpt"):
        translate_sparsegpt(_modifier("SparseGPTModifier", sparsity=0.5, quantize=True), [])


def test_one_shot_magnitude_pruning_and_a_training_schedule():
    from pocketlm_prune.translate_llmc import translate_magnitude

    once = translate_magnitude(_modifier("GMPruningModifier", init_sparsity=0.05, final_sparsity=0.6,
                                         start_epoch=0.0, end_epoch=0.0, params="__ALL_PRUNABLE__"), [])
    assert once.stages == ({"method": "magnitude", "sparsity": 0.6, "targets": ["*"], "ignore": ["lm_head"]},)
    with pytest.raises(Untranslatable, match="prunes gradually while training"):
        translate_magnitude(_modifier("GMPruningModifier", final_sparsity=0.6, start_epoch=1.0, end_epoch=10.0), [])
    with pytest.raises(Untranslatable, match="mask_type 'block4' has no counterpart"):
        translate_magnitude(_modifier("GMPruningModifier", final_sparsity=0.6, mask_type="block4"), [])
