"""The pipeline: load → evaluate before → stages in order → export → evaluate after.

Everything goes into a run folder::

    run/
      recipe.resolved.json   the recipe with defaults filled in, core and plugin versions,
                             sha256 of the data files
      eval-before.json       metrics of the loaded model
      stages/01-<method>/    checkpoint after stage 1 (config, safetensors, masks, stage.json)
      stages/01-<method>.work/  scratch a stage may use to resume itself (training steps, for example)
      export/                the export (or the recipe's export.path)
      report.json, report.md metrics before, after and per stage; report.json also names the
                             export and its format (``export_format``: what format = "auto" chose)
      run.log
      .pocketlm-run, .pocketlm-lock   ownership marker and the OS lock of the running process

Every file and folder is written atomically. Each stage folder records the sha256 of its files,
verified on ``--resume``; the folder's ownership rule, lock, leftover cleanup and the
``--overwrite`` swap live in :mod:`pocketlm.rundir`.

``resume=True`` loads the last finished stage's
checkpoint and continues with the next, so a run killed at any point and resumed produces the
same export as an uninterrupted one (stages are seeded from the recipe's seed and stage index).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import __version__, atomic, calibration, devices, distributed, rundir, streaming
from .builtins.evaluators import check_context_length
from .checkpoint import is_checkpoint, is_streamed_checkpoint, load_checkpoint, save_checkpoint, save_rest
from .components import LoadedModel
from .context import GENERATED_FILE, CalibrationSpec, Context, Progress
from .data import resolve_text, sha256
from .errors import PocketError
from .modules import is_encoder
from .recipe import CalibrationSection, Recipe, rank_exporters

RESOLVED = "recipe.resolved.json"
OUTPUTS = ("stages", "export", "report.json", "report.md", "eval-before.json", GENERATED_FILE)  # what a run leaves
#: Recipe sections a resumed run may change: they act after the stages (see ``Run._resume_changed``).
RESUMABLE_CHANGES = frozenset({"export"})


@dataclass
class StageRecord:
    index: int
    method: str
    seconds: float
    peak_rss_mb: float
    metrics: dict[str, float] = field(default_factory=dict)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _version_of(distribution: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def stage_name(index: int, method: str) -> str:
    return f"{index + 1:02d}-{method}"


class PluginFailure(PocketError):
    """A plugin hook raised (anything, ``SystemExit`` and ``KeyboardInterrupt`` included)."""


def plugin_failure(exc: BaseException, where: str, plugin: str, version: str | None) -> PluginFailure:
    if isinstance(exc, SystemExit):
        cause = f"called sys.exit({exc.code!r})"
    elif isinstance(exc, KeyboardInterrupt):
        cause = "was interrupted"
    else:
        cause = f"raised {type(exc).__name__}: {exc}"
    return PluginFailure(f"{where}: plugin {plugin} {version or '(no version)'} {cause}",
                         fix="the run folder keeps every finished stage: fix the cause and continue "
                         "with --resume (report a fault in the plugin to its authors)",
                         exit_code=130 if isinstance(exc, KeyboardInterrupt) else 1)


class Run:
    """One execution of a recipe into ``run_dir``: :meth:`execute` runs it all. Its steps are
    public for commands and programs that need one alone (``pocketlm eval``, ``pocketlm
    export``): :meth:`load`, :meth:`evaluate` and :meth:`export`."""

    def __init__(self, recipe: Recipe, run_dir: Path, plugins, *, resume: bool = False,
                 overwrite: bool = False, progress: Progress | None = None,
                 echo: Callable[[str], None] = print, owns_folder: bool = True):
        self.recipe, self.run_dir, self.plugins = recipe, Path(run_dir), plugins
        self.final_dir = self.run_dir  # where the run ends up; --overwrite builds elsewhere first
        # False for `pocketlm eval` / `export`, which use a Run's helpers but own no run folder
        self.owns_folder = owns_folder
        self.resume, self.overwrite = resume, overwrite
        self.resume_note: str | None = None          # what changed in the recipe since the run started
        self.progress = progress or Progress()
        self.echo = echo
        self.resolved = recipe.resolved()
        self.resolved["_base"] = str(recipe.base)
        self.device: torch.device | None = None      # resolved when the run starts
        self.writer = True                           # rank 0 (or the only process) writes
        self.exporter = None                         # the exporter that wrote the export, once it has

    # ---------------------------------------------------------------- helpers

    def log(self, message: str) -> None:
        if not self.writer:                # another process than rank 0 of a data-parallel run
            return
        if self.owns_folder:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.run_dir / "run.log", "a", encoding="utf-8") as handle:
                handle.write(f"{time.strftime('%H:%M:%S')} {message}\n")
        self.echo(message)

    @contextlib.contextmanager
    def _guard(self, where: str, table: str | None = None, name: str | None = None):
        """Turn anything a plugin raises into a message naming the plugin, its version and ``where``."""
        try:
            yield
        except PocketError:
            raise
        except BaseException as exc:  # noqa: BLE001 - SystemExit and KeyboardInterrupt included
            owner = self.plugins.owner.get((table, name)) if table else None
            info = self.plugins.info(owner) if owner else None
            plugin = (info.distribution or info.name) if info else (owner or "unknown")
            raise plugin_failure(exc, where, plugin, info.version if info else None) from exc

    def _loader_name(self, source: str) -> str | None:
        return next((loader.name for loader in self.plugins.loaders if loader.matches(source)), None)

    def export_target(self) -> Path | None:
        """The recipe's export folder for this run (checked against the ownership rule)."""
        return rundir.recipe_export_path(self.recipe, self.final_dir if self.owns_folder else None)

    def _shown(self, path: Path) -> Path:
        """``path`` as it will be once an ``--overwrite`` build is swapped into place."""
        try:
            return self.final_dir / Path(path).relative_to(self.run_dir)
        except ValueError:
            return Path(path)

    def _provenance(self) -> dict:
        calibration = resolve_text(self.recipe.file.calibration.text, self.recipe.base)
        texts = {"calibration": {"path": str(calibration), "sha256": sha256(calibration)}}
        perplexity = self.recipe.evaluators.get("perplexity")
        if perplexity is not None:
            evaluation = resolve_text(perplexity.text, self.recipe.base)
            texts["evaluation"] = {"path": str(evaluation), "sha256": sha256(evaluation)}
        return {
            "core": __version__, "torch": torch.__version__, "transformers": _version_of("transformers"),
            "python": platform.python_version(),
            "plugins": {i.distribution or i.name: i.version for i in self.plugins.infos if not i.builtin},
            "data": texts,
        }

    def _fingerprint(self) -> str:
        stable = {k: v for k, v in self.resolved.items() if k != "_base"}
        return hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()

    def _holds_work(self) -> bool:
        """Whether the folder holds anything a rerun would lose: an evaluation, a stage, an export."""
        return any((self.run_dir / name).exists() for name in OUTPUTS if name != "stages") \
            or any((self.run_dir / "stages").glob("*/stage.json"))

    def _prepare_folder(self) -> None:
        resolved_path = self.run_dir / RESOLVED
        # A run that stopped before finishing anything (a model that failed to load, a Ctrl-C
        # during the first stage) left nothing to lose: a plain rerun starts it over.
        overwrite = (self.overwrite and not self._holds_work()) or (
            not self.resume and resolved_path.exists() and not self._holds_work())
        if resolved_path.exists():
            previous = json.loads(resolved_path.read_text())
            if self.resume:
                if previous.get("fingerprint") == self._fingerprint():
                    return
                self._resume_changed(previous.get("recipe", {}))
            elif not overwrite:
                raise PocketError(f"the run folder {self.run_dir} already holds a run",
                                  fix="pass --resume to continue it, --overwrite to replace it, "
                                  "or --run-dir to choose another folder")
        if overwrite and self.run_dir.exists():
            for child in (*OUTPUTS, "run.log"):
                target = self.run_dir / child
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        atomic.write_json(resolved_path, {"recipe": {k: v for k, v in self.resolved.items() if k != "_base"},
                                          "fingerprint": self._fingerprint(),
                                          "provenance": self._provenance()})

    def _resume_changed(self, previous: dict) -> None:
        """Resume although the recipe changed, when only what is written after the stages did (new
        export options, or an exporter upgraded with a new option's default): the finished stages
        stand, and the export is written again at the end, as every resumed run writes it.
        Anything else is a different recipe: one clear error naming the sections that differ."""
        current = json.loads(json.dumps({k: v for k, v in self.resolved.items() if k != "_base"}, default=str))
        if isinstance(previous.get("calibration"), dict):   # a core that added a [calibration] option since
            previous = {**previous, "calibration": {**CalibrationSection().model_dump(mode="json"),
                                                    **previous["calibration"]}}
        changed = {key for key in set(previous) | set(current) if previous.get(key) != current.get(key)}
        if not changed:   # the same recipe, resolved by an older core
            return
        if not changed <= RESUMABLE_CHANGES:
            named = ", ".join(f"[{key}]" if key != "stages" else "[[stages]]" for key in sorted(changed))
            raise PocketError(f"the run folder {self.run_dir} was made by a different recipe (its {named} differ)",
                              field="--resume",
                              fix="resume with the recipe that started the run, or pass --overwrite to start over")
        self.resume_note = (f"the recipe's {', '.join(f'[{key}]' for key in sorted(changed))} changed since the run "
                            "started: the finished stages are kept, the export is written with the new settings")

    def _context(self, tokenizer, stage_dir: Path | None = None, export_path: Path | None = None,
                 model=None) -> Context:
        calibration = self.recipe.file.calibration
        return Context(
            tokenizer=tokenizer, plugins=self.plugins,
            calibration=CalibrationSpec(resolve_text(calibration.text, self.recipe.base), calibration.samples,
                                        calibration.seq_len, calibration.seed, calibration.batch_size,
                                        around=self._encoder_specials(model, tokenizer),
                                        generated=calibration.generated,
                                        generated_temperature=calibration.generated_temperature),
            run_dir=self.run_dir, stage_dir=stage_dir, seed=calibration.seed, recipe=self.resolved,
            recipe_folder=self.recipe.base,
            progress=self.progress, logger=self.log, teacher_factory=self._load_teacher,
            model_loader=self.load, export_path=export_path, device=self.device,
            offload=self.recipe.file.model.offload)

    def _encoder_specials(self, model, tokenizer) -> tuple[int, int] | None:
        """An encoder's ``[CLS]`` and ``[SEP]`` ids: calibration windows carry them as its inputs do."""
        if model is None or tokenizer is None or not is_encoder(model, self.plugins.architectures):
            return None
        first, last = getattr(tokenizer, "cls_token_id", None), getattr(tokenizer, "sep_token_id", None)
        return None if first is None or last is None else (int(first), int(last))

    def load(self, source: str, *, stream: bool = False) -> LoadedModel:
        """Load the model ``source`` names (a folder, a file, a run's stage folder, ``demo:NAME``)
        with the recipe's ``[model]`` options, through the loaders, placed where ``[model]
        device`` and ``offload`` say once the run has started. ``stream``: what follows reads
        the model a decoder layer at a time (an exporter that ``streams``), so a stage
        checkpoint loads as ``offload = "disk"`` loads it, its layers read only when reached,
        whatever the recipe's offload (the model is the same; the recipe is left as it is). A
        plain source the built-in loaders read (a transformers folder of safetensors, ``demo:``,
        a ``.gguf`` file) streams too, as ``offload = "disk"`` streams it, into the same export
        files as the whole model's; one that cannot stream (pickle weights, an architecture whose
        shell the disk path cannot build) loads whole, as it did."""
        source = self._beside_recipe(source)
        options = self.recipe.file.model
        plain = stream and self._streams_plain(source)
        if (stream and is_checkpoint(Path(source).expanduser())) or plain:
            options = options.model_copy(update={"offload": "disk"})
        with self._guard(f"loading {source}", "loaders", self._loader_name(source)):
            try:
                loaded = self.plugins.hook.load_model(source=source, options=options, context=self._context(None))
            except streaming.NotStreamable:
                if not plain:
                    raise
                loaded = self.plugins.hook.load_model(source=source, options=self.recipe.file.model,
                                                      context=self._context(None))
        if plain and loaded is not None and streaming.is_streamed(loaded.model):
            # the export is written in the whole model's shards, so its files are the same
            streaming.stream_of(loaded.model).shard_per_part = False
        if loaded is not None and self.device is not None:
            loaded = dataclasses.replace(loaded, model=self._place(loaded.model))
        return loaded

    def _beside_recipe(self, source: str) -> str:
        """A relative local source that exists in the recipe's folder (a stage's ``teacher``) is
        taken from there, as ``[model] source`` and ``[calibration] text`` are; any other source
        is left as given."""
        if self.recipe.path is None or self.recipe.base.resolve() == Path.cwd().resolve():
            return source  # the same file either way: the source stays as the user wrote it
        local = rundir.local_source(source, self.recipe.base)
        if local is None or Path(source).expanduser().is_absolute() or not local.exists():
            return source
        return str(Path(os.path.normpath(local.absolute())))

    def _streams_plain(self, source: str) -> bool:
        """Whether ``Run.load(source, stream=True)`` streams ``source`` as a plain model: a
        source of the built-in folder, demo or GGUF loaders that is not a stage checkpoint, and a
        recipe that does not already choose disk offload (then the recipe's own load applies).
        A streamed stage checkpoint streams whatever the options, in its own shards."""
        folder = Path(source).expanduser()
        if self.recipe.file.model.offload == "disk" or is_checkpoint(folder) or is_streamed_checkpoint(folder):
            return False
        return self._loader_name(source) in ("hf", "demo", "gguf")

    def _load_source(self, source: str) -> LoadedModel:
        """The old name of :meth:`load`."""
        return self.load(source)

    def _place(self, model):
        """Check that the model's largest layer (or, without offload, the model) fits the device,
        then put it where ``[model] device`` and ``offload`` say."""
        section = self.recipe.file.model
        if streaming.is_streamed(model):  # layers are read from disk one at a time (streaming checks memory)
            return model
        offload = "none" if section.offload == "auto" else section.offload  # auto chose to keep it in memory
        try:
            layers = calibration.decoder_layers(model, self._context(None).architecture(model))
        except PocketError:
            layers = torch.nn.ModuleList()         # no registered architecture: nothing to walk
        devices.check_fits(model, layers, self.device, offload)
        return devices.place(model, self.device, offload)

    def _start(self) -> None:
        """Resolve the device (a missing CUDA device fails here, before any work) and join the
        process group when a launcher started several processes."""
        self.device = devices.resolve_device(self.recipe.file.model.device)
        if distributed.launched() and self.recipe.file.model.device == "auto" and self.device.type == "cuda":
            self.device = torch.device("cuda", distributed.local_rank())
        distributed.init_from_environment(self.device)
        self.writer = distributed.is_writer()

    def _load_teacher(self):
        return self.load(self.recipe.file.model.source).model

    def evaluate(self, model, tokenizer, metrics: list[str], export_path: Path | None = None,
                 when: str = "evaluation") -> dict[str, float]:
        """The ``metrics`` (evaluator names) of ``model``, with the recipe's options for each (an
        evaluator's defaults where the recipe has none). ``export_path``: the model's files on
        disk, for metrics that measure them (``size``); ``when`` names the step in an error."""
        context = self._context(tokenizer, export_path=export_path)
        results: dict[str, float] = {}
        for metric in metrics:
            evaluator = self.plugins.evaluators[metric]
            with self._guard(f"{when} ({metric})", "evaluators", metric):
                options = self.recipe.evaluators.get(metric) or evaluator.options()  # a default metric
                results.update(self.plugins.hook.evaluate(model=model, evaluator=evaluator,
                                                          options=options, context=context))
        return results

    def _evaluate(self, model, tokenizer, metrics: list[str], export_path: Path | None = None,
                  when: str = "evaluation") -> dict[str, float]:
        """The old name of :meth:`evaluate`."""
        return self.evaluate(model, tokenizer, metrics, export_path, when)

    def _finished_stages(self) -> int:
        """How many stages have a complete checkpoint whose files match their recorded sha256
        (stage folders appear only when done). A damaged stage is named in the log, and the run
        resumes from the stage before it."""
        done = 0
        for index, stage in enumerate(self.recipe.stages):
            folder = self.run_dir / "stages" / stage_name(index, stage.method)
            if not (folder / "stage.json").is_file():
                break
            problem = rundir.checksum_problem(folder)
            if problem is not None:
                self.log(f"warning: stage {index + 1} ({stage.method}) cannot be trusted: {problem}; "
                         f"recomputing from stage {index + 1}")
                break
            done = index + 1
        return done

    # ---------------------------------------------------------------- run

    def execute(self) -> dict:
        """Run the recipe under the folder's lock; see :mod:`pocketlm.rundir` for the rules."""
        self._start()  # a missing CUDA device fails here, before any work
        if not self.writer:  # rank > 0 of a data-parallel run: its share of the work, no files
            return self._execute()
        rundir.check_run_folder(self.final_dir)
        self.export_target()  # refuse a dangerous export path before loading anything
        with rundir.locked(self.final_dir) as (lock,):
            if lock.taken_over:
                self.log(f"taking over the lock of {lock.taken_over}, which ended without releasing it")
            rundir.remove_leftovers(self.final_dir)
            rundir.write_marker(self.final_dir, rundir.RUN_MARKER)
            if not (self.overwrite and self._holds_work()):
                self._prepare_folder()
                return self._execute()
            # --overwrite over finished work: build beside the old run, swap only on success
            build = rundir.overwrite_build(self.final_dir)
            build.mkdir()
            rundir.write_marker(build, rundir.RUN_MARKER)
            with rundir.locked(build):
                self.run_dir = build
                try:
                    self._prepare_folder()
                    report = self._execute()
                    rundir.swap_into_place(build, self.final_dir)
                except BaseException:
                    shutil.rmtree(build, ignore_errors=True)  # the old run stays as it was
                    raise
                finally:
                    self.run_dir = self.final_dir
            return report

    def _default_metrics(self, model) -> list[str]:
        """The recipe's metrics; when it names none and the model is an encoder, the encoder
        defaults (an encoder has no next-token distribution, so no perplexity)."""
        evaluate = self.recipe.file.evaluate
        if "metrics" in evaluate.model_fields_set or not is_encoder(model, self.plugins.architectures):
            return evaluate.metrics
        return list(ENCODER_METRICS)

    def _execute(self) -> dict:
        distributed.barrier()  # every process starts once rank 0 has prepared the folder
        evaluate = self.recipe.file.evaluate
        loaded = self.load(self.recipe.file.model.source)
        model, tokenizer = loaded.model, loaded.tokenizer
        self._record_revision(loaded)
        if streaming.is_streamed(model):
            self.log(f"offload disk: {len(streaming.stream_of(model))} decoder layers stream from "
                     f"{self.recipe.file.model.source}, one at a time")

        metrics = self._default_metrics(model)
        before_path = self.run_dir / "eval-before.json"
        if evaluate.before and metrics and self.writer:
            if before_path.exists():
                before = json.loads(before_path.read_text())
            else:
                self.log("evaluating the model before compression")
                before = self.evaluate(model, tokenizer, metrics, when="evaluation before the stages")
                atomic.write_json(before_path, before)
        else:
            before = {}

        records: list[StageRecord] = []
        if self.resume_note:
            self.log(self.resume_note)
        finished = self._finished_stages() if self.resume else 0
        if finished:
            last = self.recipe.stages[finished - 1]
            folder = self.run_dir / "stages" / stage_name(finished - 1, last.method)
            self.log(f"resuming after stage {finished} ({last.method}) from {folder}")
            model = self._place(load_checkpoint(folder).model)
            for index in range(finished):
                stage = self.recipe.stages[index]
                saved = json.loads((self.run_dir / "stages" / stage_name(index, stage.method) / "stage.json").read_text())
                records.append(StageRecord(**saved))

        for index in range(finished, len(self.recipe.stages)):
            model = self._run_stage(index, model, tokenizer, records)

        # The stages were the data-parallel part. From here rank 0 alone exports and evaluates,
        # as a single process: libraries it calls (transformers' loading) must not wait on peers.
        distributed.finish()
        if not self.writer:                  # rank 0 reports; the others return nothing
            return {}
        export_path = None
        if self.recipe.file.export is not None:
            export_path = self.export(model, tokenizer)

        self.log("evaluating the compressed model")
        after = self.evaluate(model, tokenizer, metrics, export_path,
                               when="evaluation after the stages") if metrics else {}
        self.model, self.tokenizer = model, tokenizer  # for the Python API (pocketlm.run)
        report = {
            "recipe": str(self.recipe.path) if self.recipe.path else None,
            "model": self.recipe.file.model.source,
            "run_dir": str(self.final_dir),
            "export": str(self._shown(export_path)) if export_path else None,
            "export_format": self.exporter.name if export_path else None,  # what format = "auto" chose
            "before": before, "after": after,
            "stages": [r.__dict__ for r in records],
        }
        atomic.write_json(self.run_dir / "report.json", report)
        atomic.write_text(self.run_dir / "report.md", render_report(report))
        if export_path is not None:
            self._write_card(export_path, report)
        return report

    def _record_revision(self, loaded) -> None:
        """Put the commit a versioned source resolved to (a Hub model's hash) into the provenance."""
        if getattr(loaded, "revision", None) is None:
            return
        path = self.run_dir / RESOLVED
        resolved = json.loads(path.read_text())
        resolved["provenance"]["source"] = {"id": loaded.source, "revision": self.recipe.file.model.revision,
                                            "commit": loaded.revision}
        atomic.write_json(path, resolved)

    def _write_card(self, export_path: Path, report: dict) -> None:
        """The export's README.md: Hub card metadata, the measured table, recipe, versions."""
        from .card import render_card

        resolved = json.loads((self.run_dir / RESOLVED).read_text())
        card = render_card(report, resolved["recipe"], resolved.get("provenance", {}), report_rows(report),
                           self.exporter.library, self.exporter.name)
        atomic.write_text(export_path / "README.md", card)

    def _run_stage(self, index: int, model, tokenizer, records: list[StageRecord]):
        stage = self.recipe.stages[index]
        method = self.plugins.methods[stage.method]
        name = stage_name(index, stage.method)
        work = self.run_dir / "stages" / (name + ".work")
        work.mkdir(parents=True, exist_ok=True)     # every process may keep scratch state
        self.log(f"stage {index + 1}/{len(self.recipe.stages)}: {stage.method}")
        torch.manual_seed(self.recipe.file.calibration.seed + index)
        if method.needs_calibration:
            check_context_length(model, self.recipe.file.calibration.seq_len, "calibration.seq_len")
        context = self._context(tokenizer, stage_dir=work, model=model)
        stream = streaming.stream_of(model)
        folder = self.run_dir / "stages" / name
        if stream is not None:  # layers go to the stage folder one shard at a time as they finish
            stream.begin_stage(folder, work)
            if self.resume:
                stream.prepare_resume()
        start = time.perf_counter()
        where = f"stage {index + 1} ({stage.method})"
        with self._guard(where, "methods", stage.method):
            result = self.plugins.hook.compress(model=model, method=method, options=stage.options, context=context)
        seconds = time.perf_counter() - start
        model = result if result is not None else model
        model.eval()
        if not self.writer:
            return model
        metrics = self.evaluate(model, tokenizer, self.recipe.file.evaluate.per_stage, when=f"evaluation after {where}")
        record = StageRecord(index, stage.method, seconds, _peak_rss_mb(), metrics)
        try:
            if stream is not None:  # the layer shards are in place already
                save_rest(model, tokenizer, folder)
                atomic.write_json(folder / "stage.json", record.__dict__)  # the stage is finished
                stream.end_stage(folder)
                rundir.write_checksums(folder)  # a kill before this leaves a stage --resume recomputes
            else:
                with atomic.folder(folder) as tmp:
                    save_checkpoint(model, tokenizer, tmp)
                    atomic.write_json(tmp / "stage.json", record.__dict__)
                    rundir.write_checksums(tmp)  # last: covers every file the checkpoint holds
        except Exception as exc:  # noqa: BLE001 - safetensors reports a full disk as its own error type
            raise PocketError(f"{where}: cannot write its checkpoint in {self._shown(self.run_dir / 'stages')}: "
                              f"{getattr(exc, 'strerror', None) or exc}",
                              fix="free space or make the folder writable, then continue with --resume",
                              exit_code=1) from exc
        records.append(record)
        with contextlib.suppress(OSError):   # an empty scratch folder goes; what a method left there stays
            work.rmdir()
        self.log(f"stage {index + 1} ({stage.method}) finished in {seconds:.1f} s")
        return model

    def _choose_exporter(self, model):
        """For ``format = "auto"``: the exporter that can represent what the stages produced,
        packs the most of it, and whose check accepts this model (``hf`` when none packs)."""
        features = {f for stage in self.recipe.stages
                    for f in self.plugins.methods[stage.method].effect(stage.options).features}
        for exporter in rank_exporters(self.plugins.exporters, features):
            if streaming.is_streamed(model) and not exporter.streams:
                continue
            options = exporter.options()
            if not exporter.problems(model, options, self._context(None)):
                return exporter, options
        raise PocketError("no installed export format can write this model", field="export.format",
                          fix="install an exporter plugin, or change the stages")

    def export(self, model, tokenizer) -> Path:
        """Write ``model`` as the recipe's ``[export]`` says (``format = "auto"``: the format that
        represents what the stages produced, packs the most of it and accepts the model) into
        its ``path``, atomically; returns the path. ``self.exporter`` is the exporter that wrote it."""
        section = self.recipe.file.export
        if section.format == "auto":
            exporter, export_options = self._choose_exporter(model)
            self.log(f"export format auto: chose {exporter.name!r}")
        else:
            exporter, export_options = self.plugins.exporters[section.format], self.recipe.export_options
        target = rundir.check_export_path(section.path, self.run_dir if self.owns_folder else None,
                                          self.recipe.file.model.source, self.recipe.base)
        if streaming.is_streamed(model) and not exporter.streams:
            streams = sorted(e.name for e in self.plugins.exporters.values() if e.streams)
            raise PocketError(f"export format {exporter.name!r} cannot write a model streamed from disk "
                              "(offload = \"disk\"): it needs the whole model in memory",
                              field="export.format", fix=f"export with {' or '.join(map(repr, streams))} (written layer "
                              "by layer), or set offload = \"none\" in [model] if the model fits in memory")
        if exporter.check is not None:
            with self._guard(f"export ({exporter.name}) check", "exporters", exporter.name):
                problems = exporter.problems(model, export_options, self._context(tokenizer))
            if problems:
                raise PocketError(f"export format {exporter.name!r} cannot write this model: " + "; ".join(problems),
                                  field="export.format", fix="choose another format, or change the stages")
        self.log(f"exporting ({exporter.name}) to {self._shown(target)}")
        rundir.remove_export_leftovers(target)
        with atomic.folder(target) as tmp, self.progress.task(f"export ({exporter.name})", None):
            rundir.write_marker(tmp, rundir.EXPORT_MARKER)  # first, so an unfinished copy is known as ours
            with self._guard(f"export ({exporter.name})", "exporters", exporter.name):
                self.plugins.hook.export(model=model, exporter=exporter, options=export_options, path=tmp,
                                         context=self._context(tokenizer, export_path=target))
        self.exporter = exporter  # the card and the report name what wrote the files (format "auto" chose it here)
        return target

    def _export(self, model, tokenizer) -> Path:
        """The old name of :meth:`export`."""
        return self.export(model, tokenizer)


#: What an encoder is measured by when the recipe names no metrics.
ENCODER_METRICS = ("embedding-fidelity", "retrieval", "size")


# --------------------------------------------------------------------------- report

_COLUMNS = [("perplexity", "perplexity", "{:.2f}"), ("size_mb", "size (MB)", "{:.1f}"),
            ("bits_per_weight", "bits/weight", "{:.2f}"), ("parameters", "parameters", "{:,.0f}"),
            ("sparsity", "sparsity", "{:.1%}"), ("kl_divergence", "KL divergence", "{:.4f}"),
            ("top1_agreement", "top-1 agreement", "{:.1%}"), ("embedding_fidelity", "embedding cosine", "{:.4f}"),
            ("recall_at_1", "recall@1", "{:.1%}"), ("mrr_at_10", "MRR@10", "{:.3f}"),
            ("sentences_per_s_batch1", "sentences/s (batch 1)", "{:.1f}"),
            ("sentences_per_s_batch32", "sentences/s (batch 32)", "{:.1f}")]


def _columns(report: dict) -> list[tuple[str, str, str]]:
    """The known columns, then every namespaced metric a plugin reports (``task:acc``)."""
    everything = [report["before"], report["after"]] + [s["metrics"] for s in report["stages"]]
    named = [c for c in _COLUMNS if any(c[0] in m for m in everything)]
    spaced = sorted({k for m in everything for k in m if ":" in k})
    return named + [(k, k, "{:.4g}") for k in spaced]


def _cell(metrics: dict, key: str, fmt: str) -> str:
    value = metrics.get(key)
    return "-" if value is None else fmt.format(value)


def report_rows(report: dict) -> list[tuple[str, ...]]:
    keys = _columns(report)
    rows = [("", *[c[1] for c in keys])]
    if report["before"]:
        rows.append(("before", *[_cell(report["before"], k, f) for k, _, f in keys]))
    for stage in report["stages"]:
        rows.append((f"after {stage['index'] + 1}: {stage['method']}", *[_cell(stage["metrics"], k, f) for k, _, f in keys]))
    rows.append(("after", *[_cell(report["after"], k, f) for k, _, f in keys]))
    return rows


def render_report(report: dict) -> str:
    rows = report_rows(report)
    lines = [f"# pocketlm report: {report['model']}", ""]
    lines.append("| " + " | ".join(rows[0]) + " |")
    lines.append("|" + "---|" * len(rows[0]))
    for row in rows[1:]:
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "| stage | method | seconds | peak RSS (MB) |", "|---|---|---|---|"]
    for stage in report["stages"]:
        lines.append(f"| {stage['index'] + 1} | {stage['method']} | {stage['seconds']:.1f} | {stage['peak_rss_mb']:.0f} |")
    if report.get("export"):
        lines += ["", f"Export: `{report['export']}`"]
    return "\n".join(lines) + "\n"
