"""An exporter that cannot write a model streamed from disk (``Exporter.streams`` false) is refused
with one message naming the formats that can; ``format = "auto"`` passes over it."""

import types

import pytest

from pocketlm import Exporter, Options, PocketError, hookimpl
from pocketlm.pipeline import Run
from pocketlm.plugins import Plugins
from pocketlm.recipe import parse_recipe
from pocketlm.testing.models import save_tiny_model

from .conftest import make_toy_plugin

RECIPE = """[model]
source = "{model}"
offload = "disk"
[calibration]
samples = 2
seq_len = 16
[[stages]]
method = "toy-round"
[evaluate]
metrics = []
before = false
per_stage = []
[export]
format = "{format}"
"""


def _whole_model_exporter_plugin():
    module = types.ModuleType("toy_whole")
    module.POCKETLM_API = ">=1.0,<2"
    written = []

    @hookimpl
    def register_exporters(register):
        register(Exporter("toy-whole", Options, lambda model, path, options, context: written.append(path),
                          represents=frozenset({"dense", "quantized"}), packs=frozenset({"quantized"}),
                          summary="test-only exporter that needs the whole model"))

    module.register_exporters = register_exporters
    module.written = written
    return module


@pytest.fixture
def plugins():
    whole = _whole_model_exporter_plugin()
    return Plugins(entry_points=False, extra=[("toy", make_toy_plugin()), ("toy-whole", whole)]), whole


def test_an_exporter_that_needs_the_whole_model_is_refused_naming_those_that_stream(tmp_path, plugins):
    plugins, whole = plugins
    source = save_tiny_model(tmp_path / "llama", "llama", layers=2)
    recipe = parse_recipe(RECIPE.format(model=source, format="toy-whole"), plugins, file="recipe.toml")
    with pytest.raises(PocketError) as error:
        Run(recipe, tmp_path / "run", plugins, echo=lambda m: None).execute()
    message = str(error.value)
    assert "export format 'toy-whole' cannot write a model streamed from disk" in message
    assert "'hf'" in message and 'offload = "none"' in message
    assert not whole.written and not (tmp_path / "run" / "export").exists()


def test_auto_format_skips_an_exporter_that_needs_the_whole_model(tmp_path, plugins):
    plugins, whole = plugins
    source = save_tiny_model(tmp_path / "llama", "llama", layers=2)
    lines = []
    recipe = parse_recipe(RECIPE.format(model=source, format="auto"), plugins, file="recipe.toml")
    Run(recipe, tmp_path / "run", plugins, echo=lines.append).execute()
    assert not whole.written
    assert any("export format auto: chose 'hf'" in line for line in lines)
