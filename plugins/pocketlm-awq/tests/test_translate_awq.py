"""AWQModifier translated for `pocketlm import-recipe`."""

from __future__ import annotations

import pytest

from pocketlm.translate import Modifier, Untranslatable
from pocketlm_awq.translate_llmc import translate_awq


def _modifier(name, line=1, **arguments):
    return Modifier(name, arguments, "quant_stage", line)


def test_awq_takes_the_scheme_of_the_quantization_modifier_after_it():
    quant = _modifier("QuantizationModifier", line=4, scheme="W4A16_ASYM", ignore=["lm_head"])
    translation = translate_awq(_modifier("AWQModifier", n_grid=10, duo_scaling=False), [quant])
    assert translation.absorbs == (quant,)
    assert translation.stages == ({"method": "awq", "bits": 4, "group_size": 128, "symmetric": False,
                                   "targets": ["*"], "ignore": ["embed", "lm_head"], "duo_scaling": False,
                                   "n_grid": 10},)
    assert translation.export == "awq"


def test_awq_with_its_own_scheme_covers_nothing_else():
    translation = translate_awq(_modifier("AWQModifier", scheme="W4A16", ignore=["lm_head"]), [])
    assert translation.absorbs == () and translation.stages[0]["symmetric"] is True


@pytest.mark.parametrize("arguments,siblings,message", [
    ({}, [], "none follows it in its stage"),
    ({}, [_modifier("GPTQModifier", scheme="W4A16")], "AWQ smoothing followed by GPTQ has no pocketlm counterpart"),
    ({"scheme": "W4A16", "mappings": [{"smooth_layer": "re:.*norm$"}]}, [], "custom mappings have no counterpart"),
    ({"scheme": "W4A16", "protect": 1}, [], "argument protect has no counterpart in pocketlm's awq"),
])
def test_what_awq_cannot_do_is_refused_with_the_reason(arguments, siblings, message):
    with pytest.raises(Untranslatable, match=message):
        translate_awq(_modifier("AWQModifier", **arguments), siblings)
