"""The internal plugins. They register through the same hooks as any plugin, so the core has
no special cases: built-in loaders, evaluators and the ``hf`` exporter are ordinary components."""

from __future__ import annotations

from . import architectures, dispatch, encoder_evaluators, evaluators, export_hf, grids, loaders

BUILTIN_PLUGINS = (
    ("pocketlm.dispatch", dispatch),
    ("pocketlm.architectures", architectures),
    ("pocketlm.loaders", loaders),
    ("pocketlm.evaluators", evaluators),
    ("pocketlm.encoder_evaluators", encoder_evaluators),
    ("pocketlm.export_hf", export_hf),
    ("pocketlm.grids", grids),
)
