"""``Exporter.check`` receives the run's context where it takes one; a check written for the
two-argument form keeps working."""

import types

import pytest

from pocketlm import Exporter, Options, PocketError, hookimpl
from pocketlm.components import context_arguments
from pocketlm.pipeline import Run
from pocketlm.plugins import Plugins
from pocketlm.recipe import parse_recipe
from pocketlm.testing import make_context
from pocketlm.testing.models import tiny_model


def _exporter(check):
    return Exporter("toy-checked", Options, lambda model, path, options, context: None, check=check)


def test_a_two_argument_check_is_called_as_before():
    calls = []

    def check(model, options):
        calls.append((model, options))
        return ["too big"]

    assert _exporter(check).problems("model", "options", make_context()) == ["too big"]
    assert calls == [("model", "options")]


def _context_check(model, options, context):
    return [f"{context.architecture(model).name} layers at {context.architecture(model).layers}"]


def _defaulted_check(model, options, context=None):
    return [f"context given: {context is not None}"]


def _star_check(model, options, *rest):
    return [f"{len(rest)} more"]


def _keyword_only_check(model, options, *, strict=False):
    return [f"strict {strict}"]


@pytest.mark.parametrize("check, found", [(_context_check, ["llama layers at model.layers"]),
                                          (_defaulted_check, ["context given: True"]),
                                          (_star_check, ["1 more"]),
                                          (_keyword_only_check, ["strict False"]),
                                          (len, None)])
def test_the_context_goes_to_a_check_that_takes_a_third_argument(check, found):
    if found is None:        # no signature to inspect: called the old way
        assert context_arguments(check, object()) == ()
        return
    assert _exporter(check).problems(tiny_model("llama"), Options(), make_context()) == found


def test_the_pipeline_hands_the_run_context_to_the_check(tiny_folder, tmp_path):
    module = types.ModuleType("toy_checked")
    module.POCKETLM_API = ">=1.0,<2"

    @hookimpl
    def register_exporters(register):
        register(_exporter(lambda model, options, context: [f"{context.architecture(model).name} is refused"]))

    module.register_exporters = register_exporters
    plugins = Plugins(entry_points=False, extra=[("toy-checked", module)])
    recipe = parse_recipe(f'[model]\nsource = "{tiny_folder}"\n[evaluate]\nmetrics = []\nper_stage = []\n'
                          '[export]\nformat = "toy-checked"\n', plugins, file="recipe.toml")
    with pytest.raises(PocketError, match="export format 'toy-checked' cannot write this model: llama is refused"):
        Run(recipe, tmp_path / "run", plugins, echo=lambda m: None).execute()
    assert not (tmp_path / "run" / "export").exists()
