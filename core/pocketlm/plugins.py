"""Plugin discovery, API checks, isolation of broken plugins and the allowlist.

Load order (deterministic): the built-in plugins first, then entry points of the ``pocketlm``
group sorted by (distribution name, entry-point name).

A plugin is **skipped, and reported with its reason**, when it
* fails to import,
* declares no ``POCKETLM_API`` or a range that excludes :data:`pocketlm.API_VERSION`,
* implements a hook that does not exist, or raises inside a registration hook,
* registers something malformed, or
* claims a name (method, loader, evaluator, exporter, architecture) that an earlier plugin in
  the load order already holds. **Clash rule: the first plugin in load order keeps the name; the
  later one is skipped whole**, so a plugin is always either fully present or absent.

``POCKETLM_PLUGINS`` (comma-separated entry-point or distribution names) limits which external
plugins load; built-ins always load. Unset means all; empty means none.
"""

from __future__ import annotations

import os
import re
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from types import ModuleType
from typing import Any, Iterable

import pluggy
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import Version

from . import API_VERSION, hookspecs
from .components import KINDS, Architecture, Evaluator, Exporter, GridRule, Loader, Method, Options, Translator

ENTRY_POINT_GROUP = "pocketlm"
ALLOWLIST_ENV = "POCKETLM_PLUGINS"
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_\-]*$")
# translators are named by the class name other tools' recipes write (GPTQModifier)
CLASS_NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")

# registration hook -> (component type, the attribute that holds its name, the table)
REGISTRATIONS = {
    "register_methods": (Method, "methods"),
    "register_loaders": (Loader, "loaders"),
    "register_evaluators": (Evaluator, "evaluators"),
    "register_exporters": (Exporter, "exporters"),
    "register_architectures": (Architecture, "architectures"),
    "register_grid_rules": (GridRule, "grid_rules"),
    "register_translators": (Translator, "translators"),
}


@dataclass
class PluginInfo:
    name: str
    distribution: str | None
    version: str | None
    api: str | None
    builtin: bool
    provides: dict[str, list[str]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"name": self.name, "distribution": self.distribution, "version": self.version,
                "api": self.api, "builtin": self.builtin, "provides": self.provides}


@dataclass
class PluginProblem:
    name: str
    distribution: str | None
    reason: str

    def as_dict(self) -> dict:
        return {"name": self.name, "distribution": self.distribution, "reason": self.reason}


class Plugins:
    """The loaded plugins and everything they registered.

    ``methods``, ``evaluators``, ``exporters``, ``grid_rules``, ``translators`` map names to components, ``loaders`` and
    ``architectures`` keep registration order; ``owner[(table, name)]`` is the plugin that
    registered it; ``problems`` lists the skipped plugins with their reasons."""

    def __init__(self, *, entry_points: bool = True, extra: Iterable[tuple[str, Any]] = (),
                 allowlist: str | None = None):
        self.pm = pluggy.PluginManager("pocketlm")
        self.pm.add_hookspecs(hookspecs)
        self.methods: dict[str, Method] = {}
        self.evaluators: dict[str, Evaluator] = {}
        self.exporters: dict[str, Exporter] = {}
        self.grid_rules: dict[str, GridRule] = {}
        self.translators: dict[str, Translator] = {}
        self._loaders: dict[str, Loader] = {}
        self._architectures: dict[str, Architecture] = {}
        self._loader_order: list[tuple[bool, int, str]] = []
        self.owner: dict[tuple[str, str], str] = {}
        self.infos: list[PluginInfo] = []
        self.problems: list[PluginProblem] = []
        allowed = _allowlist(os.environ.get(ALLOWLIST_ENV) if allowlist is None else allowlist)

        from .builtins import BUILTIN_PLUGINS

        for name, module in BUILTIN_PLUGINS:
            self._add(name, module, distribution="pocketlm", version=_version("pocketlm"), builtin=True)
        candidates = list(_entry_points()) if entry_points else []
        for name, plugin in extra:  # plugin objects handed in directly (tests, embedding apps)
            candidates.append((getattr(plugin, "__name__", name), name, plugin))
        for distribution, name, target in sorted(candidates, key=lambda c: (c[0] or "", c[1])):
            if allowed is not None and name not in allowed and (distribution or "") not in allowed:
                continue
            self._load_external(distribution, name, target)

    # ------------------------------------------------------------------ lookups

    @property
    def hook(self):
        return self.pm.hook

    @property
    def loaders(self) -> list[Loader]:
        """Loaders in try order: plugins' before built-ins, each in registration order."""
        return [self._loaders[name] for _, _, name in sorted(self._loader_order)]

    @property
    def architectures(self) -> tuple[Architecture, ...]:
        # Plugins' architectures first, so a plugin may refine a built-in family's table.
        items = list(self._architectures.items())
        external = [a for n, a in items if not self._is_builtin(self.owner[("architectures", n)])]
        builtin = [a for n, a in items if self._is_builtin(self.owner[("architectures", n)])]
        return tuple(external + builtin)

    def _is_builtin(self, plugin_name: str) -> bool:
        return any(i.builtin for i in self.infos if i.name == plugin_name)

    def info(self, name: str) -> PluginInfo | None:
        return next((i for i in self.infos if i.name == name), None)

    # ------------------------------------------------------------------ loading

    def _load_external(self, distribution: str | None, name: str, target: Any) -> None:
        version = _version(distribution) if distribution else None
        try:
            module = target.load() if isinstance(target, metadata.EntryPoint) else target
        except BaseException as exc:  # noqa: BLE001 - a broken plugin must never stop the core
            self._problem(name, distribution, f"failed to import: {type(exc).__name__}: {exc}")
            return
        api = getattr(module, "POCKETLM_API", None)
        if api is None:
            self._problem(name, distribution, "declares no POCKETLM_API (the API range it supports, "
                          f"for example POCKETLM_API = \">={API_VERSION},<2\")")
            return
        try:
            compatible = Version(API_VERSION) in SpecifierSet(str(api))
        except InvalidSpecifier:
            self._problem(name, distribution, f"POCKETLM_API {api!r} is not a version range")
            return
        if not compatible:
            self._problem(name, distribution, f"supports pocketlm API {api} but this core provides "
                          f"API {API_VERSION}; upgrade the plugin or the core")
            return
        self._add(name, module, distribution=distribution, version=version, builtin=False, api=str(api))

    def _add(self, name: str, module: ModuleType, *, distribution, version, builtin, api=None) -> None:
        try:
            self.pm.register(module, name=name)
            _check_hook_names(self.pm, module)
            collected = self._collect(module)
            self._check_clashes(name, collected)
        except _Skip as skip:
            self._unregister(module)
            self._problem(name, distribution, str(skip))
            return
        except BaseException as exc:  # noqa: BLE001
            self._unregister(module)
            where = traceback.extract_tb(exc.__traceback__)[-1]
            self._problem(name, distribution, f"raised {type(exc).__name__}: {exc} "
                          f"(at {where.filename}:{where.lineno})")
            return
        version = version or getattr(module, "__version__", None)  # a plugin handed in directly
        provides: dict[str, list[str]] = {}
        for table, items in collected.items():
            for item in items:
                self._store(table, item, name, builtin)
                provides.setdefault(table, []).append(item.name)
        self.infos.append(PluginInfo(name, distribution, version, api or API_VERSION, builtin, provides))

    def _collect(self, module: ModuleType) -> dict[str, list]:
        others = [p for p in self.pm.get_plugins() if p is not module]
        collected: dict[str, list] = {}
        for hook_name, (kind, table) in REGISTRATIONS.items():
            items: list = []

            def register(item, _kind=kind, _items=items, _hook=hook_name):
                _validate(item, _kind, _hook)
                if any(i.name == item.name for i in _items):
                    raise _Skip(f"registers {_kind.__name__.lower()} {item.name!r} twice in {_hook}")
                _items.append(item)

            self.pm.subset_hook_caller(hook_name, remove_plugins=others)(register=register)
            if items:
                collected[table] = items
        return collected

    def _check_clashes(self, name: str, collected: dict[str, list]) -> None:
        for table, items in collected.items():
            for item in items:
                holder = self.owner.get((table, item.name))
                if holder is not None:
                    singular = table[:-1]
                    raise _Skip(f"{singular} {item.name!r} is already provided by plugin {holder!r}; "
                                "the plugin loaded first keeps a name, so this one is skipped "
                                f"(exclude one of them with {ALLOWLIST_ENV})")

    def _store(self, table: str, item: Any, plugin: str, builtin: bool) -> None:
        self.owner[(table, item.name)] = plugin
        if table == "loaders":
            self._loaders[item.name] = item
            self._loader_order.append((builtin, len(self._loader_order), item.name))
        elif table == "architectures":
            self._architectures[item.name] = item
        else:
            getattr(self, table)[item.name] = item

    def _unregister(self, module: ModuleType) -> None:
        if self.pm.is_registered(module):
            self.pm.unregister(module)

    def _problem(self, name: str, distribution: str | None, reason: str) -> None:
        self.problems.append(PluginProblem(name, distribution, reason))


class _Skip(Exception):
    """A plugin is malformed in a way we explain ourselves."""


def _validate(item: Any, kind: type, hook: str) -> None:
    if not isinstance(item, kind):
        raise _Skip(f"{hook} registered {type(item).__name__}, expected pocketlm.{kind.__name__}")
    pattern = CLASS_NAME_PATTERN if isinstance(item, Translator) else NAME_PATTERN
    if not isinstance(item.name, str) or not pattern.match(item.name):
        raise _Skip(f"{hook} registered the invalid name {item.name!r} (use lowercase letters, "
                    "digits, '-' and '_')")
    if isinstance(item, Method):
        if item.kind not in KINDS:
            raise _Skip(f"method {item.name!r} has kind {item.kind!r}; expected one of {', '.join(KINDS)}")
        if not (isinstance(item.options, type) and issubclass(item.options, Options)):
            raise _Skip(f"method {item.name!r}: options must be a subclass of pocketlm.Options")
        if not callable(item.compress):
            raise _Skip(f"method {item.name!r}: compress is not callable")
    if isinstance(item, GridRule) and not callable(item.fit):
        raise _Skip(f"grid rule {item.name!r}: fit is not callable")
    if isinstance(item, Translator) and not callable(item.translate):
        raise _Skip(f"translator {item.name!r}: translate is not callable")
    if isinstance(item, (Evaluator, Exporter)) and not (
            isinstance(item.options, type) and issubclass(item.options, Options)):
        raise _Skip(f"{item.name!r}: options must be a subclass of pocketlm.Options")


def _check_hook_names(pm: pluggy.PluginManager, module: Any) -> None:
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        known = ", ".join(sorted(n for n in dir(hookspecs) if getattr(getattr(hookspecs, n), "pocketlm_spec", None)))
        raise _Skip(f"implements an unknown hook ({exc}); hooks are: {known}") from None


def _entry_points():
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        distribution = entry_point.dist.name if entry_point.dist else None
        yield _normalise(distribution) if distribution else None, entry_point.name, entry_point


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _version(distribution: str | None) -> str | None:
    try:
        return metadata.version(distribution) if distribution else None
    except metadata.PackageNotFoundError:
        return None


def _allowlist(value: str | None) -> set[str] | None:
    if value is None:
        return None
    return {_normalise(v.strip()) for v in value.split(",") if v.strip()} | {
        v.strip() for v in value.split(",") if v.strip()}


_CACHE: dict[str | None, Plugins] = {}


def get_plugins(refresh: bool = False) -> Plugins:
    """The process-wide plugin set (built once per value of ``POCKETLM_PLUGINS``)."""
    key = os.environ.get(ALLOWLIST_ENV)
    if refresh or key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = Plugins()
    return _CACHE[key]


def installed_plugins() -> Plugins:
    """The plugins of this process (``pocketlm.installed_plugins``): for code that has no
    ``context.plugins`` at hand, such as a loader."""
    return get_plugins()
