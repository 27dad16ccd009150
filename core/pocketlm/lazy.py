"""Callables imported on first use, so that registering a component stays cheap.

A plugin's registration hooks run whenever pocketlm starts: ``--help`` aside, ``validate``,
``methods`` and ``plugins`` load every installed plugin. A component that names its callables as
``lazy("package.module:function")`` keeps torch (and the method's tensor code) out of those
commands: the module is imported the first time the callable is called, or its signature read.
Options models, size effects and plan hooks are read by ``validate`` and ``plan``, so they stay
plain objects in a light module (``options.py`` in the bundled plugins).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable


class Lazy:
    """A callable named by ``"module:attribute"``, resolved on first call and kept."""

    __slots__ = ("target", "_value")

    def __init__(self, target: str):
        module, _, attribute = target.partition(":")
        if not module or not attribute or not all(p.isidentifier() for p in (module + "." + attribute).split(".")):
            raise ValueError(f"lazy target {target!r} is not 'package.module:attribute'")
        self.target = target
        self._value: Callable | None = None

    def resolve(self) -> Callable:
        """The callable itself (imports its module the first time)."""
        if self._value is None:
            module, _, attribute = self.target.partition(":")
            value: Any = importlib.import_module(module)
            for part in attribute.split("."):
                value = getattr(value, part)
            self._value = value
        return self._value

    def __call__(self, *args, **kwargs):
        return self.resolve()(*args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        # inspect.signature(lazy) answers for the target (the core reads a check's parameters)
        return inspect.signature(self.resolve())

    def __eq__(self, other) -> bool:
        return isinstance(other, Lazy) and other.target == self.target

    def __hash__(self) -> int:
        return hash(self.target)

    def __repr__(self) -> str:
        return f"lazy({self.target!r})"


def lazy(target: str) -> Lazy:
    """A callable for ``"package.module:function"`` that imports its module on first call: give
    it to a component (``compress=lazy("my_plugin.method:compress")``) so that registering the
    plugin does not import torch."""
    return Lazy(target)
