"""Malformed recipes: exit code 2, one message naming file, line, field and fix; nothing written."""

import pytest
from click.testing import CliRunner

import pocketlm
from pocketlm import plugins as plugins_module
from pocketlm.cli import main

from .conftest import make_toy_plugin


@pytest.fixture
def cli(monkeypatch, tmp_path, tiny_folder):
    loaded = plugins_module.Plugins(entry_points=False, extra=[("toy", make_toy_plugin())])
    monkeypatch.setattr(plugins_module, "get_plugins", lambda refresh=False: loaded)
    monkeypatch.chdir(tmp_path)

    def invoke(*args):
        return CliRunner().invoke(main, list(args))

    invoke.model = str(tiny_folder)
    return invoke


GOOD = """[model]
source = "{model}"
[calibration]
samples = 2
seq_len = 32
[[stages]]
method = "toy-round"
bits = 8
[evaluate]
metrics = ["parameters"]
per_stage = []
[export]
format = "hf"
"""

# (name, recipe text with {model}, file suffix, expected message fragments, expected line)
MALFORMED = [
    ("toml syntax", "[model\nsource = 1", ".toml", ["TOML syntax error"], 1),
    ("unquoted string", "[model]\nsource = tiny\n", ".toml", ["TOML syntax error"], 2),
    ("yaml syntax", "model: [unclosed\n", ".yaml", ["YAML syntax error"], None),
    ("yaml python tag", "model: !!python/object/apply:os.system ['true']\n", ".yaml", ["YAML syntax error"], 1),
    ("top level list yaml", "- a\n- b\n", ".yaml", ["table of sections"], None),
    ("unknown section", GOOD + "[extras]\nx = 1\n", ".toml", ["unknown key 'extras'", "valid keys"], None),
    ("unknown model key", GOOD.replace('[model]\n', '[model]\nsorce = "x"\n'), ".toml",
     ["unknown key 'sorce'", "did you mean 'source'"], 2),
    ("wrong type samples", GOOD.replace("samples = 2", 'samples = "many"'), ".toml", ["calibration.samples", "integer"], 4),
    ("negative samples", GOOD.replace("samples = 2", "samples = -1"), ".toml", ["calibration.samples", "greater than or equal to 1"], 4),
    ("bad dtype", GOOD.replace('[model]\n', '[model]\ndtype = "float8"\n'), ".toml", ["model.dtype", "float32"], 2),
    ("unknown method", GOOD.replace('"toy-round"', '"toy-rond"'), ".toml", ["unknown method 'toy-rond'", "did you mean 'toy-round'"], 7),
    ("method from a missing plugin", GOOD.replace('"toy-round"', '"awq"').replace("bits = 8\n", ""), ".toml",
     ["unknown method 'awq'", "pocketlm-awq", "pip install pocketlm-awq"], 7),
    ("stage without method", GOOD.replace('method = "toy-round"\n', ""), ".toml", ["stages[0].method", "missing"], None),
    ("unknown stage option", GOOD.replace("bits = 8", "bitz = 8"), ".toml", ["unknown key 'bitz'", "did you mean 'bits'"], 8),
    ("wrong option type", GOOD.replace("bits = 8", 'bits = "eight"'), ".toml", ["stages[0].bits", "integer"], 8),
    ("unknown metric", GOOD.replace('["parameters"]', '["perplexty"]'), ".toml", ["unknown metric 'perplexty'", "did you mean 'perplexity'"], 10),
    ("bad metric option", GOOD + "[evaluate.perplexity]\nwindows = 0\n", ".toml", ["evaluate.perplexity.windows"], None),
    ("unknown export format", GOOD.replace('format = "hf"', 'format = "onnx"'), ".toml", ["unknown export format 'onnx'"], 13),
    ("unknown export option", GOOD.replace('format = "hf"', 'format = "hf"\ncompression = 9'), ".toml", ["unknown key 'compression'"], None),
    ("missing plugin requirement", GOOD + '[plugins]\npocketlm-gptq = ">=0.1"\n', ".toml",
     ["needs plugin 'pocketlm-gptq'", "pip install pocketlm-gptq"], 15),
    ("plugin version mismatch", GOOD + '[plugins]\npocketlm = ">=9"\n', ".toml", ["needs pocketlm >=9", f"{pocketlm.__version__} is installed"], 15),
    ("bad version range", GOOD + '[plugins]\npocketlm = "latest"\n', ".toml", ["not a version range"], None),
    ("missing calibration text", GOOD.replace("samples = 2", 'samples = 2\ntext = "nowhere.txt"'), ".toml",
     ["calibration text", "does not exist"], 5),
    ("calibrating on the evaluation text", GOOD.replace("samples = 2", 'samples = 2\ntext = "builtin:wikitext-2-test"')
     .replace('["parameters"]', '["perplexity"]'), ".toml", ["calibrates on the text it evaluates on"], 5),
    ("prune after quantize", GOOD.replace("[evaluate]", '[[stages]]\nmethod = "toy-mask"\n[evaluate]'), ".toml",
     ["cannot run after a quantize stage"], 10),
    ("two quantizers on the same layers", GOOD.replace("[evaluate]", '[[stages]]\nmethod = "toy-round"\nbits = 4\n[evaluate]'),
     ".toml", ["two quantize stages would act on the same layers"], None),
    ("yaml unknown key", "model:\n  source: x\n  revison: main\n", ".yaml", ["unknown key 'revison'"], 3),
]


@pytest.mark.parametrize("name,text,suffix,fragments,line", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_recipe(cli, tmp_path, name, text, suffix, fragments, line):
    recipe = tmp_path / f"recipe{suffix}"
    recipe.write_text(text.format(model=cli.model) if "{model}" in text else text)
    before = sorted(p.name for p in tmp_path.iterdir())
    for command in (["validate", str(recipe)], ["run", str(recipe)]):
        result = cli(*command)
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        assert str(recipe) in result.output
        for fragment in fragments:
            assert fragment in result.output, result.output
        assert "fix:" in result.output or "TOML" in result.output or "YAML" in result.output
        if line is not None:
            assert f"{recipe}:{line}" in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_missing_recipe_file(cli, tmp_path):
    result = cli("run", str(tmp_path / "absent.toml"))
    assert result.exit_code == 2 and "does not exist" in result.output


def test_good_recipe_validates(cli, tmp_path):
    recipe = tmp_path / "good.toml"
    recipe.write_text(GOOD.format(model=cli.model))
    result = cli("validate", str(recipe))
    assert result.exit_code == 0 and "valid (1 stage: toy-round)" in result.output


def test_schema_lists_installed_methods(cli):
    import json

    result = cli("schema")
    schema = json.loads(result.output)
    names = {v["title"] for v in schema["properties"]["stages"]["items"]["oneOf"]}
    assert {"toy-round", "toy-mask"} <= names


def test_schema_output_replaces_its_own_earlier_schema_but_no_other_file(cli, tmp_path):
    output = tmp_path / "recipe.schema.json"
    assert cli("schema", "-o", str(output)).exit_code == 0
    assert cli("schema", "-o", str(output)).exit_code == 0          # regenerating is routine
    mine = tmp_path / "notes.json"
    mine.write_text('{"title": "my notes"}')
    result = cli("schema", "-o", str(mine))
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [f"error: --output: {mine} already exists",
                                          "  fix: choose another file, or pass --overwrite to replace it"]
    assert mine.read_text() == '{"title": "my notes"}'
    assert cli("schema", "-o", str(mine), "--overwrite").exit_code == 0
    assert '"title": "pocketlm recipe"' in mine.read_text()


def test_yaml_recipe_runs_through_the_same_validation(cli, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model:\n  source: {cli.model}\nstages:\n  - method: toy-round\n    bits: 9000\n")
    result = cli("validate", str(recipe))
    assert result.exit_code == 0  # toy-round accepts any int; the point is YAML parses into the same model


def test_exclusive_stages_that_name_disjoint_modules_may_share_a_model():
    from pocketlm import Method, NoOptions, SizeEffect
    from pocketlm.recipe import combination_problems

    def stage(modules):
        method = Method("q", "quantize", NoOptions, lambda m, o, c: m, exclusive=True,
                        effect=lambda o: SizeEffect(bits=4, features=frozenset({"quantized"}), modules=modules))
        return method, NoOptions()

    assert combination_problems([stage(frozenset({"a", "b"})), stage(frozenset({"c"})), stage(frozenset({"d"}))]) == []
    clash = combination_problems([stage(frozenset({"a", "b"})), stage(frozenset({"c"})), stage(frozenset({"b"}))])
    assert clash == [(2, "two quantize stages would act on the same layers (stage 0 and stage 2); a layer takes one "
                         "quantizer")]
    assert len(combination_problems([stage(frozenset({"a"})), stage(None)])) == 1   # unnamed: every layer


def test_a_stage_may_take_what_another_ignores_by_the_same_patterns():
    """5 bits on some matrices, 4 on the rest: the second stage ignores the first's patterns."""
    from pocketlm import Method, Options, SizeEffect
    from pocketlm.recipe import combination_problems

    class Patterns(Options):
        targets: list[str] = ["*"]
        ignore: list[str] = []

    def stage(**options):
        method = Method("q", "quantize", Patterns, lambda m, o, c: m, exclusive=True, effect=lambda o: SizeEffect(
            bits=4, covers="all", targets=frozenset(o.targets), ignore=frozenset(o.ignore)))
        return method, Patterns(**options)

    wide = stage(targets=["k_proj", "model.layers.[0-2].mlp.down_proj"])
    assert combination_problems([wide, stage(ignore=["lm_head", "k_proj", "model.layers.[0-2].mlp.down_proj"])]) == []
    assert combination_problems([stage(ignore=["k_proj"]), stage(targets=["k_proj"])]) == []   # either order
    clash = combination_problems([wide, stage(ignore=["lm_head", "k_proj"])])   # down_proj in both
    assert clash == [(1, "two quantize stages would act on the same layers (stage 0 and stage 1); a layer takes one "
                         "quantizer")]
