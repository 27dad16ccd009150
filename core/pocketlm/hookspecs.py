"""Every pocketlm hook. Each docstring here is the API reference for plugin authors.

A plugin is a module (found through the ``pocketlm`` entry-point group) that sets
``POCKETLM_API`` to the range of API versions it supports, for example ``">=1.0,<2"``, and
implements some of these functions decorated with ``pocketlm.hookimpl``.

Two families of hooks:

* **Registration hooks** (``register_*``) receive a ``register`` callback. Call it once per
  thing the plugin provides. The core records which plugin registered what, rejects duplicate
  names, and reports a plugin that raises here instead of crashing.
* **Working hooks** (``load_model``, ``compress``, ``evaluate``, ``export``) are called by the
  pipeline for each operation. They are ``firstresult`` hooks: the core's built-in
  implementation dispatches to the registered component and runs last, so a plugin may wrap
  an operation (``@hookimpl(wrapper=True)``: a generator whose ``result = yield`` receives
  what the operation returned and which returns it; timing, logging, tracing) or take it over
  by returning a result first.

A hook spec only ever gains arguments; pluggy passes an implementation only the arguments it
names, so old plugins keep working. The annotations are for readers and type checkers; pluggy
does not check them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Callable
    from pathlib import Path

    from torch import nn

    from .components import (Architecture, Evaluator, Exporter, GridRule, LoadedModel, Loader, Method, Options,
                              Translator)
    from .context import Context
    from .recipe import ModelSection

hookspec = pluggy.HookspecMarker("pocketlm")


# --------------------------------------------------------------------------- registration


@hookspec
def register_methods(register: Callable[[Method], None]) -> None:
    """Declare compression methods.

    :param register: call ``register(pocketlm.Method(...))`` once per method: its ``name``
        (what recipes write in ``method = ...``), ``kind`` (``quantize``, ``prune``,
        ``distill`` or ``transform``), its ``options`` model (a subclass of
        ``pocketlm.Options``), ``needs_calibration``, its size ``effect``, and its ordering
        constraints (``phase``, ``not_after``, ``exclusive``). A duplicate name skips the
        later plugin whole.
    :returns: nothing; what counts is what was registered."""


@hookspec
def register_loaders(register: Callable[[Loader], None]) -> None:
    """Declare model loaders.

    Loaders are tried in registration order (built-ins last, so a plugin may claim a source
    form first); the first whose ``matches(source)`` is true loads it.

    :param register: call ``register(pocketlm.Loader(name, matches, load))`` once per loader.
    :returns: nothing; what counts is what was registered."""


@hookspec
def register_evaluators(register: Callable[[Evaluator], None]) -> None:
    """Declare metrics.

    :param register: call ``register(pocketlm.Evaluator(name, options, evaluate))`` once per
        metric; ``name`` is what recipes list in ``[evaluate] metrics``.
    :returns: nothing; what counts is what was registered."""


@hookspec
def register_exporters(register: Callable[[Exporter], None]) -> None:
    """Declare output formats.

    :param register: call ``register(pocketlm.Exporter(name, options, export, ...))`` once per
        format; ``name`` is what recipes write in ``[export] format``, ``represents`` and
        ``packs`` say which model features it writes and which it stores compactly.
    :returns: nothing; what counts is what was registered."""


@hookspec
def register_architectures(register: Callable[[Architecture], None]) -> None:
    """Declare model families.

    An architecture tells the layer walker and the methods where the decoder layers, the
    embedding, the head and the norms are, which linears run in which order, and which
    scale-folding pairs exist. Registering one makes every method work on a new family
    without editing any method.

    :param register: call ``register(pocketlm.Architecture(...))`` once per family;
        ``model_types`` are matched against ``config.model_type``, and plugins' architectures
        are tried before the built-ins.
    :returns: nothing; what counts is what was registered."""


@hookspec
def register_grid_rules(register: Callable[[GridRule], None]) -> None:
    """Declare grid rules.

    A grid rule chooses the scales and zero points of a weight quantizer's groups (min-max,
    an importance-weighted search, a file format's own two-level grid). Quantizers take its
    ``name`` in their ``grid`` option and call ``fit`` through ``context.plugins.grid_rules``,
    never through another plugin's module. The core registers ``minmax`` (the default) and
    ``weighted-mse``.

    :param register: call ``register(pocketlm.GridRule(name, fit, summary, ...))`` once per
        rule.
    :returns: nothing; what counts is what was registered."""


@hookspec
def register_translators(register: Callable[[Translator], None]) -> None:
    """Declare translators of other tools' recipe modifiers.

    ``pocketlm import-recipe FILE`` reads an llm-compressor (or SparseML) recipe and hands each
    modifier to the translator registered under its class name. A plugin translates the
    modifiers its own methods stand in for, so the core never names one. A modifier no plugin
    translates is refused by name.

    :param register: call ``register(pocketlm.Translator(name, translate, summary))`` once per
        modifier class; ``name`` is the class name as recipes write it.
    :returns: nothing; what counts is what was registered."""


# ------------------------------------------------------------------------------- working


@hookspec(firstresult=True)
def load_model(source: str, options: ModelSection | None, context: Context) -> LoadedModel | None:
    """Load the model named by ``source``.

    The built-in implementation picks the first registered loader whose ``matches(source)``
    holds.

    :param source: the model source string: the recipe's ``[model] source``, a teacher's
        source, or a folder ``pocketlm eval`` was given.
    :param options: the validated ``[model]`` section (``dtype``, ``allow_pickle``,
        ``trust_remote_code``, ``revision``, ``device``, ``offload``); None when no recipe
        is at hand (the planner's probe).
    :param context: the run's ``pocketlm.Context`` (``context.plugins`` lists the loaders).
    :returns: a ``pocketlm.LoadedModel``, or None to let the next implementation try."""


@hookspec(firstresult=True)
def compress(model: nn.Module, method: Method, options: Options, context: Context) -> nn.Module | None:
    """Run compression ``method`` on ``model``.

    :param model: the model as the previous stage left it; change it in place or return a
        replacement.
    :param method: the registered ``pocketlm.Method`` the stage names.
    :param options: the stage's options, an instance of ``method.options``.
    :param context: a ``pocketlm.Context`` that gives the calibration windows, the layer
        walker, the teacher and the stage folder.
    :returns: the compressed model (often ``model`` itself, changed in place), or None to let
        the next implementation try."""


@hookspec(firstresult=True)
def evaluate(model: nn.Module, evaluator: Evaluator, options: Options, context: Context) -> dict[str, float] | None:
    """Measure ``model`` with ``evaluator``.

    :param model: the model to measure; leave it as it was (weights, train/eval mode).
    :param evaluator: the registered ``pocketlm.Evaluator`` the recipe lists.
    :param options: the metric's options, an instance of ``evaluator.options``.
    :param context: the run's ``pocketlm.Context`` (``context.tokenizer``,
        ``context.export_path`` when there is an export).
    :returns: a flat dict of metric name to number, or None to let the next implementation
        try."""


@hookspec(firstresult=True)
def export(model: nn.Module, exporter: Exporter, options: Options, path: Path, context: Context) -> Path | None:
    """Write ``model`` with ``exporter`` into ``path``.

    :param model: the compressed model; do not change it (copy before densifying).
    :param exporter: the registered ``pocketlm.Exporter`` the recipe's ``[export] format``
        names (or ``format = "auto"`` chose).
    :param options: the format's options, an instance of ``exporter.options``.
    :param path: a fresh temporary folder; the core renames it into place after the hook
        returns, so an implementation writes freely and never worries about partial output.
    :param context: the run's ``pocketlm.Context`` (``context.export_path`` is where the
        folder will end up).
    :returns: ``path``, or None to let the next implementation try."""
