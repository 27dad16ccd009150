"""``pocketlm new-plugin NAME``: create a plugin package from the bundled templates.

The templates live in ``pocketlm/templates/plugin/`` (package data). Every file there ends in
``.tmpl`` (so neither setuptools nor pytest mistakes them for code); paths and contents use
``{{key}}`` placeholders, replaced by plain substitution. A placeholder without a value is an
error, so a template can never ship half-filled.

Names: ``NAME`` is ``foo`` or ``pocketlm-foo`` (lowercase letters, digits and single hyphens,
starting with a letter). It gives the distribution ``pocketlm-foo``, the import package
``pocketlm_foo``, the method and entry-point name ``foo`` and the module ``foo.py``.
"""

from __future__ import annotations

import keyword
import os
import re
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from . import atomic
from .errors import PocketError

PREFIX = "pocketlm-"
SHORT_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
PLACEHOLDER = re.compile(r"\{\{\s*([a-z_]+)\s*\}\}")
SUFFIX = ".tmpl"


@dataclass(frozen=True)
class PluginNames:
    distribution: str   # pocketlm-foo-bar
    package: str        # pocketlm_foo_bar
    method: str         # foo-bar (method name and entry-point name)
    module: str         # foo_bar (the method's module)
    options_class: str  # FooBarOptions

    def as_dict(self) -> dict[str, str]:
        return dict(self.__dict__)


def plugin_names(name: str) -> PluginNames:
    """Derive every name of a plugin from ``NAME``; refuse an invalid one with the fix."""
    raw = name.strip()
    short = raw[len(PREFIX):] if raw.startswith(PREFIX) else raw
    fix = ("use lowercase letters, digits and single hyphens, starting with a letter, "
           "for example `pocketlm new-plugin pocketlm-myquant` or `pocketlm new-plugin myquant`")
    if not short or not SHORT_NAME.match(short):
        raise PocketError(f"{name!r} is not a valid plugin name", field="NAME", fix=fix)
    if short == "pocketlm" or short.startswith("pocketlm-"):
        raise PocketError(f"{name!r} repeats the pocketlm prefix", field="NAME",
                          fix=f"give the short name, e.g. `pocketlm new-plugin {short.removeprefix('pocketlm-') or 'myquant'}`")
    module = short.replace("-", "_")
    if keyword.iskeyword(module):
        raise PocketError(f"{name!r} would make a module named {module!r}, a Python keyword", field="NAME", fix=fix)
    return PluginNames(distribution=PREFIX + short, package="pocketlm_" + module, method=short, module=module,
                       options_class="".join(part.capitalize() for part in short.split("-")) + "Options")


def render(text: str, values: dict[str, str], where: str = "<template>") -> str:
    """Replace every ``{{key}}`` in ``text``; an unknown key is an error."""
    def substitute(match: re.Match) -> str:
        key = match.group(1)
        if key not in values:
            raise KeyError(f"{where}: unknown placeholder {{{{{key}}}}}")
        return values[key]

    return PLACEHOLDER.sub(substitute, text)


def template_root() -> Traversable:
    return resources.files("pocketlm") / "templates" / "plugin"


def _walk(folder: Traversable, prefix: str = "") -> list[tuple[str, Traversable]]:
    found = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name == "__pycache__" or entry.name.startswith("."):
            continue
        if entry.is_dir():
            found += _walk(entry, f"{prefix}{entry.name}/")
        elif entry.name.endswith(SUFFIX):
            found.append((prefix + entry.name[:-len(SUFFIX)], entry))
    return found


def plan_files(names: PluginNames) -> dict[str, str]:
    """The files of a new plugin: relative path -> content."""
    values = names.as_dict()
    files = {render(path, values, path): render(entry.read_text(encoding="utf-8"), values, path)
             for path, entry in _walk(template_root())}
    if not files:
        raise PocketError("the plugin templates are missing from this pocketlm installation",
                          fix="reinstall pocketlm (the templates are package data under pocketlm/templates)",
                          exit_code=1)
    return files


def create_plugin(name: str, directory: Path | str = ".") -> Path:
    """Create the plugin package ``pocketlm-<name>`` in ``directory`` and return its folder.

    The folder is written atomically: it appears complete or not at all. An existing folder is
    never touched."""
    names = plugin_names(name)
    folder = Path(directory).expanduser() / names.distribution
    if folder.exists():
        raise PocketError(f"{folder} already exists", field="NAME",
                          fix="choose another name or --directory, or remove the folder first")
    if Path(directory).exists() and not Path(directory).is_dir():
        raise PocketError(f"{directory} is not a folder", field="--directory", fix="give a folder to create the plugin in")
    files = plan_files(names)
    with atomic.folder(folder) as tmp:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; a plugin folder is an ordinary one
        for relative, content in files.items():
            target = tmp / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content, encoding="utf-8")
    return folder


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


__all__ = ["PluginNames", "create_plugin", "plan_files", "plugin_names", "render", "template_root"]
