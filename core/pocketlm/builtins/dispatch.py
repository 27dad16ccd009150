"""The default implementations of the working hooks: call the registered component.

They are ``trylast``, so any plugin's implementation of a working hook runs first and may take
the operation over, and hook wrappers see every call."""

from __future__ import annotations

from .. import hookimpl
from ..errors import PocketError


@hookimpl(trylast=True)
def load_model(source, options, context):
    for loader in context.plugins.loaders:
        if loader.matches(source):
            return loader.load(source, options)
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
