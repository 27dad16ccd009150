"""The plugin reference's generated tables: rendered from the code, and the docs kept equal to them."""

import dataclasses
import shutil
import subprocess
import sys

import pytest

from pocketlm import components, reference

from .test_meta import ROOT


@pytest.mark.parametrize("page", reference.DOCS)
def test_the_docs_hold_the_generated_tables(page):
    try:
        stale = reference.stale(ROOT, (page,))
    except reference.NotInstalled as exc:
        pytest.skip(f"{page} documents first-party plugins that are not installed: {', '.join(exc.args[0])}")
    assert not stale, f"{page} differs from the code; run: {reference.REGENERATE}"


def test_each_doc_file_has_its_blocks():
    api = (ROOT / "docs" / "plugin-api.md").read_text()
    hooks = (ROOT / "docs" / "plugins" / "hooks.md").read_text()
    assert "<!-- generated: components -->" in api
    assert "<!-- generated: registration -->" in hooks and "<!-- generated: features -->" in hooks
    assert "<!-- generated: options -->" in (ROOT / "docs" / "recipes.md").read_text()


def _copy_docs(root, names=reference.DOCS):
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, root / name)


def test_the_exporter_table_lists_packs_with_its_default_and_meaning():
    table = reference.render_component_table(components.Exporter)
    row = next(line for line in table.splitlines() if line.startswith("| `packs` |"))
    assert row.startswith("| `packs` | `frozenset[str]` | `frozenset()` | the part of `represents` it stores compactly")
    assert '| `represents` | `frozenset[str]` | `frozenset({"dense", "masked", "restructured"})` |' in table


def test_a_bar_in_a_type_is_escaped_so_the_table_keeps_four_columns():
    table = reference.render_component_table(components.SizeEffect)
    assert "| `bits` | `float \\| None` | `None` |" in table
    for line in table.splitlines():
        if line.startswith("| `"):
            assert len(line.replace("\\|", "").split("|")) == 6, line


def test_the_features_table_names_every_feature():
    rows = [line for line in reference.render_feature_table().splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == list(components.FEATURE_DOCS)
    assert "quantized-embedding" in components.FEATURES and "dense" not in components.FEATURES


def test_registration_hooks_are_read_from_the_spec_annotations():
    assert reference.registration_hooks() == {
        "register_methods": components.Method, "register_loaders": components.Loader,
        "register_evaluators": components.Evaluator, "register_exporters": components.Exporter,
        "register_architectures": components.Architecture, "register_grid_rules": components.GridRule,
        "register_translators": components.Translator}
    assert reference.constructor(components.Loader) == 'name, matches, load, summary="", resolves=None'


def test_a_new_field_shows_up_and_write_repairs_the_docs(tmp_path, monkeypatch):
    pages = ("docs/plugin-api.md", "docs/plugins/hooks.md")
    _copy_docs(tmp_path, pages)
    monkeypatch.setattr(reference, "DOCS", pages)
    assert reference.stale(tmp_path) == []

    @dataclasses.dataclass(frozen=True)
    class Loader:
        """Turns a model source string into a model."""

        name: str = components._field("the loader's name")
        priority: int = components._field("lower is tried first", default=0)

    monkeypatch.setattr(reference, "COMPONENTS", (*reference.COMPONENTS[:2], Loader, *reference.COMPONENTS[3:]))
    monkeypatch.setattr(components, "Loader", Loader)
    assert reference.stale(tmp_path) == list(pages)
    assert reference.write(tmp_path) == list(pages)
    assert reference.stale(tmp_path) == []
    assert "| `priority` | `int` | `0` | lower is tried first |" in (tmp_path / "docs/plugin-api.md").read_text()
    assert '`name, priority=0`' in (tmp_path / "docs/plugins/hooks.md").read_text()


def test_check_names_the_regeneration_command(tmp_path, capsys, monkeypatch):
    pages = ("docs/plugin-api.md", "docs/plugins/hooks.md")
    _copy_docs(tmp_path, pages)
    monkeypatch.setattr(reference, "DOCS", pages)
    api = tmp_path / "docs" / "plugin-api.md"
    api.write_text(api.read_text().replace("| `packs` |", "| `pack` |"))
    assert reference.main(["--check"], root=tmp_path) == 1
    assert capsys.readouterr().err == f"out of date: docs/plugin-api.md; run: {reference.REGENERATE}\n"
    assert reference.main(["--write"], root=tmp_path) == 0
    assert reference.main(["--check"], root=tmp_path) == 0


def test_option_types_are_written_one_way():
    from typing import Any, Literal, Optional, Union

    assert reference.option_type(Optional[Literal["mse", "cosine"]]) == "Literal['mse', 'cosine'] | None"
    assert reference.option_type(Union[Literal["spread"], list[int], None]) == "Literal['spread'] | list[int] | None"
    assert reference.option_type(int | None) == "int | None"
    assert reference.option_type(dict[str, Any]) == "dict[str, Any]"


def test_the_options_block_documents_every_first_party_option_with_its_description():
    try:
        text = reference.render_option_tables()
    except reference.NotInstalled as exc:
        pytest.skip(f"first-party plugins not installed: {', '.join(exc.args[0])}")
    from pocketlm.plugins import get_plugins

    plugins = get_plugins()
    for table in ("methods", "evaluators", "exporters"):
        for name, component in getattr(plugins, table).items():
            assert f"#### `{name}` (" in text, f"{table}: {name} is missing"
    damp = next(line for line in text.splitlines() if line.startswith("| `damp` |"))
    assert damp.startswith("| `damp` | `float` | `0.01` | ") and not damp.endswith("|  |")


def test_the_module_runs_and_checks_the_repository():
    result = subprocess.run([sys.executable, "-m", "pocketlm.reference", "--check"], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr
    printed = subprocess.run([sys.executable, "-m", "pocketlm.reference"], capture_output=True, text=True, cwd=ROOT)
    assert printed.stdout == reference.render_component_tables()


# ----------------------------------------------------------------- option descriptions in the CLI


@pytest.fixture
def wide_cli(monkeypatch):
    """``pocketlm`` with the installed plugins, printing on a console wide enough not to wrap."""
    from click.testing import CliRunner
    from rich.console import Console

    from pocketlm import cli

    monkeypatch.setattr(cli, "out", Console(markup=False, width=1000))
    return lambda *args: CliRunner().invoke(cli.main, list(args))


GPTQ_DAMP = "Hessian dampening"


def test_methods_prints_each_option_with_its_description(wide_cli):
    pytest.importorskip("pocketlm_gptq")
    result = wide_cli("methods")
    assert result.exit_code == 0, result.output
    damp = next(line for line in result.output.splitlines() if line.strip().startswith("damp:"))
    assert damp.strip().startswith("damp: float = 0.01  " + GPTQ_DAMP), damp


def test_methods_json_gives_every_option_a_description(wide_cli):
    import json

    result = wide_cli("methods", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert rows, "no methods installed"
    blank = [f"{row['name']}.{key}" for row in rows for key, option in row["options"].items()
             if not option["description"].strip()]
    assert not blank, blank


def test_schema_carries_the_descriptions(wide_cli):
    import json

    pytest.importorskip("pocketlm_gptq")
    result = wide_cli("schema")
    stages = json.loads(result.output)["properties"]["stages"]["items"]["oneOf"]
    gptq = next(s for s in stages if s["title"] == "gptq")
    assert gptq["properties"]["damp"]["description"].startswith(GPTQ_DAMP)
