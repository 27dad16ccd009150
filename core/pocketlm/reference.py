"""The plugin reference's tables, rendered from the code so the docs cannot drift from it.

Each component's fields come from its dataclass (the meaning is the field's ``metadata["doc"]``
in :mod:`pocketlm.components`), the features from ``FEATURE_DOCS``, which hook registers which
component from the registration hooks' annotations, and the options of every first-party
method, evaluator and exporter from their options models (each field's ``description``). The
docs hold the rendered text between marker comments::

    <!-- generated: components -->
    ...
    <!-- end generated -->

``python -m pocketlm.reference --write`` rewrites every block; ``--check`` says which files
differ (a test runs it); without a flag it prints the component tables.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
import types
import typing
from pathlib import Path

from . import components, hookspecs

#: The dataclasses of :mod:`pocketlm.components`, in the order the reference lists them.
COMPONENTS = (components.Method, components.SizeEffect, components.Loader, components.LoadedModel,
              components.Evaluator, components.Exporter, components.Architecture, components.Smooth,
              components.GridRule, components.Translator)

#: The files that hold generated blocks, relative to the repository root.
DOCS = ("docs/plugin-api.md", "docs/plugins/hooks.md", "docs/recipes.md")

REGENERATE = "python -m pocketlm.reference --write"

_BLOCK = re.compile(r"(<!-- generated: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.DOTALL)


# ------------------------------------------------------------------------------ rendering


def _cell(text: str) -> str:
    # A bare "|" ends a markdown table cell, even inside backticks.
    return text.replace("|", "\\|")


def field_type(f: dataclasses.Field) -> str:
    """The field's annotation as written in the source."""
    return f.type if isinstance(f.type, str) else inspect.formatannotation(f.type)


def _markdown(docstring_text: str) -> str:
    # Docstrings are reStructuredText: ``code`` and :class:`Name` become markdown code.
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", docstring_text)
    return text.replace("``", "`")


def field_default(f: dataclasses.Field) -> str | None:
    """The field's default as Python source (None: the field is required)."""
    if "shown" in f.metadata:
        return f.metadata["shown"]
    if f.default is dataclasses.MISSING:
        return None if f.default_factory is dataclasses.MISSING else repr(f.default_factory())
    return _source(f.default)


def _source(value) -> str:
    # Sets are written sorted, so the text is the same in every process (string hashes are salted).
    if isinstance(value, frozenset):
        return f"frozenset({{{', '.join(_source(v) for v in sorted(value))}}})" if value else "frozenset()"
    if isinstance(value, str):
        return '"' + value.replace('"', '\\"') + '"'
    return repr(value)


def field_doc(f: dataclasses.Field) -> str:
    return f.metadata.get("doc", "")


def render_component_table(component: type) -> str:
    """One component: its name, the first paragraph of its docstring, and a table of its fields."""
    intro = _markdown(inspect.cleandoc(component.__doc__ or "").split("\n\n")[0].replace("\n", " "))
    rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(component):
        default = field_default(f)
        shown = "required" if default is None else f"`{_cell(default)}`"
        rows.append(f"| `{f.name}` | `{_cell(field_type(f))}` | {shown} | {_cell(field_doc(f))} |")
    return f"### `pocketlm.{component.__name__}`\n\n{intro}\n\n" + "\n".join(rows) + "\n"


def render_feature_table() -> str:
    """Every model feature a method declares or an exporter represents, with its meaning."""
    rows = ["| feature | meaning |", "|---|---|"]
    rows += [f"| `{name}` | {_cell(doc)} |" for name, doc in components.FEATURE_DOCS.items()]
    return "\n".join(rows) + "\n"


def render_component_tables() -> str:
    """Every component's table, then the features table: the ``components`` block."""
    tables = [render_component_table(c) for c in COMPONENTS]
    features = ("### Features\n\nWhat a method's `SizeEffect.features` declares and an exporter's `represents` "
                "and `packs` name.\n\n" + render_feature_table())
    return "\n".join([*tables, features])


def registration_hooks() -> dict[str, type]:
    """Each registration hook and the component its ``register`` callback takes, read from the
    hook spec's annotation (``Callable[[Method], None]``)."""
    found = {}
    for name, spec in inspect.getmembers(hookspecs, inspect.isfunction):
        if getattr(spec, "pocketlm_spec", None) and name.startswith("register_"):
            taken = re.fullmatch(r"Callable\[\[(\w+)\], None\]", spec.__annotations__["register"])
            found[name] = getattr(components, taken.group(1))
    return dict(sorted(found.items(), key=lambda item: COMPONENTS.index(item[1])))


def constructor(component: type) -> str:
    """The component's fields as a call: ``name, kind, options, compress, summary="", ...``."""
    parts = []
    for f in dataclasses.fields(component):
        default = field_default(f)
        parts.append(f.name if default is None else f"{f.name}={default}")
    return ", ".join(parts)


def render_registration_table() -> str:
    """The registration hooks, the component each registers and its fields: the
    ``registration`` block."""
    rows = ["| hook | you register | component fields |", "|---|---|---|"]
    rows += [f"| `{hook}(register)` | `pocketlm.{component.__name__}` | `{_cell(constructor(component))}` |"
             for hook, component in registration_hooks().items()]
    return "\n".join(rows) + "\n"


class NotInstalled(Exception):
    """A block needs first-party plugins this environment lacks (``args[0]``: their names)."""


def first_party_plugins():
    """The loaded plugins, refused unless every first-party distribution in the registry is
    installed: the options block documents all of them or none."""
    from . import registry
    from .plugins import get_plugins

    loaded = get_plugins()
    installed = {info.distribution for info in loaded.infos}
    missing = sorted(e.distribution for e in registry.entries() if e.distribution not in installed)
    if missing:
        raise NotInstalled(missing)
    return loaded


def option_type(annotation) -> str:
    """An option's type, written one way whichever way the source spells it (``Literal[3, 4, 8]``,
    ``int | None`` for ``Optional[int]``, ``list[str]``)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "None"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(option_type(a) for a in args)
    if origin is typing.Literal:
        return f"Literal[{', '.join(map(repr, args))}]"
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(option_type(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def option_default(field) -> str:
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    return f"`{_cell(_source(value))}`"


def render_options_table(options: type) -> str:
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    rows += [f"| `{key}` | `{_cell(option_type(field.annotation))}` | {option_default(field)} | "
             f"{_cell(field.description or '')} |" for key, field in options.model_fields.items()]
    return "\n".join(rows) + "\n"


def render_option_section(name: str, component, owner: str) -> str:
    """One method, evaluator or exporter: a heading naming its kind and package, its summary and
    its options table."""
    kind = f"{component.kind}, " if isinstance(component, components.Method) else ""
    summary = f"{_markdown(component.summary)}\n\n" if component.summary else ""
    table = render_options_table(component.options) if component.options.model_fields else "No options.\n"
    return f"#### `{name}` ({kind}{owner})\n\n{summary}{table}"


def render_option_tables() -> str:
    """The options of every first-party method, evaluator and exporter: the ``options`` block."""
    from . import registry

    loaded = first_party_plugins()
    first_party = {"pocketlm", *(e.distribution for e in registry.entries())}
    distribution = {info.name: info.distribution for info in loaded.infos}
    sections = []
    for table, title in (("methods", "Methods"), ("evaluators", "Evaluators"), ("exporters", "Exporters")):
        sections.append(f"### {title}\n")
        for name, component in sorted(getattr(loaded, table).items()):
            owner = distribution.get(loaded.owner[(table, name)])
            if owner in first_party:  # a third-party plugin installed here is not documented here
                sections.append(render_option_section(name, component, owner))
    return "\n".join(sections)


BLOCKS = {
    "components": render_component_tables,
    "features": render_feature_table,
    "registration": render_registration_table,
    "options": render_option_tables,
}


# ---------------------------------------------------------------------------- the doc files


def regenerate(text: str) -> str:
    """``text`` with every generated block rendered afresh."""
    def fill(match: re.Match) -> str:
        name = match.group("name")
        if name not in BLOCKS:
            raise ValueError(f"unknown generated block {name!r} (known: {', '.join(BLOCKS)})")
        return match.group(1) + BLOCKS[name]() + match.group(4)

    return _BLOCK.sub(fill, text)


def repository_root() -> Path:
    return Path(__file__).resolve().parents[2]


def stale(root: Path | None = None, names: tuple[str, ...] | None = None) -> list[str]:
    """The doc files (relative to ``root``; ``names``, default ``DOCS``) whose generated blocks
    differ from the code; raises ``NotInstalled`` when a file documents plugins this environment
    lacks."""
    root = root or repository_root()
    return [name for name in names or DOCS if regenerate((root / name).read_text()) != (root / name).read_text()]


def write(root: Path | None = None) -> list[str]:
    """Rewrite the generated blocks of every doc file; returns the files that changed."""
    root = root or repository_root()
    changed = stale(root)
    for name in changed:
        path = root / name
        path.write_text(regenerate(path.read_text()))
    return changed


def main(argv: list[str], root: Path | None = None) -> int:
    try:
        return _run(argv, root)
    except NotInstalled as exc:
        print(f"install every first-party plugin first (missing: {', '.join(exc.args[0])}): bash .ci/setup",
              file=sys.stderr)
        return 1


def _run(argv: list[str], root: Path | None) -> int:
    if argv[:1] == ["--write"]:
        changed = write(root)
        print("rewrote " + ", ".join(changed) if changed else "the docs are up to date")
        return 0
    if argv[:1] == ["--check"]:
        changed = stale(root)
        if changed:
            print(f"out of date: {', '.join(changed)}; run: {REGENERATE}", file=sys.stderr)
            return 1
        return 0
    if argv:
        print("usage: python -m pocketlm.reference [--write | --check]", file=sys.stderr)
        return 2
    print(render_component_tables(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
