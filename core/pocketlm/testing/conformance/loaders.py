"""The loader check: it claims its source, is the one the core picks, and gives a
:class:`pocketlm.LoadedModel` with finite logits; ``LoaderConformance``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from torch import nn

from ...components import LoadedModel
from ._shared import _component, _plugins, _raise, nonfinite, windows


def check_loader(name: str, source: str, options: Mapping[str, Any] | None = None, *, plugins=None) -> LoadedModel:
    """Loader ``name`` claims ``source``, is the loader the core picks for it, and returns a
    :class:`pocketlm.LoadedModel` whose model gives finite logits."""
    from ...recipe import ModelSection

    plugins = _plugins(plugins)
    loader = _component(plugins, "loaders", name)
    section = ModelSection(source=source, **dict(options or {}))
    problems = []
    if not loader.matches(source):
        _raise(f"loader {name!r}", [f"matches({source!r}) is false"])
    first = next((l for l in plugins.loaders if l.matches(source)), None)
    if first is not loader:
        problems.append(f"the core picks loader {first.name!r} for {source!r} before this one")
    loaded = loader.load(source, section)
    if not isinstance(loaded, LoadedModel):
        _raise(f"loader {name!r}", [f"load() returned {type(loaded).__name__}; expected pocketlm.LoadedModel"])
    if not isinstance(loaded.model, nn.Module):
        problems.append(f"LoadedModel.model is a {type(loaded.model).__name__}, not a torch module")
    else:
        vocab = loaded.model.get_input_embeddings().num_embeddings
        ids = windows(seed=0) % vocab
        bad = nonfinite(loaded.model, ids)
        if bad:
            problems.append(f"the loaded model has NaN or inf in {', '.join(bad[:6])}")
        if loaded.model.training:
            problems.append("the loaded model is in train mode; return model.eval()")
    if not isinstance(loaded.source, str):
        problems.append(f"LoadedModel.source is {loaded.source!r}; expected the source string")
    _raise(f"loader {name!r}", problems)
    return loaded


class LoaderConformance:
    """Subclass as ``TestSomething``; set ``loader`` and implement ``source(tmp_path)``
    returning a source string the loader should load."""

    loader: str = ""
    options: dict = {}

    def source(self, tmp_path: Path) -> str:  # pragma: no cover - the author provides it
        raise NotImplementedError("return a source string your loader understands")

    def test_loader_contract(self, tmp_path):
        check_loader(self.loader, self.source(tmp_path), self.options)
