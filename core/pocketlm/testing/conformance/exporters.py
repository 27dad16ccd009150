"""The exporter checks: writes only inside the folder it is given, the same bytes twice, nothing
visible after a failure, the model unchanged; ``ExporterConformance``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from torch import nn

from ... import atomic
from ...components import Exporter
from .. import make_context
from ._shared import _component, _cwd, _folder, _plugins, _raise, state_hash, tiny, windows
from .methods import run_method


def _listing(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def prepared_model(family: str = "llama", method: str | None = None, method_options=None, *, plugins=None) -> nn.Module:
    """A tiny model, compressed by ``method`` first when one is named."""
    if method is None:
        return tiny(family)
    return run_method(method, method_options, family, plugins=plugins, check_inputs=False).model


def check_exporter(name: str, options: Mapping[str, Any] | None = None, *, model: nn.Module | None = None,
                   family: str = "llama", method: str | None = None, method_options=None, tokenizer=None,
                   plugins=None, folder: Path | None = None) -> Path | None:
    """Exporter ``name`` writes ``model`` (or a tiny ``family`` model compressed by
    ``method``) only inside the temporary folder it is handed, leaves the model unchanged,
    writes identical bytes twice, and leaves nothing visible when it fails. Returns the export
    folder when ``folder`` is given."""
    plugins = _plugins(plugins)
    exporter: Exporter = _component(plugins, "exporters", name)
    built = exporter.options(**dict(options or {}))
    model = prepared_model(family, method, method_options, plugins=plugins) if model is None else model
    problems: list[str] = []
    if exporter.check is not None:
        found = exporter.problems(model, built, make_context(plugins=plugins))
        if not isinstance(found, list) or not all(isinstance(p, str) for p in found):
            problems.append(f"check(model, options) returned {found!r}; expected a list of strings")
        elif found:
            _raise(f"exporter {name!r}", [f"check() refuses the prepared model: {'; '.join(found)} "
                                          "(prepare a model it represents: method=..., method_options=...)"])
    before = state_hash(model)
    with _folder(folder) as base:
        sandbox, cwd = base / "sandbox", base / "cwd"
        sandbox.mkdir(parents=True, exist_ok=True)
        cwd.mkdir(parents=True, exist_ok=True)
        outputs = []
        for attempt in ("first", "second"):
            target = sandbox / f"{attempt}-export"
            context = make_context(windows(), tokenizer=tokenizer, plugins=plugins)
            context.export_path = target
            with _cwd(cwd), atomic.folder(target) as tmp:
                plugins.hook.export(model=model, exporter=exporter, options=built, path=tmp, context=context)
            outputs.append(_listing(target))
        if state_hash(model) != before:
            problems.append("exporting changed the model")
        if not outputs[0]:
            problems.append("the export folder is empty")
        stray = sorted(p.name for p in sandbox.iterdir() if p.name not in ("first-export", "second-export"))
        if stray:
            problems.append(f"it wrote outside the folder it was given: {stray} next to it")
        if any(cwd.iterdir()):
            problems.append(f"it wrote into the working directory: {sorted(p.name for p in cwd.iterdir())}")
        if outputs[0].keys() != outputs[1].keys():
            problems.append(f"two exports wrote different files: {sorted(outputs[0])} vs {sorted(outputs[1])}")
        else:
            differing = [k for k in outputs[0] if outputs[0][k] != outputs[1][k]]
            if differing:
                problems.append(f"two exports of the same model wrote different bytes in {differing} "
                                "(timestamps? unordered dicts?)")
        # An export that fails part-way must leave nothing visible.
        failing = sandbox / "failed-export"
        context = make_context(windows(), tokenizer=tokenizer, plugins=plugins)
        context.export_path = failing
        try:
            with _cwd(cwd), atomic.folder(failing) as tmp:
                plugins.hook.export(model=model, exporter=exporter, options=built, path=tmp, context=context)
                raise _Interrupted()
        except _Interrupted:
            pass
        leftovers = sorted(p.name for p in sandbox.iterdir() if p.name not in ("first-export", "second-export"))
        if leftovers:
            problems.append(f"after a failed export these are visible: {leftovers} (write only into the "
                            "path you are given, never into context.export_path)")
        kept = None
        if folder is not None:
            kept = sandbox / "first-export"
    _raise(f"exporter {name!r}", problems)
    return kept


class _Interrupted(Exception):
    pass


def export_model(name: str, path: Path, options: Mapping[str, Any] | None = None, *, model: nn.Module | None = None,
                 family: str = "llama", method: str | None = None, method_options=None, tokenizer=None,
                 plugins=None) -> Path:
    """Export ``model`` (or a tiny ``family`` model compressed by ``method``) with exporter
    ``name`` into the folder ``path``, as a run does; returns ``path``. A source for a loader's
    conformance test (``LoaderConformance.source``)."""
    plugins = _plugins(plugins)
    exporter: Exporter = _component(plugins, "exporters", name)
    model = prepared_model(family, method, method_options, plugins=plugins) if model is None else model
    context = make_context(windows(), tokenizer=tokenizer, plugins=plugins)
    context.export_path = Path(path)
    with atomic.folder(Path(path)) as tmp:
        plugins.hook.export(model=model, exporter=exporter, options=exporter.options(**dict(options or {})), path=tmp,
                            context=context)
    return Path(path)


class ExporterConformance:
    """Subclass as ``TestSomething``; set ``exporter`` and ``options``, and ``method`` /
    ``method_options`` to prepare a model the exporter represents (None: a dense model)."""

    exporter: str = ""
    options: dict = {}
    method: str | None = None
    method_options: dict = {}
    architectures: tuple[str, ...] = ("llama",)

    def pytest_generate_tests(self, metafunc):
        if "family" in metafunc.fixturenames:
            metafunc.parametrize("family", list(self.architectures))

    def test_exporter_contract(self, family, tmp_path):
        check_exporter(self.exporter, self.options, family=family, method=self.method,
                       method_options=self.method_options, folder=tmp_path)
