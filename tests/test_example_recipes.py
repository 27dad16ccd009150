"""The recipes under docs/examples/recipes validate as they stand, from any folder, with the
installed plugins (the docs promise they run with ``pocketlm run``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from pocketlm.cli import main
from pocketlm.plugins import get_plugins
from pocketlm.recipe import tomllib  # the standard library's, or tomli before Python 3.11

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "docs" / "examples" / "recipes").glob("*.toml"))


def test_there_are_examples():
    assert len(EXAMPLES) >= 3


@pytest.mark.parametrize("recipe", EXAMPLES, ids=lambda path: path.name)
def test_an_example_recipe_validates_from_another_folder(recipe, tmp_path, monkeypatch):
    written = tomllib.loads(recipe.read_text())
    plugins = get_plugins()
    missing = [stage["method"] for stage in written.get("stages", []) if stage["method"] not in plugins.methods]
    if written.get("export", {}).get("format", "hf") not in plugins.exporters:
        missing.append(written["export"]["format"])
    if missing:
        pytest.skip(f"{recipe.name} needs plugins that are not installed here: {', '.join(missing)}")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["validate", str(recipe)])
    assert result.exit_code == 0, result.output
    stages = ", ".join(stage["method"] for stage in written["stages"])
    assert f"{recipe}: valid ({len(written['stages'])} stages: {stages})" in result.output
