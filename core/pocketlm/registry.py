"""``registry.toml``: the index of known plugins, used for install hints and ``--available``."""

from __future__ import annotations

import functools
import os
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as a package
    import tomli as tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

REGISTRY_ENV = "POCKETLM_REGISTRY"


@dataclass(frozen=True)
class Entry:
    distribution: str
    version: str
    api: str
    source: str
    summary: str = ""
    methods: tuple[str, ...] = ()
    loaders: tuple[str, ...] = ()
    evaluators: tuple[str, ...] = ()
    exporters: tuple[str, ...] = ()
    grid_rules: tuple[str, ...] = ()
    translators: tuple[str, ...] = ()
    extras: dict = field(default_factory=dict)

    @property
    def install(self) -> str:
        return f"pip install {self.distribution}"


def registry_path() -> Path:
    """``POCKETLM_REGISTRY``, else the copy shipped in the package (a link to the repo's file)."""
    override = os.environ.get(REGISTRY_ENV)
    return Path(override) if override else Path(str(resources.files("pocketlm") / "data" / "registry.toml"))


@functools.lru_cache(maxsize=4)
def _load(path: str) -> tuple[Entry, ...]:
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return ()
    entries = []
    for name, item in raw.get("plugins", {}).items():
        entries.append(Entry(
            distribution=name, version=str(item.get("version", "")), api=str(item.get("api", "")),
            source=str(item.get("source", "")), summary=str(item.get("summary", "")),
            methods=tuple(item.get("methods", ())), loaders=tuple(item.get("loaders", ())),
            evaluators=tuple(item.get("evaluators", ())), exporters=tuple(item.get("exporters", ())),
            grid_rules=tuple(item.get("grid_rules", ())), translators=tuple(item.get("translators", ()))))
    return tuple(entries)


def entries() -> tuple[Entry, ...]:
    return _load(str(registry_path()))


def entry(distribution: str) -> Entry | None:
    return next((e for e in entries() if e.distribution == distribution), None)


def provider_of(table: str, name: str) -> Entry | None:
    """The registry entry that provides ``name`` in ``table`` (methods, exporters, ...)."""
    return next((e for e in entries() if name in getattr(e, table, ())), None)
