"""GPTQModifier, QuantizationModifier and SmoothQuantModifier translated for `pocketlm import-recipe`."""

from __future__ import annotations

import pytest

from pocketlm.translate import Modifier, Untranslatable
from pocketlm_gptq.translate_llmc import refuse_smoothquant, translate_gptq, translate_quantization


def _modifier(name, line=1, **arguments):
    return Modifier(name, arguments, "quant_stage", line)


def test_gptq_modifier_becomes_a_gptq_stage_with_its_solver_settings():
    translation = translate_gptq(_modifier("GPTQModifier", scheme="W4A16_ASYM", ignore=["lm_head"], block_size=64,
                                           dampening_frac=0.05, actorder=None, offload_hessians=True), [])
    assert translation.stages == ({"method": "gptq", "bits": 4, "group_size": 128, "symmetric": False,
                                   "targets": ["*"], "ignore": ["embed", "lm_head"], "act_order": False,
                                   "block_size": 64, "damp": 0.05},)
    assert translation.export == "compressed-tensors"
    assert translation.notes == ("GPTQModifier.offload_hessians = True is not carried over: pocketlm holds one "
                                 "layer's Hessians at a time anyway",)


def test_actorder_follows_llmcompressor_precedence():
    group = {"weights": {"num_bits": 4, "strategy": "group", "group_size": 64, "actorder": None}}
    scheme_says = translate_gptq(_modifier("GPTQModifier", config_groups={"g": group}, ignore=["lm_head"]), [])
    # llm-compressor's default ("static") replaces a scheme's null; only the modifier's own null turns it off
    assert scheme_says.stages[0]["act_order"] is True
    off = translate_gptq(_modifier("GPTQModifier", config_groups={"g": group}, actorder=None), [])
    assert off.stages[0]["act_order"] is False
    with pytest.raises(Untranslatable, match="actorder 'weight' has no counterpart"):
        translate_gptq(_modifier("GPTQModifier", scheme="W4A16", actorder="weight"), [])


def test_one_stage_per_config_group_with_its_own_targets():
    groups = {"attention": {"weights": {"num_bits": 8, "strategy": "channel"}, "targets": ["re:.*self_attn\\.(q|k|v|o)_proj$"]},
              "mlp": {"weights": {"num_bits": 4, "strategy": "group", "group_size": 32}, "targets": ["re:.*mlp\\.(gate|up|down)_proj$"]}}
    translation = translate_gptq(_modifier("GPTQModifier", config_groups=groups, ignore=["lm_head"]), [])
    assert [(s["bits"], s["group_size"]) for s in translation.stages] == [(8, -1), (4, 32)]
    # '.*' inside a name is the glob's '*'; a character class of layer indices has no glob
    wildcard = translate_gptq(_modifier("GPTQModifier", config_groups={"g": {
        "weights": {"num_bits": 4, "strategy": "group", "group_size": 32}, "targets": ["re:.*self_attn.*_proj$"]}}), [])
    assert wildcard.stages[0]["targets"] == ["*self_attn*_proj", "*self_attn*_proj.*"]
    with pytest.raises(Untranslatable, match="cannot express"):
        translate_gptq(_modifier("GPTQModifier", config_groups={"g": {
            "weights": {"num_bits": 4, "strategy": "group", "group_size": 32},
            "targets": ["re:.*layers\\.[0-3]\\.mlp.*"]}}), [])


def test_quantization_modifier_alone_is_rtn_and_with_a_bare_gptq_after_it_is_gptq():
    quant = _modifier("QuantizationModifier", scheme="W8A16", ignore=["lm_head"])
    alone = translate_quantization(quant, [])
    assert alone.stages == ({"method": "rtn", "bits": 8, "group_size": 128, "symmetric": True, "targets": ["*"],
                             "ignore": ["embed", "lm_head"]},)
    gptq = _modifier("GPTQModifier", line=5, block_size=32)
    together = translate_quantization(quant, [gptq])
    assert together.absorbs == (gptq,)
    assert together.stages[0]["method"] == "gptq" and together.stages[0]["block_size"] == 32
    with pytest.raises(Untranslatable, match="names no quantization scheme, and no QuantizationModifier"):
        translate_gptq(gptq, [])


def test_unknown_arguments_and_smoothquant_are_refused_by_name():
    with pytest.raises(Untranslatable, match="argument sym_mode has no counterpart in pocketlm's gptq"):
        translate_gptq(_modifier("GPTQModifier", scheme="W4A16", sym_mode="odd"), [])
    with pytest.raises(Untranslatable, match="pocketlm's quantizers \\(rtn, gptq\\) are weight-only"):
        refuse_smoothquant(_modifier("SmoothQuantModifier", smoothing_strength=0.8), [])
