"""The default implementations of the working hooks: call the registered component.

They are ``trylast``, so any plugin's implementation of a working hook runs first and may take
the operation over, and hook wrappers see every call."""

from __future__ import annotations

import dataclasses

from .. import hookimpl
from ..errors import PocketError


@hookimpl(trylast=True)
def load_model(source, options, context):
    loader = _loader_for(source, context.plugins.loaders)
    if loader.resolves is None:
        return loader.load(source, options)
    local, revision = loader.resolves(source, options)  # a Hub id: its copy loads by its own format
    loaded = _loader_for(local, [l for l in context.plugins.loaders if l.resolves is None]).load(local, options)
    return dataclasses.replace(loaded, source=source, revision=revision)


def _loader_for(source: str, loaders):
    for loader in loaders:
        if loader.matches(source):
            return loader
    raise PocketError(f"no loader understands the model source {source!r}",
                      field="model.source",
                      fix="give a transformers model folder, a .gguf file, or demo:smollm2-135m")


@hookimpl(trylast=True)
def compress(model, method, options, context):
    result = method.compress(model, options, context)
    return model if result is None else result


@hookimpl(trylast=True)
def evaluate(model, evaluator, options, context):
    return evaluator.evaluate(model, options, context)


@hookimpl(trylast=True)
def export(model, exporter, options, path, context):
    exporter.export(model, path, options, context)
    return path
