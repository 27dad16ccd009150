"""The plugin reference's generated tables: rendered from the code, and the docs kept equal to them."""

import dataclasses
import shutil
import subprocess
import sys

from pocketlm import components, reference

from .test_meta import ROOT


def test_the_docs_hold_the_generated_tables():
    stale = reference.stale(ROOT)
    assert not stale, f"{', '.join(stale)} differ from the code; run: {reference.REGENERATE}"


def test_each_doc_file_has_its_blocks():
    api = (ROOT / "docs" / "plugin-api.md").read_text()
    hooks = (ROOT / "docs" / "plugins" / "hooks.md").read_text()
    assert "<!-- generated: components -->" in api
    assert "<!-- generated: registration -->" in hooks and "<!-- generated: features -->" in hooks


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
        "register_architectures": components.Architecture, "register_grid_rules": components.GridRule}
    assert reference.constructor(components.Loader) == 'name, matches, load, summary=""'


def test_a_new_field_shows_up_and_write_repairs_the_docs(tmp_path, monkeypatch):
    for name in reference.DOCS:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    assert reference.stale(tmp_path) == []

    @dataclasses.dataclass(frozen=True)
    class Loader:
        """Turns a model source string into a model."""

        name: str = components._field("the loader's name")
        priority: int = components._field("lower is tried first", default=0)

    monkeypatch.setattr(reference, "COMPONENTS", (*reference.COMPONENTS[:2], Loader, *reference.COMPONENTS[3:]))
    monkeypatch.setattr(components, "Loader", Loader)
    assert reference.stale(tmp_path) == list(reference.DOCS)
    assert reference.write(tmp_path) == list(reference.DOCS)
    assert reference.stale(tmp_path) == []
    assert "| `priority` | `int` | `0` | lower is tried first |" in (tmp_path / "docs/plugin-api.md").read_text()
    assert '`name, priority=0`' in (tmp_path / "docs/plugins/hooks.md").read_text()


def test_check_names_the_regeneration_command(tmp_path, capsys):
    for name in reference.DOCS:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    api = tmp_path / "docs" / "plugin-api.md"
    api.write_text(api.read_text().replace("| `packs` |", "| `pack` |"))
    assert reference.main(["--check"], root=tmp_path) == 1
    assert capsys.readouterr().err == f"out of date: docs/plugin-api.md; run: {reference.REGENERATE}\n"
    assert reference.main(["--write"], root=tmp_path) == 0
    assert reference.main(["--check"], root=tmp_path) == 0


def test_the_module_runs_and_checks_the_repository():
    result = subprocess.run([sys.executable, "-m", "pocketlm.reference", "--check"], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr
    printed = subprocess.run([sys.executable, "-m", "pocketlm.reference"], capture_output=True, text=True, cwd=ROOT)
    assert printed.stdout == reference.render_component_tables()
