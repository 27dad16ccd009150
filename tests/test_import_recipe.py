"""`pocketlm import-recipe`: llm-compressor and SparseML recipes read as pocketlm recipes.

The core reads the file and owns refusals; each modifier is translated by the plugin that
registered it (``register_translators``). The recipes under ``tests/data/llmcompressor-recipes``
come from llm-compressor's own test suite (see the README there).
"""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

from pocketlm import PocketError, Translator, hookimpl
from pocketlm.cli import main
from pocketlm.plugins import Plugins
from pocketlm.translate import (Arguments, Modifier, Translation, Untranslatable, module_patterns,
                                quantization_schemes, read_modifiers, translate_recipe)

RECIPES = Path(__file__).parent / "data" / "llmcompressor-recipes"


def _toy_plugin(translate=None, name="ToyModifier"):
    module = types.ModuleType("translator-toy")
    module.POCKETLM_API = ">=1.7,<2"

    def toy(modifier, siblings):
        arguments = Arguments(modifier)
        stage = {"method": "toy-round", "bits": arguments.take("bits", 4)}
        return Translation(stages=(stage,), notes=arguments.finish("toy-round"))

    @hookimpl
    def register_translators(register):
        register(Translator(name, translate or toy, "a toy-round stage"))

    module.register_translators = register_translators
    return module


def _write(tmp_path, text, name="recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------ the hook and the reader


def test_register_translators_collects_translators_by_class_name(tmp_path):
    plugins = Plugins(entry_points=False, extra=[("translator-toy", _toy_plugin())])
    assert plugins.owner[("translators", "ToyModifier")] == "translator-toy"
    recipe = _write(tmp_path, "stage:\n  modifiers:\n    ToyModifier:\n      bits: 8\n")
    imported = translate_recipe(recipe, plugins, "tiny")
    assert imported.recipe["stages"] == [{"method": "toy-round", "bits": 8}]
    assert imported.recipe["model"] == {"source": "tiny"}


def test_a_translator_with_a_bad_name_or_no_callable_skips_its_plugin():
    plugins = Plugins(entry_points=False, extra=[("translator-toy", _toy_plugin(name="Bad Name!"))])
    assert not plugins.translators and "invalid name 'Bad Name!'" in plugins.problems[0].reason
    plugins = Plugins(entry_points=False, extra=[("translator-toy", _toy_plugin(translate="nope"))])
    assert "translate is not callable" in plugins.problems[0].reason


def test_modifiers_are_read_in_order_with_their_stage_and_line(tmp_path):
    path = _write(tmp_path, "first_stage:\n  quant_modifiers:\n    A: {x: 1}\n    B:\n"
                            "second_stage:\n  run_type: oneshot\n  obcq_modifiers:\n    C: {y: [1, 2]}\n")
    modifiers, notes = read_modifiers(path)
    assert modifiers == [Modifier("A", {"x": 1}, "first_stage", 3), Modifier("B", {}, "first_stage", 4),
                         Modifier("C", {"y": [1, 2]}, "second_stage", 8)]
    assert notes == ["second_stage.run_type (line 6) is not a modifier group and is not carried over"]


def test_sparseml_tagged_modifiers_are_read_by_their_tag(tmp_path):
    path = _write(tmp_path, "version: 1.1.0\nmodifiers:\n  - !GMPruningModifier\n    final_sparsity: 0.5\n")
    modifiers, notes = read_modifiers(path)
    assert modifiers == [Modifier("GMPruningModifier", {"final_sparsity": 0.5}, "(top level)", 3)]
    assert notes == ["version (line 1) is not a stage and is not carried over"]


@pytest.mark.parametrize("text,message", [
    ("", "the recipe holds no stages"),
    ("stage:\n  modifiers:\n    A: {}\n    A: {}\n", "duplicate key 'A' (first at line 3)"),
    ("stage:\n  notes: 1\n", "the recipe holds no modifiers"),
    ("stage:\n  modifiers:\n    A: 3\n", "A's arguments are not a table"),
    ("stage: [\n", "YAML syntax error"),
])
def test_a_malformed_recipe_gets_one_error_naming_the_file(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(PocketError, match=re.escape(message)) as error:
        read_modifiers(path)
    assert error.value.file == str(path)


# ------------------------------------------------------------------ shared readers


def test_module_patterns_turn_targets_into_globs():
    assert module_patterns(["Linear"], "targets") == ["*"]
    assert module_patterns("lm_head", "ignore") == ["lm_head"]
    assert module_patterns(["re:.*self_attn\\.(q|k)_proj$"], "targets") == [
        "*self_attn.q_proj", "*self_attn.q_proj.*", "*self_attn.k_proj", "*self_attn.k_proj.*"]
    assert module_patterns(["re:model.layers.0.mlp.down_proj"], "ignore") == ["model.layers.0.mlp.down_proj"]
    with pytest.raises(Untranslatable, match="regular expression that pocketlm's module-name patterns cannot"):
        module_patterns(["re:.*layers\\.[0-3]\\..*"], "targets")
    with pytest.raises(Untranslatable, match="names the module class 'LlamaDecoderLayer'"):
        module_patterns(["LlamaDecoderLayer"], "targets")


def _schemes(**arguments):
    return quantization_schemes(Arguments(Modifier("GPTQModifier", arguments, "s", 1)))


def test_quantization_schemes_read_presets_and_config_groups():
    assert _schemes(scheme="W4A16", ignore=["lm_head"]) == [
        {"bits": 4, "group_size": 128, "symmetric": True, "targets": ["*"], "ignore": ["embed", "lm_head"]}]
    assert _schemes(scheme="W4A16_ASYM", ignore=["lm_head"])[0]["symmetric"] is False
    group = {"weights": {"num_bits": 8, "type": "int", "strategy": "channel", "actorder": "static"},
             "targets": ["re:.*mlp\\.down_proj$"]}
    assert _schemes(config_groups={"group_0": group}, ignore=["lm_head"]) == [
        {"bits": 8, "group_size": -1, "symmetric": True, "targets": ["*mlp.down_proj", "*mlp.down_proj.*"],
         "ignore": ["embed", "lm_head"], "actorder": "static"}]


def test_a_scheme_that_quantizes_the_head_says_so():
    arguments = Arguments(Modifier("QuantizationModifier", {"scheme": "W8A16"}, "s", 1))
    assert quantization_schemes(arguments)[0]["targets"] == ["*", "lm_head"]
    assert "quantizes lm_head" in arguments.notes[0]


@pytest.mark.parametrize("arguments,message", [
    ({"scheme": "W8A8"}, "scheme 'W8A8' quantizes activations or uses float formats"),
    ({"scheme": "FP8_DYNAMIC"}, "scheme 'FP8_DYNAMIC' quantizes activations"),
    ({"config_groups": {"g": {"weights": {"num_bits": 8, "type": "float", "strategy": "channel"}}}},
     "weights of type 'float'"),
    ({"config_groups": {"g": {"weights": {"num_bits": 4, "strategy": "tensor"}}}}, "strategy 'tensor' has no"),
    ({"scheme": "W4A16", "kv_cache_scheme": {"num_bits": 8}}, "kv_cache_scheme quantizes the attention cache"),
    ({}, "it names no quantization scheme"),
])
def test_schemes_with_no_weight_only_integer_counterpart_are_refused(arguments, message):
    with pytest.raises(Untranslatable, match=re.escape(message)):
        _schemes(**arguments)


def test_arguments_left_over_are_refused_by_name():
    arguments = Arguments(Modifier("GPTQModifier", {"block_size": 64, "warp": 9, "start": 2}, "s", 1))
    arguments.take("block_size")
    with pytest.raises(Untranslatable, match="start = 2 schedules it during training"):
        arguments.ignore_schedule()
    arguments.left.pop("start", None)
    with pytest.raises(Untranslatable, match="argument warp has no counterpart in pocketlm's gptq"):
        arguments.finish("pocketlm's gptq")


# ------------------------------------------------------------------ the command, with the first-party plugins


def _needs_first_party_translators():
    from pocketlm.plugins import get_plugins

    missing = {"GPTQModifier", "AWQModifier", "SparseGPTModifier"} - set(get_plugins().translators)
    if missing:
        pytest.skip(f"the gptq, awq and prune plugins are not all installed (missing {sorted(missing)})")


def _import(*arguments):
    result = CliRunner().invoke(main, ["import-recipe", *map(str, arguments)])
    return result.exit_code, result.stdout, result.stderr


def test_llmcompressor_quantization_then_gptq_becomes_one_gptq_stage():
    _needs_first_party_translators()
    code, out, err = _import(RECIPES / "new_quant_group.yaml")
    assert code == 0, err
    assert out.splitlines()[:3] == [
        "# pocketlm recipe translated by `pocketlm import-recipe` from new_quant_group.yaml",
        "#   test_stage: QuantizationModifier (line 3) -> gptq",
        "# note: GPTQModifier (line 16) is covered by the stage QuantizationModifier became"]
    assert ('[[stages]]\nmethod = "gptq"\nbits = 4\ngroup_size = 128\nsymmetric = false\ntargets = ["*"]\n'
            'ignore = ["embed", "model.layers.0.mlp.down_proj", "lm_head"]\nact_order = true\nblock_size = 128\n') in out
    assert '[export]\nformat = "compressed-tensors"' in out
    assert err == "note: GPTQModifier (line 16) is covered by the stage QuantizationModifier became\n"


def test_awq_takes_the_scheme_of_the_quantization_modifier_after_it():
    _needs_first_party_translators()
    code, out, err = _import(RECIPES / "recipe_w4a16_awq_asym.yaml")
    assert code == 0, err
    assert ('method = "awq"\nbits = 4\ngroup_size = 128\nsymmetric = false\ntargets = ["*"]\n'
            'ignore = ["embed", "lm_head"]\nduo_scaling = true\n') in out
    assert "note: AWQModifier.duo_scaling = 'both' becomes duo_scaling = true" in err


def test_sparsegpt_with_a_mask_structure_becomes_an_n_m_pattern():
    _needs_first_party_translators()
    code, out, err = _import(RECIPES / "sparse_with_mask_structure.yaml")
    assert code == 0, err
    assert ('method = "sparsegpt"\nsparsity = 0.5\npattern = "2:4"\n'
            'targets = ["*model.layers.0", "*model.layers.0.*"]\nignore = ["lm_head"]\nblock_size = 128\n'
            'damp = 0.01\n') in out


@pytest.mark.parametrize("name,lines", [
    ("recipe_w8a8_dynamic_asym.yaml", [
        "error: recipe_w8a8_dynamic_asym.yaml:3: SmoothQuantModifier: it moves activation outliers into the weights so "
        "that activations quantize to 8 bits; pocketlm's quantizers (rtn, gptq) are weight-only, so it has no "
        "counterpart",
        "  fix: remove SmoothQuantModifier and use a weight-only scheme (W4A16, W8A16)",
        "error: recipe_w8a8_dynamic_asym.yaml:10: GPTQModifier: config_groups.group_0.input_activations quantizes "
        "activations; pocketlm quantizes weights only",
        "  fix: set input_activations: null, for a weight-only scheme such as W4A16"]),
    ("recipe_w4a16_actorder_group.yaml", [
        "error: recipe_w4a16_actorder_group.yaml:3: GPTQModifier: actorder 'group' has no counterpart: pocketlm's "
        "gptq orders columns with static groups (actorder: static) or not at all (actorder: null)",
        "  fix: write actorder: static or actorder: null"]),
    ("recipe_gptq_awq.yaml", [
        "error: recipe_gptq_awq.yaml:3: AWQModifier: custom mappings have no counterpart: pocketlm takes the "
        "smoothing pairs from the model's architecture table",
        "  fix: remove mappings (the defaults cover Llama-style models)",
        "error: recipe_gptq_awq.yaml:15: GPTQModifier: scheme 'W8A8' quantizes activations or uses float formats; "
        "pocketlm quantizes integer weights only",
        "  fix: use a weight-only scheme: W2A16, W3A16, W4A16, W4A16_ASYM, W5A16, W6A16, W7A16, W8A16"]),
])
def test_what_has_no_counterpart_is_refused_by_name_and_nothing_is_written(tmp_path, monkeypatch, name, lines):
    _needs_first_party_translators()
    output = tmp_path / "out.toml"
    monkeypatch.chdir(RECIPES)
    code, out, err = _import(name, "-o", output)
    assert code == 2 and out == ""
    assert err.splitlines() == lines
    assert not output.exists()


def test_an_existing_output_is_kept_unless_overwrite_is_given(tmp_path):
    """A recipe written earlier may hold the user's edits (its model source, for one)."""
    _needs_first_party_translators()
    output = tmp_path / "out.toml"
    output.write_text("# my edited recipe\n")
    code, out, err = _import(RECIPES / "new_quant_channel.yaml", "-o", output)
    assert code == 2 and out == ""
    assert err.splitlines() == [f"error: --output: {output} already exists",
                                "  fix: choose another file, or pass --overwrite to replace it"]
    assert output.read_text() == "# my edited recipe\n"
    code, out, err = _import(RECIPES / "new_quant_channel.yaml", "-o", output, "--overwrite")
    assert code == 0 and out.startswith(f"wrote {output} (1 stage: gptq)")
    assert output.read_text().startswith("# pocketlm recipe translated by `pocketlm import-recipe`")


def test_a_modifier_no_plugin_translates_is_refused_with_the_installed_list(tmp_path):
    _needs_first_party_translators()
    path = _write(tmp_path, "stage:\n  modifiers:\n    LogarithmicEqualizationModifier: {}\n")
    code, out, err = _import(path)
    assert code == 2
    first = err.splitlines()[0]
    assert first.startswith(f"error: {path}:3: LogarithmicEqualizationModifier: no installed plugin translates it "
                            "(installed translators: AWQModifier, ConstantPruningModifier, GMPruningModifier, GPTQModifier,")


def test_a_translator_of_a_plugin_not_installed_is_named_from_the_registry(tmp_path, monkeypatch):
    _needs_first_party_translators()
    monkeypatch.setenv("POCKETLM_PLUGINS", "pocketlm-gptq")
    from pocketlm.plugins import get_plugins

    get_plugins(refresh=True)
    monkeypatch.chdir(RECIPES)
    try:
        code, out, err = _import("sparse.yaml")
    finally:
        monkeypatch.delenv("POCKETLM_PLUGINS")
        get_plugins(refresh=True)
    assert code == 2
    assert err.splitlines() == [
        "error: sparse.yaml:3: SparseGPTModifier: the plugin that translates it, pocketlm-prune, is not installed",
        "  fix: pip install pocketlm-prune, then run import-recipe again"]


def test_a_translated_recipe_with_a_model_validates_and_runs(tmp_path, tiny_folder):
    _needs_first_party_translators()
    output = tmp_path / "recipes" / "llmc.toml"
    output.parent.mkdir()
    code, out, err = _import(RECIPES / "new_quant_channel.yaml", "--model", tiny_folder, "-o", output)
    assert code == 0, err
    assert out == f"wrote {output} (1 stage: gptq)\n"
    text = output.read_text()
    assert 'bits = 4\ngroup_size = -1\nsymmetric = false' in text
    result = CliRunner().invoke(main, ["validate", str(output), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"{output}: valid (1 stage: gptq)\n"


def test_a_translated_recipe_that_pocketlm_would_refuse_is_not_written(tmp_path, tiny_folder):
    _needs_first_party_translators()
    path = _write(tmp_path, "stage:\n  quant_modifiers:\n    GPTQModifier: {scheme: W4A16, ignore: [lm_head]}\n"
                            "  obcq_modifiers:\n    SparseGPTModifier: {sparsity: 0.5}\n")
    output = tmp_path / "out.toml"
    code, out, err = _import(path, "--model", tiny_folder, "-o", output)
    assert code == 2 and not output.exists()
    assert err.splitlines()[0] == (
        f"error: {path}: the translated recipe would not run: stages[1].method: method 'sparsegpt' (prune) cannot "
        "run after a quantize stage (stage 0): its declared order forbids it")
