"""The ``pocketlm`` command. It only parses arguments and calls the public API.

Bad input ends with exit code 2 and one message (no traceback unless ``--debug``); a failure
while running ends with exit code 1.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import sys
from pathlib import Path
from typing import Iterator

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .errors import PocketError
from .planner import DEFAULT_MODEL
from .progress import Progress

# markup off: recipe text ("[model]"), paths and messages are printed as they are
console = Console(stderr=True, markup=False)
out = Console(markup=False)


def print_error(message: str) -> None:
    console.print(Text.assemble(("error:", "bold red"), " " + message), highlight=False, soft_wrap=True)


class RichProgress(Progress):
    """Progress bars on stderr with the time left (quiet when stderr is not a terminal, so logs
    stay plain)."""

    @contextlib.contextmanager
    def task(self, description: str, total: int | None) -> Iterator:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        if not console.is_terminal:
            yield lambda steps=1, **fields: None
            return
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("left"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
        from rich.progress import Progress as Bar

        with Bar(*columns, console=console, transient=True) as bar:
            task = bar.add_task(description, total=total, info="")

            def advance(steps=1, **fields):
                info = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
                bar.update(task, advance=steps, info=info)

            yield advance


def _handle_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, debug: bool = False, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PocketError as exc:
            if debug:
                raise
            print_error(str(exc))
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            console.print("interrupted; continue with --resume")
            sys.exit(130)
        except SystemExit as exc:  # model or library code that called sys.exit: never a silent success
            if debug:
                raise
            print_error(f"the run stopped: something called sys.exit({exc.code!r})\n"
                        "  (rerun with --debug for the traceback; continue with --resume)")
            sys.exit(1)
        except OSError as exc:  # a full disk, a read-only folder: say which path, and how to go on
            if debug:
                raise
            where = f": {exc.filename}" if exc.filename else ""
            fix = ("free space or choose a writable folder, then continue with --resume"
                   if exc.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT)
                   else "rerun with --debug for the traceback")
            print_error(f"{exc.strerror or exc}{where}\n  fix: {fix}")
            sys.exit(1)
        except Exception as exc:  # noqa: BLE001
            if debug:
                raise
            print_error(f"{type(exc).__name__}: {exc}\n  (rerun with --debug for the traceback)")
            sys.exit(1)
    return click.option("--debug", is_flag=True, help="show tracebacks")(wrapper)


def _plugins():
    from .plugins import get_plugins

    plugins = get_plugins()
    for problem in plugins.problems:
        console.print(Text.assemble(("warning:", "yellow"), f" plugin {problem.name} skipped: {problem.reason}"),
                      highlight=False)
    return plugins


def _quiet_transformers() -> None:
    """Commands that load a model silence transformers' own bars and notices (ours are on stderr);
    done here, not in ``main``, so --help and validate never import transformers."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


@click.group()
@click.version_option(package_name="pocketlm")
def main():
    """pocketlm: make language models pocket-sized."""
    import os

    # Environment rather than transformers' logging API: importing transformers here would cost
    # seconds on every command, --help included.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@main.command()
@click.argument("recipe", required=False, type=click.Path(path_type=Path))
@click.option("--run-dir", type=click.Path(path_type=Path), help="run folder (default runs/<recipe name>)")
@click.option("--resume", is_flag=True, help="continue a killed run after its last finished stage")
@click.option("--overwrite", is_flag=True, help="replace an existing run in the run folder")
@_handle_errors
def run(recipe, run_dir, resume, overwrite):
    """Run RECIPE (TOML or YAML). With no recipe, run the default hybrid on the demo model."""
    from .pipeline import Run, report_rows
    from .recipe import load_recipe, parse_recipe

    _quiet_transformers()
    plugins = _plugins()
    if recipe is None:
        from .planner import default_recipe_text

        text = default_recipe_text(plugins)
        console.print("no recipe given: running the default recipe for the installed plugins:\n" + text, highlight=False,
                      soft_wrap=True)
        loaded = parse_recipe(text, plugins, file="<default recipe>")
        run_dir = run_dir or Path("runs") / "default"
    else:
        loaded = load_recipe(recipe, plugins)
        run_dir = run_dir or Path("runs") / Path(recipe).stem
    report = Run(loaded, run_dir, plugins, resume=resume, overwrite=overwrite, progress=RichProgress(),
                 echo=lambda m: console.print(m, highlight=False, soft_wrap=True)).execute()
    if not report:          # another process than rank 0 of a data-parallel run: rank 0 reports
        return
    table = Table(title=f"{report['model']}: before and after")
    rows = report_rows(report)
    for column in rows[0]:
        table.add_column(column, justify="right")
    for row in rows[1:]:
        table.add_row(*row)
    out.print(table)
    out.print(f"run folder: {run_dir}" + (f"\nexport: {report['export']}" if report["export"] else ""), soft_wrap=True)


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--run-dir", type=click.Path(path_type=Path), help="run folder to check (default runs/<recipe name>)")
@_handle_errors
def validate(recipe, run_dir):
    """Check RECIPE against the installed plugins without running it."""
    from .recipe import load_recipe
    from .rundir import check_run_folder, recipe_export_path

    plugins = _plugins()
    loaded = load_recipe(recipe, plugins)
    run_dir = run_dir or Path("runs") / Path(recipe).stem
    check_run_folder(run_dir)
    recipe_export_path(loaded, run_dir)  # torch stays unimported: validate is read-only and fast
    stages = loaded.stages
    listed = f"{len(stages)} stage{'s' if len(stages) != 1 else ''}: " + ", ".join(s.method for s in stages)
    click.echo(f"{recipe}: valid ({listed if stages else 'no stages'})")


def _keep_existing(output: Path, overwrite: bool, ours=None) -> None:
    """Refuse to replace a file the user has at ``output`` unless ``--overwrite`` says so; a file
    ``ours(text)`` recognises as this command's own earlier output may be replaced."""
    if overwrite or not output.exists():
        return
    if output.is_file() and ours is not None:
        try:
            if ours(output.read_text(encoding="utf-8")):
                return
        except (OSError, UnicodeDecodeError):
            pass
    raise PocketError(f"{output} already exists", field="--output",
                      fix="choose another file, or pass --overwrite to replace it")


def _is_recipe_schema(text: str) -> bool:
    from .recipe import RECIPE_SCHEMA_TITLE

    try:
        return json.loads(text).get("title") == RECIPE_SCHEMA_TITLE
    except (ValueError, AttributeError):
        return False


@main.command()
@click.option("--output", "-o", type=click.Path(path_type=Path), help="write to a file instead of stdout")
@click.option("--overwrite", is_flag=True, help="replace OUTPUT even if it is not an earlier recipe schema")
@_handle_errors
def schema(output, overwrite):
    """Print the JSON Schema of recipes for the installed plugins."""
    from . import atomic
    from .recipe import json_schema

    text = json.dumps(json_schema(_plugins()), indent=2)
    if output:
        _keep_existing(output, overwrite, ours=_is_recipe_schema)  # regenerating a schema is routine
        atomic.write_text(output, text + "\n")
    else:
        click.echo(text)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--available", is_flag=True, help="list registry.toml plugins that are not installed")
@_handle_errors
def plugins(as_json, available):
    """List installed plugins (and skipped ones, with the reason)."""
    from . import registry
    from .plugins import get_plugins

    loaded = get_plugins()
    if available:
        installed = {i.distribution for i in loaded.infos}
        rows = [{"distribution": e.distribution, "version": e.version, "summary": e.summary,
                 "methods": list(e.methods), "exporters": list(e.exporters), "install": e.install}
                for e in registry.entries() if e.distribution not in installed]
        if as_json:
            click.echo(json.dumps(rows, indent=2))
            return
        table = Table(title="available plugins (registry.toml), not installed")
        for column in ("distribution", "version", "provides", "install"):
            table.add_column(column)
        for row in rows:
            table.add_row(row["distribution"], row["version"], ", ".join(row["methods"] + row["exporters"]), row["install"])
        out.print(table)
        return
    if as_json:
        click.echo(json.dumps({"plugins": [i.as_dict() for i in loaded.infos],
                               "skipped": [p.as_dict() for p in loaded.problems]}, indent=2))
        return
    table = Table(title="installed plugins")
    for column in ("plugin", "distribution", "version", "provides"):
        table.add_column(column)
    for info in loaded.infos:
        provides = "; ".join(f"{k}: {', '.join(v)}" for k, v in info.provides.items())
        table.add_row(info.name, info.distribution or "", info.version or "", provides)
    out.print(table)
    for problem in loaded.problems:
        out.print(Text.assemble(("skipped", "yellow"), f" {problem.name} ({problem.distribution}): {problem.reason}"),
                  highlight=False)


@main.command()
@click.option("--json", "as_json", is_flag=True)
@_handle_errors
def methods(as_json):
    """List every method with its kind, options and defaults."""
    loaded = _plugins()
    rows = []
    for name, method in sorted(loaded.methods.items()):
        options = {key: {"type": str(getattr(field.annotation, "__name__", field.annotation)).replace("typing.", ""),
                         "default": None if field.is_required() else field.default,
                         "description": field.description or ""}
                   for key, field in method.options.model_fields.items()}
        rows.append({"name": name, "kind": method.kind, "plugin": loaded.owner[("methods", name)],
                     "summary": method.summary, "needs_calibration": method.needs_calibration, "options": options})
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    for row in rows:
        out.print(Text.assemble((row["name"], "bold"), f" ({row['kind']}, {row['plugin']})"
                                f"{' [calibration]' if row['needs_calibration'] else ''}: {row['summary']}"),
                  highlight=False)
        for key, option in row["options"].items():
            out.print(f"    {key}: {option['type']} = {option['default']!r}  {option['description']}", highlight=False)


@main.command(name="eval")
@click.argument("model")
@click.option("--metrics", default=None, help="comma-separated metrics (default: perplexity,size,parameters,sparsity; "
              "for an encoder: embedding-fidelity,retrieval,size,parameters,sparsity)")
@click.option("--windows", type=click.IntRange(min=1), help="perplexity windows (default 32)")
@_handle_errors
def eval_(model, metrics, windows):
    """Evaluate MODEL (a folder, a .gguf file, a run's stage folder or demo:NAME)."""
    from .recipe import parse_recipe

    names = [m.strip() for m in (metrics or "").split(",") if m.strip()]
    text = f'[model]\nsource = {json.dumps(model)}\n[evaluate]\nmetrics = {json.dumps(names)}\nper_stage = []\n'
    if windows is not None and "perplexity" in names:
        text += f"[evaluate.perplexity]\nwindows = {windows}\n"
    _quiet_transformers()
    loaded_plugins = _plugins()
    recipe = parse_recipe(text, loaded_plugins, file="<eval>")
    from .pipeline import Run

    run_ = Run(recipe, Path("."), loaded_plugins, progress=RichProgress(), owns_folder=False)
    loaded = run_.load(model)
    if not names:
        from .modules import is_encoder
        from .pipeline import ENCODER_METRICS

        encoder = is_encoder(loaded.model, loaded_plugins.architectures)
        names = [*(ENCODER_METRICS if encoder else ("perplexity", "size")), "parameters", "sparsity"]
    results = run_.evaluate(loaded.model, loaded.tokenizer, names, Path(model) if Path(model).exists() else None)
    table = Table(title=model)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in results.items():
        table.add_row(key, f"{value:.4g}")
    out.print(table)


@main.command()
@click.argument("model")
@click.option("--format", "format_", default="hf", show_default=True)
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path))
@_handle_errors
def export(model, format_, output):
    """Export MODEL (a folder, a run's stage folder or demo:NAME) to OUTPUT."""
    from .pipeline import Run
    from .recipe import parse_recipe
    from .rundir import check_export_path

    check_export_path(str(output), None, model, Path.cwd(), field="--output")
    _quiet_transformers()
    loaded_plugins = _plugins()
    text = (f'[model]\nsource = {json.dumps(model)}\n[evaluate]\nmetrics = []\nper_stage = []\n'
            f'[export]\nformat = {json.dumps(format_)}\npath = {json.dumps(str(output.resolve()))}\n')
    recipe = parse_recipe(text, loaded_plugins, file="<export>")
    # what the exporter says (a block type that rounds, a fallback) goes to stderr; stdout keeps one line
    run_ = Run(recipe, output.parent, loaded_plugins, progress=RichProgress(), owns_folder=False,
               echo=lambda message: console.print(message, highlight=False, soft_wrap=True))
    # an exporter that writes layer by layer gets the layers one at a time (a stage checkpoint's,
    # a safetensors folder's, a .gguf file's); a source that cannot stream loads whole
    exporter = loaded_plugins.exporters.get(format_)
    loaded = run_.load(model, stream=bool(exporter is not None and exporter.streams))
    path = run_.export(loaded.model, loaded.tokenizer)
    out.print(f"exported {model} as {format_} to {path}", soft_wrap=True)


@main.command()
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="model source")
@click.option("--target-size-mb", type=click.FloatRange(min=0, min_open=True), help="largest acceptable size")
@click.option("--target-bits", type=click.FloatRange(min=0, min_open=True, max=32),
              help="largest acceptable mean bits per weight")
@click.option("--min-retention", type=click.FloatRange(min=0, max=1, min_open=True),
              help="smallest acceptable baseline/compressed perplexity, in (0, 1] (measured with --evaluate)")
@click.option("--evaluate", "evaluate_k", type=click.IntRange(min=0), default=0,
              help="run the K smallest candidates (quick protocol)")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("runs/plan"), show_default=True)
@click.option("--json", "as_json", is_flag=True)
@_handle_errors
def plan(model, target_size_mb, target_bits, min_retention, evaluate_k, out_dir, as_json):
    """List candidate hybrid recipes from the installed methods, with estimated sizes."""
    from .planner import DEMO_STATS, PlanBudget, candidates, stats_of

    plugins = _plugins()
    budget = PlanBudget(target_size_mb, target_bits, min_retention)
    stats = DEMO_STATS if model == DEFAULT_MODEL else stats_of(model, plugins)
    found = candidates(plugins, stats, budget)
    if evaluate_k:
        from .plan_eval import evaluate_candidates, quality_of

        evaluate_candidates(found[:evaluate_k], model, plugins, out_dir, budget, out, quality=quality_of(stats))
        return
    if as_json:
        click.echo(json.dumps([{"recipe": c.recipe(model), "label": c.label, "size_mb": c.size_mb,
                                "bits": c.bits} for c in found], indent=2))
        return
    table = Table(title=f"{len(found)} candidate hybrids for {model}")
    for column in ("#", "stages", "est. size (MB)", "bits/weight"):
        table.add_column(column)
    for number, candidate in enumerate(found, 1):
        table.add_row(str(number), candidate.label, f"{candidate.size_mb:.1f}", f"{candidate.bits:.2f}")
    out.print(table)


@main.command(name="import-recipe")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--model", help="model source to write into [model] (default: a placeholder to fill in)")
@click.option("--output", "-o", type=click.Path(path_type=Path), help="write the pocketlm recipe here instead of stdout")
@click.option("--overwrite", is_flag=True, help="replace OUTPUT if it exists")
@_handle_errors
def import_recipe(recipe, model, output, overwrite):
    """Translate an llm-compressor (or SparseML) recipe YAML into a pocketlm recipe.

    Each modifier goes to the installed plugin that translates it; one that has no pocketlm
    counterpart is refused by name, with its line, and nothing is written."""
    from . import atomic
    from .recipe import parse_recipe
    from .translate import PLACEHOLDER_SOURCE, translate_recipe

    if output is not None:  # a recipe written earlier may hold the user's edits since
        _keep_existing(output, overwrite)
    plugins = _plugins()
    imported = translate_recipe(recipe, plugins, model)
    text = imported.toml(Path(recipe).name)
    if model is not None:  # a source to check against: the result must validate as it is
        if output is not None and Path(model).exists() and not Path(model).is_absolute():
            # recipes resolve a relative source from their own folder
            imported.recipe["model"]["source"] = os.path.relpath(model, Path(output).parent)
            text = imported.toml(Path(recipe).name)
        try:
            parse_recipe(text, plugins, file="translated recipe", path=output)
        except PocketError as exc:
            raise PocketError(f"the translated recipe would not run: {exc.field or ''}: {exc.message}".replace(": : ", ": "),
                              file=str(recipe), fix=exc.fix) from None
    for note in imported.notes:
        console.print(f"note: {note}", highlight=False, soft_wrap=True)
    if output:
        atomic.write_text(output, text)
        stages = imported.recipe["stages"]
        click.echo(f"wrote {output} ({len(stages)} stage{'s' if len(stages) != 1 else ''}: "
                   + ", ".join(s["method"] for s in stages) + ")")
        if imported.recipe["model"]["source"] == PLACEHOLDER_SOURCE:
            click.echo(f"next: set [model] source in {output}, then `pocketlm validate {output}`")
    else:
        click.echo(text, nl=False)


@main.command(name="new-plugin")
@click.argument("name")
@click.option("--directory", "-d", type=click.Path(path_type=Path), default=Path("."), show_default=True)
@_handle_errors
def new_plugin(name, directory):
    """Create a plugin package NAME with a method skeleton, tests and docs."""
    from .scaffold import create_plugin

    folder = create_plugin(name, directory)
    out.print(f"created {folder}\nnext: pip install -e {folder} && pytest {folder}/tests")


if __name__ == "__main__":  # pragma: no cover
    main()
