"""The run folder's safety machinery: ownership, one run at a time, checksums, leftovers.

The rule: **pocketlm deletes or replaces only what it created and marked.**

* Every run folder holds the marker ``.pocketlm-run`` and every export the marker
  ``.pocketlm-export``. An existing folder without its marker is never written over: a run
  folder that holds other files, or an export path that holds anything, is refused up front
  (in ``pocketlm validate`` and before ``pocketlm run`` loads anything), naming the path.
* An export path may not overlap the run's own files (``.``, ``..``, ``stages``, the reports)
  nor the model's source.
* ``--overwrite`` builds the new run in a hidden folder beside the old one and swaps the two
  only once the new run has finished, so a failing rerun leaves the old run as it was.
* A run holds an OS lock (``fcntl.flock``) on ``.pocketlm-lock`` in its folder. A second run
  on the folder stops with the running process's id; the OS drops the lock of a dead process,
  so its successor takes it over.
* Each stage folder records the sha256 of every file in it (``pocketlm-sha256.json``, written
  last); ``--resume`` verifies them and recomputes from the first stage that does not match.
* Temporary files and folders that an interrupted write left behind (``.NAME.*.tmp``,
  ``.NAME.old-PID``, an unfinished ``--overwrite`` build) are removed by the next run in
  that folder.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Iterator

from . import __version__, atomic
from .data import sha256
from .errors import PocketError

RUN_MARKER = ".pocketlm-run"
EXPORT_MARKER = ".pocketlm-export"
PLAN_MARKER = ".pocketlm-plan"
LOCK_FILE = ".pocketlm-lock"
CHECKSUMS = "pocketlm-sha256.json"
# What a run writes at the top of its folder; an export path may not land on any of them.
RUN_FILES = ("stages", "report.json", "report.md", "eval-before.json", "recipe.resolved.json", "run.log",
             RUN_MARKER, LOCK_FILE)
# Names that atomic.py gives its temporary files and folders, and the overwrite build folder.
# ``org/name``: the form of a Hub model id (kept in step with pocketlm.hub.HUB_ID, which needs no torch)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_LEFTOVER = re.compile(r"^\..+\.(tmp|old-\d+)$")


def overwrite_build(run_dir: Path) -> Path:
    """The hidden folder beside ``run_dir`` where ``--overwrite`` builds the new run."""
    return run_dir.parent / f".{run_dir.name}.overwrite.tmp"


# --------------------------------------------------------------------------- markers


def write_marker(folder: Path, marker: str) -> None:
    atomic.write_json(Path(folder) / marker, {"pocketlm": __version__})


def is_run_folder(folder: Path) -> bool:
    """A folder pocketlm made for a run: the marker, the lock of a run killed before it wrote the
    marker, or a run folder of 0.1.3 (which had no marker)."""
    folder = Path(folder)
    return any((folder / name).is_file() for name in (RUN_MARKER, LOCK_FILE, "recipe.resolved.json"))


def is_export(folder: Path) -> bool:
    return (Path(folder) / EXPORT_MARKER).is_file()


def is_plan_folder(folder: Path) -> bool:
    """A folder ``pocketlm plan --evaluate`` made: the marker, or the Pareto table of a plan
    written before the marker existed."""
    folder = Path(folder)
    return (folder / PLAN_MARKER).is_file() or (folder / "pareto.json").is_file()


def _is_empty_folder(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


# --------------------------------------------------------------------------- path checks


def _inside(child: Path, parent: Path) -> bool:
    """``child`` is ``parent`` or below it (both resolved)."""
    return child == parent or parent in child.parents


def local_source(source: str, base: Path | None = None) -> Path | None:
    """The file or folder a model source names, or None for a scheme (``demo:NAME``)."""
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", source):
        return None
    path = Path(source).expanduser()
    full = path if path.is_absolute() or base is None else base / path
    if _HUB_ID.match(source) and not source.endswith(".gguf") and not full.exists() and not path.exists():
        return None  # ``org/name`` that names no local path: a Hub model, resolved by its loader
    return full


def export_target(path: str, run_dir: Path) -> Path:
    target = Path(path).expanduser()
    return target if target.is_absolute() else Path(run_dir) / target


def check_run_folder(run_dir: Path) -> None:
    """Refuse a run folder that exists, holds files, and was not made by pocketlm."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise PocketError(f"the run folder {run_dir} is a file", field="--run-dir",
                          fix="choose a folder with --run-dir")
    if run_dir.is_dir() and not _is_empty_folder(run_dir) and not is_run_folder(run_dir):
        raise PocketError(f"the run folder {run_dir} holds files that pocketlm did not write", field="--run-dir",
                          fix="choose an empty or new folder with --run-dir; pocketlm never writes over "
                          "a folder it did not create")
    read_only = _read_only_ancestor(run_dir)
    if read_only is not None:
        raise PocketError(f"the run folder {run_dir} cannot be written: {read_only} is read-only", field="--run-dir",
                          fix="choose a folder you can write to with --run-dir")


def claim_plan_folder(out_dir: Path) -> None:
    """Refuse a plan folder that holds files pocketlm did not write (the plan writes
    ``pareto.md``, ``pareto.json``, ``pareto.png`` and ``chosen.toml`` at its top and removes a
    stale ``chosen.toml``); else mark it as a plan's."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise PocketError(f"the plan folder {out_dir} is a file", field="--out", fix="choose a folder with --out")
    if out_dir.is_dir() and not _is_empty_folder(out_dir) and not is_plan_folder(out_dir):
        raise PocketError(f"the plan folder {out_dir} holds files that pocketlm did not write", field="--out",
                          fix="choose an empty or new folder with --out; pocketlm never writes over a folder "
                          "it did not create")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_marker(out_dir, PLAN_MARKER)


def _read_only_ancestor(path: Path) -> Path | None:
    """The nearest existing folder at or above ``path`` when it cannot be written, else None."""
    resolved = Path(path).resolve()
    existing = next(p for p in (resolved, *resolved.parents) if p.exists())
    return None if os.access(existing, os.W_OK | os.X_OK) else existing


def recipe_export_path(recipe, run_dir: Path | None) -> Path | None:
    """The export folder of ``recipe`` (a loaded :class:`pocketlm.recipe.Recipe`) for a run in
    ``run_dir`` (None: no run folder is owned), checked by :func:`check_export_path`; None when
    the recipe exports nothing."""
    section = recipe.file.export
    if section is None:
        return None
    locate = recipe.locate
    return check_export_path(section.path, run_dir, recipe.file.model.source, recipe.base,
                             file=locate.file if locate else None,
                             line=locate(("export", "path")) if locate else None)


def check_export_path(path: str, run_dir: Path | None, source: str | None, base: Path | None = None,
                      *, file: str | None = None, line: int | None = None, field: str = "export.path") -> Path:
    """The export folder for ``path``, or a :class:`PocketError` when writing there could destroy
    something: the run's own files, the model's source, a folder pocketlm did not make, or a
    place that cannot be written."""
    def refuse(message: str, fix: str) -> PocketError:
        return PocketError(message, file=file, line=line, field=field, fix=fix)

    if not str(path).strip():
        raise refuse("the export path is empty", "give a folder name, for example path = \"export\"")
    target = export_target(path, run_dir) if run_dir is not None else Path(path).expanduser()
    resolved = target.resolve()
    if run_dir is not None:
        run = Path(run_dir).resolve()
        if _inside(run, resolved):
            raise refuse(f"the export path {target} would replace the run folder {run_dir} that holds it",
                         "export into a folder of its own, for example path = \"export\"")
        if _inside(resolved, run) and resolved.relative_to(run).parts[0] in RUN_FILES:
            raise refuse(f"the export path {target} would replace the run's own "
                         f"{resolved.relative_to(run).parts[0]}",
                         "export into a folder of its own, for example path = \"export\"")
    model = local_source(source, base) if source else None
    if model is not None and (_inside(resolved, model.resolve()) or _inside(model.resolve(), resolved)):
        raise refuse(f"the export path {target} overlaps the model source {model}",
                     "export to another folder; pocketlm never writes over the model it reads")
    if target.exists() and not target.is_dir():
        raise refuse(f"the export path {target} is a file", "choose a folder that does not exist yet")
    if target.is_dir() and not _is_empty_folder(target) and not is_export(target):
        raise refuse(f"the export path {target} exists and is not a pocketlm export",
                     "choose a new folder; pocketlm replaces only exports it wrote itself")
    read_only = _read_only_ancestor(target)
    if read_only is not None:
        raise refuse(f"the export path {target} cannot be written: {read_only} is read-only",
                     "choose a folder you can write to")
    return target


# --------------------------------------------------------------------------- lock


class RunLock:
    """An exclusive ``fcntl.flock`` on ``folder/.pocketlm-lock``, held for a run's lifetime.

    The file names the holder (pid and command). The OS releases the lock when its process
    dies, whatever the cause, so a lock left by a killed run is simply taken over."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_FILE
        self.handle = None
        self.taken_over: str | None = None

    def acquire(self) -> "RunLock":
        import fcntl

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(self.path, "a+", encoding="utf-8")
        except OSError as exc:
            raise PocketError(f"cannot write to the run folder {self.path.parent}: {exc.strerror}",
                              field="--run-dir", fix="choose a folder you can write to with --run-dir") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                handle.close()
                raise
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise PocketError(f"the run folder {self.path.parent} is in use by {holder}", field="--run-dir",
                              fix="wait for that run to finish, or choose another folder with --run-dir",
                              exit_code=2) from None
        handle.seek(0)
        # A name left in the file belongs to a run that died holding the lock (release clears it).
        self.taken_over = handle.read().strip() or None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} ({' '.join(sys.argv)[:200]})\n")
        handle.flush()
        self.handle = handle
        return self

    def release(self) -> None:
        if self.handle is not None:
            self.handle.truncate(0)
            self.handle.close()  # closing drops the flock
            self.handle = None


@contextlib.contextmanager
def locked(*folders: Path) -> Iterator[list[RunLock]]:
    locks: list[RunLock] = []
    try:
        for folder in folders:
            locks.append(RunLock(folder).acquire())
        yield locks
    finally:
        for lock in reversed(locks):
            lock.release()


# --------------------------------------------------------------------------- leftovers


def remove_leftovers(run_dir: Path) -> list[Path]:
    """Delete the temporary files and folders that interrupted writes left in the run folder,
    its ``stages`` folder, and the unfinished ``--overwrite`` build beside it. Call with the
    lock held; returns what was removed."""
    run_dir = Path(run_dir)
    removed = []
    for folder in (run_dir, run_dir / "stages"):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if _LEFTOVER.match(entry.name):
                _remove(entry)
                removed.append(entry)
    beside = [overwrite_build(run_dir)] + list(run_dir.parent.glob(f".{run_dir.name}.old-*"))
    for entry in beside:  # an unfinished --overwrite build, an old run a swap did not delete
        if entry.is_dir() and _LEFTOVER.match(entry.name) and is_run_folder(entry):
            _remove(entry)
            removed.append(entry)
    return removed


def remove_export_leftovers(target: Path) -> None:
    """Unfinished exports beside ``target``: only temporary folders that carry the export marker."""
    parent = Path(target).parent
    if not parent.is_dir():
        return
    for entry in parent.glob(f".{Path(target).name}.*"):
        if _LEFTOVER.match(entry.name) and entry.is_dir() and is_export(entry):
            _remove(entry)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# --------------------------------------------------------------------------- checksums


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != CHECKSUMS)


def write_checksums(folder: Path) -> None:
    """Record the sha256 of every file in ``folder`` (any names, any count, subfolders too)."""
    folder = Path(folder)
    atomic.write_json(folder / CHECKSUMS, {p.relative_to(folder).as_posix(): sha256(p) for p in _files(folder)})


def checksum_problem(folder: Path) -> str | None:
    """Why ``folder`` does not match its recorded checksums, or None when every file does."""
    folder = Path(folder)
    manifest = folder / CHECKSUMS
    if not manifest.is_file():
        return f"{manifest} is missing"
    try:
        recorded = json.loads(manifest.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return f"{manifest} is damaged"
    present = {p.relative_to(folder).as_posix() for p in _files(folder)}
    for name, digest in sorted(recorded.items()):
        if name not in present:
            return f"{folder / name} is missing"
        if sha256(folder / name) != digest:
            return f"{folder / name} does not match its recorded sha256"
    extra = sorted(present - set(recorded))
    if extra:
        return f"{folder / extra[0]} was not part of the checkpoint"
    return None


# --------------------------------------------------------------------------- overwrite


def swap_into_place(build: Path, run_dir: Path) -> None:
    """Replace the old run folder with the finished ``build``: rename the old one aside, rename
    the build into place, then delete the old one."""
    old = run_dir.parent / f".{run_dir.name}.old-{os.getpid()}"
    if run_dir.exists():
        os.replace(run_dir, old)
    os.replace(build, run_dir)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
