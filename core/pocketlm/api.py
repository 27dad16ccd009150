"""The Python API, for notebooks and other programs.

Two entry points, both built on the recipe validation and the pipeline the command line uses:

``pocketlm.run(recipe)``
    Runs a recipe given as a file path, a dict (the data a TOML file parses to) or a parsed
    :class:`pocketlm.recipe.Recipe`, into a run folder, exactly as ``pocketlm run`` does.

``pocketlm.compress(model, tokenizer, stages=[...], calibration=...)``
    Compresses a transformers model already in memory, in place, and returns it. The model as it
    was before the first stage is what ``context.teacher()`` returns (a copy taken at the start).

Both return a :class:`Result`: the report (the same dict as ``report.json``), the run folder,
the export path and the model.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .components import LoadedModel
from .errors import PocketError
from .progress import Progress
from .recipe import Recipe, load_recipe, recipe_from_data


@dataclass
class Result:
    """What a run returns.

    * ``report``: metrics before, after and per stage (the content of ``report.json``);
    * ``run_dir``: the run folder (None when :func:`compress` used a temporary one);
    * ``export``: the export path, or None when the recipe exports nothing;
    * ``model``, ``tokenizer``: the compressed model, in memory."""

    report: dict
    run_dir: Path | None
    export: Path | None
    model: Any
    tokenizer: Any

    @property
    def before(self) -> dict[str, float]:
        return self.report["before"]

    @property
    def after(self) -> dict[str, float]:
        return self.report["after"]


def _plugins(plugins):
    if plugins is not None:
        return plugins
    from .plugins import get_plugins

    return get_plugins()


def _quiet(message: str) -> None:
    pass


def run(recipe: str | Path | dict | Recipe, *, run_dir: str | Path | None = None, resume: bool = False,
        overwrite: bool = False, plugins=None, progress: Progress | None = None,
        echo: Callable[[str], None] | None = print) -> Result:
    """Run ``recipe`` (a path to a TOML/YAML file, a dict, or a parsed recipe) into ``run_dir``
    (default ``runs/<recipe file name>``, or ``runs/recipe`` for a dict). ``echo`` receives the
    log lines (None: silent). Raises :class:`pocketlm.PocketError` on bad input."""
    from .pipeline import Run

    plugins = _plugins(plugins)
    if isinstance(recipe, Recipe):
        parsed = recipe
    elif isinstance(recipe, dict):
        parsed = recipe_from_data(recipe, plugins, file="<dict>")
    elif isinstance(recipe, (str, Path)):
        parsed = load_recipe(recipe, plugins)
    else:
        raise PocketError(f"pocketlm.run takes a recipe path, a dict or a parsed recipe, got {type(recipe).__name__}",
                          fix="pass the path of a .toml/.yaml recipe, or its content as a dict")
    if run_dir is None:
        run_dir = Path("runs") / (parsed.path.stem if parsed.path else "recipe")
    pipeline = Run(parsed, Path(run_dir), plugins, resume=resume, overwrite=overwrite, progress=progress,
                   echo=echo or _quiet)
    report = pipeline.execute()
    return Result(report, Path(run_dir), Path(report["export"]) if report["export"] else None,
                  pipeline.model, pipeline.tokenizer)


def _calibration_section(calibration) -> dict:
    if calibration is None:
        return {}
    if isinstance(calibration, (str, Path)):
        return {"text": str(calibration)}
    if isinstance(calibration, dict):
        return dict(calibration)
    raise PocketError(f"calibration must be a text file path, builtin:NAME or a dict, got {type(calibration).__name__}",
                      field="calibration", fix='pass calibration={"text": "builtin:wikitext-2-valid", "samples": 32}')


def _source_name(model) -> str:
    name = getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
    return str(name) or "in-memory model"


def compress(model, tokenizer, stages: list[dict], *, calibration: str | Path | dict | None = None,
             evaluate: dict | list[str] | None = None, export: dict | None = None,
             run_dir: str | Path | None = None, overwrite: bool = False, plugins=None,
             progress: Progress | None = None, echo: Callable[[str], None] | None = None) -> Result:
    """Compress ``model`` (a transformers causal LM in memory) in place with ``stages``.

    * ``stages``: a list of dicts as in a recipe, ``[{"method": NAME, **options}]``;
    * ``calibration``: the ``[calibration]`` section as a dict, or just its text (a path or
      ``builtin:NAME``); the defaults otherwise;
    * ``evaluate``: the ``[evaluate]`` section, or a list of metrics; nothing is measured by default;
    * ``export``: the ``[export]`` section (``{"format": "gguf", "path": "out"}``); a relative
      path is taken from the current folder;
    * ``run_dir``: where the run folder goes; by default a temporary folder, removed at the end.

    The original model is copied once before the first stage for ``context.teacher()``."""
    from .pipeline import Run

    plugins = _plugins(plugins)
    if isinstance(evaluate, (list, tuple)):
        evaluate = {"metrics": list(evaluate)}
    evaluate = {"metrics": [], "per_stage": [], **(evaluate or {})}
    data: dict[str, Any] = {"calibration": _calibration_section(calibration), "stages": list(stages),
                            "evaluate": evaluate}
    if export is not None:
        export = dict(export)
        export["path"] = str(Path(export.get("path", "export")).expanduser().resolve())
        data["export"] = export
    parsed = recipe_from_data(data, plugins, file="<compress>")
    source = _source_name(model)
    parsed.file.model = parsed.file.model.model_copy(update={"source": source})

    original = copy.deepcopy(model).eval()
    loads = {"first": True}

    class InMemoryRun(Run):
        """A run whose source is the model handed in; the teacher is the copy taken above."""

        def load(self, name: str):
            if name == source and loads["first"]:
                loads["first"] = False
                return LoadedModel(model, tokenizer, source)
            if name == source:  # the teacher: frozen by the context, never modified
                return LoadedModel(original, tokenizer, source)
            return super().load(name)

    temporary = tempfile.TemporaryDirectory(prefix="pocketlm-") if run_dir is None else None
    folder = Path(temporary.name) if temporary else Path(run_dir)
    try:
        pipeline = InMemoryRun(parsed, folder, plugins, overwrite=overwrite, progress=progress, echo=echo or _quiet)
        pipeline.resolved["model"]["source"] = source
        report = pipeline.execute()
    finally:
        if temporary is not None:
            temporary.cleanup()
    return Result(report, None if temporary else folder, Path(report["export"]) if report["export"] else None,
                  pipeline.model, pipeline.tokenizer)
