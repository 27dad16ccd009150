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
  an operation (``hookwrapper=True``: timing, logging, tracing) or take it over by returning a
  result first.

A hook spec only ever gains arguments; pluggy passes an implementation only the arguments it
names, so old plugins keep working.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("pocketlm")


# --------------------------------------------------------------------------- registration


@hookspec
def register_methods(register):
    """Declare compression methods.

    Call ``register(pocketlm.Method(...))`` for each method: its ``name`` (what recipes write
    in ``method = ...``), ``kind`` (``quantize``, ``prune``, ``distill`` or ``transform``), its
    ``options`` model (a subclass of ``pocketlm.Options``), ``needs_calibration``, its size
    ``effect``, and its ordering constraints (``phase``, ``not_after``, ``exclusive``)."""


@hookspec
def register_loaders(register):
    """Declare model loaders: ``register(pocketlm.Loader(name, matches, load))``.

    Loaders are tried in registration order (built-ins last, so a plugin may claim a source
    form first); the first whose ``matches(source)`` is true loads it."""


@hookspec
def register_evaluators(register):
    """Declare metrics: ``register(pocketlm.Evaluator(name, options, evaluate))``.

    ``name`` is what recipes list in ``[evaluate] metrics``."""


@hookspec
def register_exporters(register):
    """Declare output formats: ``register(pocketlm.Exporter(name, options, export, ...))``.

    ``name`` is what recipes write in ``[export] format``."""


@hookspec
def register_architectures(register):
    """Declare model families: ``register(pocketlm.Architecture(...))``.

    An architecture tells the layer walker and the methods where the decoder layers, the
    embedding, the head and the norms are, which linears run in which order, and which
    scale-folding pairs exist. Registering one makes every method work on a new family
    without editing any method. ``model_types`` are matched against ``config.model_type``."""


@hookspec
def register_grid_rules(register):
    """Declare grid rules: ``register(pocketlm.GridRule(name, fit, summary, ...))``.

    A grid rule chooses the scales and zero points of a weight quantizer's groups (min-max,
    an importance-weighted search, a file format's own two-level grid). Quantizers take its
    ``name`` in their ``grid`` option and call ``fit`` through ``context.plugins.grid_rules``,
    never through another plugin's module. The core registers ``minmax`` (the default) and
    ``weighted-mse``."""


# ------------------------------------------------------------------------------- working


@hookspec(firstresult=True)
def load_model(source, options, context):
    """Load the model named by ``source`` (a string from the recipe's ``[model] source``).

    ``options`` is the validated ``[model]`` section. Return a ``pocketlm.LoadedModel``, or
    None to let the next implementation try. The built-in implementation picks the first
    registered loader whose ``matches(source)`` holds."""


@hookspec(firstresult=True)
def compress(model, method, options, context):
    """Run compression ``method`` (a registered ``pocketlm.Method``) on ``model``.

    ``options`` is an instance of ``method.options``; ``context`` is a ``pocketlm.Context``
    that gives the calibration windows, the layer walker, the teacher and the stage folder.
    Return the compressed model (often ``model`` itself, changed in place), or None to let the
    next implementation try."""


@hookspec(firstresult=True)
def evaluate(model, evaluator, options, context):
    """Measure ``model`` with ``evaluator`` (a registered ``pocketlm.Evaluator``).

    Return a dict of metric name to number, or None to let the next implementation try."""


@hookspec(firstresult=True)
def export(model, exporter, options, path, context):
    """Write ``model`` with ``exporter`` (a registered ``pocketlm.Exporter``) into ``path``.

    ``path`` is a temporary folder; the core renames it into place after the hook returns, so
    an implementation writes freely and never worries about partial output. Return ``path``,
    or None to let the next implementation try."""
