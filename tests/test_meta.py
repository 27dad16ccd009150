"""Meta-tests that keep the contract honest."""

import re
import tomllib
from pathlib import Path

from pocketlm import KINDS, hookspecs

ROOT = Path(__file__).resolve().parent.parent
HOOKS = [n for n in dir(hookspecs) if getattr(getattr(hookspecs, n), "pocketlm_spec", None) is not None]


def test_every_hook_has_a_docs_entry_and_a_docstring():
    docs = (ROOT / "docs" / "plugin-api.md").read_text()
    for hook in HOOKS:
        assert f"### `{hook}(" in docs, f"docs/plugin-api.md lacks an entry for {hook}"
        assert (getattr(hookspecs, hook).__doc__ or "").strip(), f"{hook} has no docstring"


def test_every_hook_spec_is_typed_and_documents_each_argument_and_its_result():
    import inspect

    for hook in HOOKS:
        spec = getattr(hookspecs, hook)
        doc = spec.__doc__ or ""
        for name, parameter in inspect.signature(spec).parameters.items():
            assert parameter.annotation is not inspect.Parameter.empty, f"{hook}: {name} has no annotation"
            assert f":param {name}:" in doc, f"{hook}'s docstring does not document {name}"
        assert inspect.signature(spec).return_annotation is not inspect.Signature.empty, f"{hook}: no return type"
        assert ":returns:" in doc, f"{hook}'s docstring does not say what it returns"


def _component_sections(docs: str) -> dict[str, str]:
    """The text under each ``### `pocketlm.Name``` heading of the plugin reference."""
    parts = re.split(r"^### `pocketlm\.(\w+)`$", docs, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2]))


def test_every_component_field_has_a_meaning_and_a_row_in_the_docs():
    import dataclasses

    from pocketlm.reference import COMPONENTS

    sections = _component_sections((ROOT / "docs" / "plugin-api.md").read_text())
    for component in COMPONENTS:
        assert component.__name__ in sections, f"docs/plugin-api.md has no table for {component.__name__}"
        for field in dataclasses.fields(component):
            where = f"{component.__name__}.{field.name}"
            assert field.metadata.get("doc", "").strip(), f"{where} has no metadata['doc'] in components.py"
            assert f"| `{field.name}` |" in sections[component.__name__], f"docs/plugin-api.md lacks {where}"


def test_every_feature_is_documented_where_authors_look():
    from pocketlm.components import FEATURE_DOCS, FEATURES

    assert FEATURES <= set(FEATURE_DOCS)
    for page in ("docs/plugin-api.md", "docs/plugins/hooks.md"):
        text = (ROOT / page).read_text()
        for feature in FEATURE_DOCS:
            assert f"| `{feature}` |" in text, f"{page} does not document the feature {feature!r}"


def test_hook_wrappers_are_taught_and_written_new_style():
    # pluggy's wrapper=True (the result comes back from yield) replaced hookwrapper=True.
    places = [ROOT / "docs", ROOT / "core" / "pocketlm", ROOT / "plugins", ROOT / "README.md"]
    offenders = []
    for place in places:
        for path in ([place] if place.is_file() else place.rglob("*")):
            if path.is_file() and path.suffix in (".py", ".md", ".tmpl") and "hookimpl(hookwrapper" in path.read_text():
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, offenders


def test_every_hook_has_a_test():
    tests = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    for hook in HOOKS:
        assert re.search(rf"\b(def test_{hook}|hook\.{hook}\(|{hook} = hookimpl|plugin\.{hook} = )", tests), \
            f"no test calls or implements the {hook} hook"


def _registry():
    return tomllib.loads((ROOT / "registry.toml").read_text())["plugins"]


def test_core_names_no_method():
    methods = {m for entry in _registry().values() for m in entry.get("methods", [])} - set(KINDS)
    pattern = re.compile(r"\b(" + "|".join(re.escape(m) for m in sorted(methods)) + r")\b", re.IGNORECASE)
    offenders = []
    for path in (ROOT / "core").rglob("*"):
        if path.is_file() and path.suffix in (".py", ".toml", ".json", ".jinja", ".tmpl", ".txt") \
                and "data" not in path.relative_to(ROOT / "core").parts and "templates" not in path.parts:
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "core/ names methods:\n" + "\n".join(offenders)


def test_registry_agrees_with_the_plugin_packages():
    registry = _registry()
    packages = {}
    for pyproject in (ROOT / "plugins").glob("*/pyproject.toml"):
        project = tomllib.loads(pyproject.read_text())["project"]
        packages[project["name"]] = (project["version"], pyproject.parent.relative_to(ROOT).as_posix(), project)
    assert set(registry) == set(packages)
    for name, entry in registry.items():
        version, source, project = packages[name]
        assert entry["version"] == version, f"{name}: registry says {entry['version']}, package says {version}"
        assert entry["source"] == source
        assert "pocketlm" in project.get("entry-points", {}), f"{name} declares no pocketlm entry point"
        assert (ROOT / source / "CHANGELOG.md").is_file(), f"{name} has no CHANGELOG.md"


def test_registry_lists_what_installed_plugins_register():
    from pocketlm.plugins import get_plugins

    plugins = get_plugins()
    for name, entry in _registry().items():
        info = next((i for i in plugins.infos if i.distribution == name), None)
        if info is None:
            continue  # not installed in this environment
        assert sorted(info.provides.get("methods", [])) == sorted(entry.get("methods", [])), name
        assert sorted(info.provides.get("exporters", [])) == sorted(entry.get("exporters", [])), name
        assert sorted(info.provides.get("grid_rules", [])) == sorted(entry.get("grid_rules", [])), name
        assert sorted(info.provides.get("translators", [])) == sorted(entry.get("translators", [])), name
        assert sorted(info.provides.get("loaders", [])) == sorted(entry.get("loaders", [])), name


def test_every_option_of_every_installed_component_is_described():
    """`pocketlm methods` and `pocketlm schema` print each option's description."""
    from pocketlm.plugins import get_plugins

    plugins = get_plugins()
    missing = []
    for table in ("methods", "evaluators", "exporters"):
        for component in getattr(plugins, table).values():
            missing += [f"{table}:{component.name}.{n}" for n, f in component.options.model_fields.items()
                        if not (f.description or "").strip() or "\n" in f.description]
    assert not missing, f"options without a one-line description: {missing}"


def test_registering_every_installed_plugin_imports_no_tensor_library():
    """Commands that only read recipes load every plugin: each plugin's registration must leave
    torch (and the other tensor libraries) unimported, naming its code with ``pocketlm.lazy``."""
    from importlib.metadata import entry_points

    from pocketlm.testing.conformance import heavy_imports

    heavy = {point.value: heavy_imports(point.value) for point in entry_points(group="pocketlm")}
    assert not {module: names for module, names in heavy.items() if names}
