"""Every section's wrong-type message says what to write, in the recipe's own syntax, and
never leaks pydantic's internals (class names, PydanticUndefined)."""

import pytest
from click.testing import CliRunner

from pocketlm import plugins as plugins_module
from pocketlm.cli import main

from .conftest import make_toy_plugin

LEAKS = ("PydanticUndefined", "Section", "typing.", "expects", "instance of", "Literal[")

# (recipe text, field, what the fix line must say)
WRONG_TYPES = [
    ('model = "x"\n', "model", 'write [model] as a table with keys below it, such as source = "demo:smollm2-135m"'),
    ("calibration = 5\n", "calibration", "write [calibration] as a table with keys below it, such as "
                                         'text = "builtin:wikitext-2-valid", samples = 32'),
    ('stages = "toy-round"\n', "stages", 'write each stage as a [[stages]] table: a line [[stages]], then method = "NAME"'),
    ("evaluate = 3\n", "evaluate", 'write [evaluate] as a table with keys below it, such as metrics = ["perplexity", "size"]'),
    ('export = "hf"\n', "export", 'write [export] as a table with keys below it, such as format = "hf", path = "export"'),
    ("plugins = 3\n", "plugins", 'write [plugins] as a table of distribution = "version range"'),
    ("[model]\nsource = 3\n", "model.source", 'write source = "demo:smollm2-135m" (a quoted string): a transformers folder'),
    ('[model]\ndtype = "int8"\n', "model.dtype", 'write dtype = "float32" (one of "float32", "float16", "bfloat16")'),
    ("[model]\nallow_pickle = 3\n", "model.allow_pickle", "write allow_pickle = false (true or false)"),
    ("[model]\nrevision = 3\n", "model.revision", 'write revision = "..." (a quoted string): branch, tag or commit'),
    ('[calibration]\nsamples = "many"\n', "calibration.samples", "write samples = 32 (a whole number, at least 1, at most 1000000)"),
    ("[calibration]\nseq_len = 2\n", "calibration.seq_len", "write seq_len = 512 (a whole number, at least 8"),
    ('[calibration]\nseed = -1\n', "calibration.seed", "write seed = 0 (a whole number, at least 0)"),
    ('[evaluate]\nmetrics = "size"\n', "evaluate.metrics", 'write metrics = ["perplexity", "size"] (a list)'),
    ('[evaluate]\nper_stage = 1\n', "evaluate.per_stage", 'write per_stage = ["parameters", "sparsity", "size"] (a list)'),
    ('[export]\nformat = 3\n', "export.format", 'write format = "hf" (a quoted string): exporter name'),
    ('[[stages]]\nmethod = "toy-round"\nbits = "eight"\n', "stages[0].bits", "write bits = 8 (a whole number)"),
    ('[[stages]]\nbits = 4\n', "stages[0].method", 'add method = "NAME" (`pocketlm methods` lists them)'),
]


@pytest.fixture
def validate(monkeypatch, tmp_path):
    loaded = plugins_module.Plugins(entry_points=False, extra=[("toy", make_toy_plugin())])
    monkeypatch.setattr(plugins_module, "get_plugins", lambda refresh=False: loaded)

    def run(text: str, suffix: str = ".toml"):
        path = tmp_path / f"recipe{suffix}"
        path.write_text(text)
        return path, CliRunner().invoke(main, ["validate", str(path)])

    return run


@pytest.mark.parametrize("text,field,fix", WRONG_TYPES, ids=[w[1] for w in WRONG_TYPES])
def test_a_wrong_type_gets_a_fix_that_says_what_to_write(validate, text, field, fix):
    path, result = validate(text)
    assert result.exit_code == 2, result.output
    assert f"{path}:" in result.output and f": {field}: " in result.output, result.output
    fix_line = result.output.split("fix: ", 1)[1]
    assert fix_line.startswith(fix), result.output
    for leak in LEAKS:
        assert leak not in result.output, result.output


def test_a_yaml_recipe_gets_the_fix_in_yaml(validate):
    _, result = validate("calibration: 5\n", ".yaml")
    assert "fix: write calibration: as a mapping with keys below it, such as " \
           'text: "builtin:wikitext-2-valid", samples: 32' in result.output
    _, result = validate("calibration:\n  samples: many\n", ".yaml")
    assert "fix: write samples: 32 (a whole number" in result.output
