"""The internal plugins. They register through the same hooks as any plugin, so the core has
no special cases: built-in loaders, evaluators and the ``hf`` exporter are ordinary components.
Their registrations (:mod:`.components`) import no torch; the code they name is imported when
it is first called."""

from __future__ import annotations

from . import architectures, dispatch
from .components import EncoderEvaluators, Evaluators, ExportHf, Grids, Loaders

BUILTIN_PLUGINS = (
    ("pocketlm.dispatch", dispatch),
    ("pocketlm.architectures", architectures),
    ("pocketlm.loaders", Loaders),
    ("pocketlm.evaluators", Evaluators),
    ("pocketlm.encoder_evaluators", EncoderEvaluators),
    ("pocketlm.export_hf", ExportHf),
    ("pocketlm.grids", Grids),
)
