"""Reliability: pocketlm never destroys what the user did not ask to replace, runs one at a time
per folder, and ends every bad input or failure with a clear message and nothing lost.

Every case below is one row of the table in docs/reliability.md: it sets up a situation through
the CLI on a tiny model, checks the exit code and the first line of the message, and checks
that what existed before is intact (or that ``--resume`` gives the uninterrupted run's bytes).
``python -m tests.test_reliability`` prints the table.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from click.testing import CliRunner

import pocketlm
from pocketlm import Method, Options, hookimpl
from pocketlm import plugins as plugins_module
from pocketlm.cli import main

ROOT = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------- the setting

RECIPE = """[model]
source = "{model}"
[calibration]
samples = 4
seq_len = 32
[[stages]]
method = "toy-mask"
sparsity = 0.5
[[stages]]
method = "boom"
[[stages]]
method = "toy-round"
bits = 4
[evaluate]
metrics = ["perplexity", "size"]
per_stage = []
[evaluate.perplexity]
windows = 3
seq_len = 32
[export]
format = "hf"
path = {export}
"""


class BoomOptions(Options):
    pass


def boom(model, options, context):
    """A transform that does nothing, or fails the way ``POCKETLM_TEST_BOOM`` says."""
    how = os.environ.get("POCKETLM_TEST_BOOM", "")
    if how == "exit0":
        sys.exit(0)
    if how == "keyerror":
        raise KeyError("missing-key")
    if how == "interrupt":
        raise KeyboardInterrupt
    return model


def make_boom_plugin():
    module = types.ModuleType("boomer")
    module.POCKETLM_API = ">=1.0,<2"
    module.__version__ = "0.0.7"

    @hookimpl
    def register_methods(register):
        register(Method("boom", "transform", BoomOptions, boom, "test-only: fails on request"))

    module.register_methods = register_methods
    return module


def loaded_plugins():
    from .conftest import make_toy_plugin

    return plugins_module.Plugins(entry_points=False, extra=[("toy", make_toy_plugin()),
                                                             ("boomer", make_boom_plugin())])


@dataclass
class Env:
    """A case's folder (the current folder while it runs), the tiny model and a finished run."""

    tmp: Path
    model: Path
    finished: Path  # a finished run folder of RECIPE, to copy

    def recipe(self, export='"export"', name="recipe.toml", text=None, **fields) -> Path:
        body = text if text is not None else RECIPE.format(model=self.model, export=export)
        for key, value in fields.items():
            body = body.replace(key, value)
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body)
        return path

    def copy_run(self, name="run") -> Path:
        target = self.tmp / name
        shutil.copytree(self.finished, target)
        return target


def cli(*args, env: dict | None = None):
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        result = CliRunner().invoke(main, [str(a) for a in args])
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return result.exit_code, result.output


# Child processes: one thread each, like the tests (torch would start one per core).
CHILD_ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def snapshot(path: Path) -> dict:
    """Every file under ``path`` with its sha256 (what "intact" compares)."""
    path = Path(path)
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != ".pocketlm-lock"}


def export_bytes(run: Path) -> dict:
    return {k: v for k, v in snapshot(run / "export").items()}


def first_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    flagged = [line for line in lines if line.startswith(("error:", "warning:", "Error:"))]
    return (flagged or lines or [""])[0]


# --------------------------------------------------------------------------- cases
# Each returns (exit code, output, nothing lost). A case that runs more than one command
# returns the decisive command's code and output.


def case_export_into_a_user_folder(env: Env):
    user = env.tmp / "my-files"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    recipe = env.recipe(export=json.dumps(str(user)))
    code_validate, output_validate = cli("validate", recipe, "--run-dir", env.tmp / "run")
    code, output = cli("run", recipe, "--run-dir", env.tmp / "run")
    assert code_validate == 2 and "not a pocketlm export" in output_validate
    return code, output, snapshot(user) == {"notes.txt": hashlib.sha256(b"mine").hexdigest()}


def case_export_command_into_a_user_folder(env: Env):
    user = env.tmp / "my-files"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    before = snapshot(user)
    code, output = cli("export", env.model, "--format", "hf", "-o", user)
    return code, output, snapshot(user) == before


def case_export_onto_the_model_source(env: Env):
    model = env.tmp / "model"
    shutil.copytree(env.model, model)
    before = snapshot(model)
    recipe = env.recipe(export=json.dumps(str(model)), **{f'"{env.model}"': json.dumps(str(model))})
    code, output = cli("run", recipe, "--run-dir", env.tmp / "run")
    return code, output, snapshot(model) == before


def case_export_onto_a_source_that_is_an_export(env: Env):
    """Even pocketlm's own export is never replaced while it is the model being read."""
    run = env.copy_run()
    before = snapshot(run / "export")
    recipe = env.recipe(export=json.dumps(str(run / "export")), **{f'"{env.model}"': json.dumps(str(run / "export"))})
    code, output = cli("run", recipe, "--run-dir", env.tmp / "run2")
    return code, output, snapshot(run / "export") == before


def _export_over_the_run(env: Env, path: str):
    run = env.copy_run()
    before = snapshot(run)
    recipe = env.recipe(export=json.dumps(path))
    code_validate, output_validate = cli("validate", recipe, "--run-dir", run)
    assert code_validate == 2 and "export.path" in output_validate, output_validate
    code, output = cli("run", recipe, "--run-dir", run, "--overwrite")
    return code, output, snapshot(run) == before


def case_export_path_dot(env: Env):
    return _export_over_the_run(env, ".")


def case_export_path_empty(env: Env):
    return _export_over_the_run(env, "")


def case_export_path_stages(env: Env):
    return _export_over_the_run(env, "stages")


def case_export_path_parent(env: Env):
    code, output, intact = _export_over_the_run(env, "..")
    leftovers = [p for p in env.tmp.iterdir() if p.name.startswith(".")]
    return code, output, intact and not leftovers


def case_overwrite_that_fails(env: Env):
    run = env.copy_run()
    before = snapshot(run)
    code, output = cli("run", env.recipe(), "--run-dir", run, "--overwrite", env={"POCKETLM_TEST_BOOM": "keyerror"})
    beside = [p.name for p in env.tmp.iterdir() if p.name.startswith(".")]
    return code, output, snapshot(run) == before and not beside


SLOW_RUN = """
import sys
sys.path.insert(0, {root!r})
from pocketlm.pipeline import Run
from pocketlm.recipe import load_recipe
from tests.test_reliability import loaded_plugins
plugins = loaded_plugins()
Run(load_recipe({recipe!r}, plugins), {run!r}, plugins, echo=print).execute()
"""


def case_two_concurrent_runs(env: Env):
    recipe, run = env.recipe(), env.tmp / "run"
    process = subprocess.Popen([sys.executable, "-c", SLOW_RUN.format(root=str(ROOT), recipe=str(recipe), run=str(run))],
                               env=dict(CHILD_ENV, POCKETLM_TEST_SLOW_STAGE="toy-round"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while not (run / "stages" / "02-boom" / "stage.json").exists():
            assert process.poll() is None and time.time() < deadline, process.stdout.read().decode()[-2000:]
            time.sleep(0.2)
        before = snapshot(run)
        code, output = cli("run", recipe, "--run-dir", run, "--resume")
        intact = snapshot(run) == before and f"process {process.pid}" in output
    finally:
        process.kill()
        process.wait()
    return code, output, intact


LOCK_AND_DIE = """
import os, sys
sys.path.insert(0, {root!r})
from pocketlm.rundir import RunLock
RunLock({run!r}).acquire()
os.kill(os.getpid(), 9)
"""


def case_lock_left_by_a_dead_process(env: Env):
    run = env.tmp / "run"
    subprocess.run([sys.executable, "-c", LOCK_AND_DIE.format(root=str(ROOT), run=str(run))], check=False)
    assert (run / ".pocketlm-lock").read_text().startswith("process ")
    code, output = cli("run", env.recipe(), "--run-dir", run)
    assert "taking over the lock of process" in output
    return code, output, export_bytes(run) == export_bytes(env.finished)


def _fails_then_resumes(env: Env, how: str):
    run = env.tmp / "run"
    code, output = cli("run", env.recipe(), "--run-dir", run, env={"POCKETLM_TEST_BOOM": how})
    code_resume, _ = cli("run", env.recipe(), "--run-dir", run, "--resume")
    return code, output, code_resume == 0 and export_bytes(run) == export_bytes(env.finished)


def case_plugin_calls_sys_exit_0(env: Env):
    return _fails_then_resumes(env, "exit0")


def case_plugin_raises_keyerror(env: Env):
    return _fails_then_resumes(env, "keyerror")


def case_plugin_raises_keyboardinterrupt(env: Env):
    return _fails_then_resumes(env, "interrupt")


def case_relative_source_from_the_recipe_folder(env: Env):
    shutil.copytree(env.model, env.tmp / "recipes" / "model")
    recipe = env.recipe(name="recipes/recipe.toml", **{f'"{env.model}"': '"model"'})
    code, output = cli("validate", recipe, "--run-dir", env.tmp / "run")  # the current folder is env.tmp
    resolved = pocketlm.recipe.load_recipe(recipe, loaded_plugins()).file.model.source
    return code, output, Path(resolved) == (env.tmp / "recipes" / "model").absolute()


def case_missing_relative_source(env: Env):
    recipe = env.recipe(name="recipes/recipe.toml", **{f'"{env.model}"': '"no-such-model"'})
    return (*cli("validate", recipe), True)


YAML_DUPLICATE = """model:
  source: {model}
calibration:
  samples: 4
model:
  source: {model}
  allow_pickle: true
"""


def case_yaml_duplicate_keys(env: Env):
    recipe = env.recipe(name="recipe.yaml", text=YAML_DUPLICATE.format(model=env.model))
    return (*cli("validate", recipe), True)


def case_allow_pickle_yes(env: Env):
    return (*cli("validate", env.recipe(**{"[model]\n": '[model]\nallow_pickle = "yes"\n'})), True)


def case_allow_pickle_1(env: Env):
    return (*cli("validate", env.recipe(**{"[model]\n": "[model]\nallow_pickle = 1\n"})), True)


def case_trust_remote_code_on(env: Env):
    return (*cli("validate", env.recipe(**{"[model]\n": '[model]\ntrust_remote_code = "on"\n'})), True)


def case_float_for_an_integer(env: Env):
    return (*cli("validate", env.recipe(**{"samples = 4": "samples = 4.0"})), True)


def case_string_for_a_number(env: Env):
    return (*cli("validate", env.recipe(**{"bits = 4": 'bits = "4"'})), True)


def case_empty_evaluation_text(env: Env):
    (env.tmp / "empty.txt").write_text("")
    return (*cli("validate", env.recipe(**{"windows = 3": 'windows = 3\ntext = "empty.txt"'})), True)


def case_seq_len_beyond_the_context(env: Env):
    return (*cli("validate", env.recipe(**{"seq_len = 32\n[export]": "seq_len = 4096\n[export]"})), True)


def case_recipe_not_utf8(env: Env):
    recipe = env.tmp / "recipe.toml"
    recipe.write_bytes(b'[model]\nsource = "caf\xe9"\n')
    return (*cli("validate", recipe), True)


def case_empty_recipe(env: Env):
    recipe = env.tmp / "recipe.toml"
    recipe.write_text("# nothing yet\n")
    return (*cli("validate", recipe), True)


def case_unsupported_architecture(env: Env):
    model = env.tmp / "mamba"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "mamba", "max_position_embeddings": 2048}))
    return (*cli("validate", env.recipe(**{f'"{env.model}"': json.dumps(str(model))})), True)


def case_calibration_text_too_short(env: Env):
    (env.tmp / "short.txt").write_text("a few words only\n")
    return (*cli("validate", env.recipe(**{"[calibration]\n": '[calibration]\ntext = "short.txt"\n'})), True)


def case_evaluation_text_equals_calibration_text(env: Env):
    data = Path(pocketlm.__file__).parent / "data" / "wikitext-2-valid.txt"
    shutil.copy(data, env.tmp / "copy.txt")
    return (*cli("validate", env.recipe(**{"windows = 3": 'windows = 3\ntext = "copy.txt"'})), True)


@contextlib.contextmanager
def read_only_folder(path: Path):
    """A folder nobody can write to: a read-only tmpfs where we may mount (root), else chmod."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
                                 capture_output=True).returncode == 0
        if not mounted:
            pytest.skip("running as root without mount: no read-only folder can be made")
        try:
            yield path
        finally:
            subprocess.run(["umount", str(path)], check=False)
        return
    path.chmod(0o555)
    try:
        yield path
    finally:
        path.chmod(0o755)


def case_unwritable_export_path(env: Env):
    with read_only_folder(env.tmp / "locked") as folder:
        return (*cli("validate", env.recipe(export=json.dumps(str(folder / "export"))),
                     "--run-dir", env.tmp / "run"), True)


def case_read_only_run_folder(env: Env):
    with read_only_folder(env.tmp / "locked") as folder:
        code, output = cli("run", env.recipe(), "--run-dir", folder / "run")
        return code, output, not any(folder.iterdir())


def case_brackets_in_messages(env: Env):
    model = env.tmp / "pickled [model]"
    shutil.copytree(env.model, model)
    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    code, output = cli("run", env.recipe(**{f'"{env.model}"': json.dumps(str(model))}), "--run-dir", env.tmp / "run")
    return code, output, "set allow_pickle = true in [model]" in output and "pickled [model]" in output


def case_brackets_in_a_run_folder_path(env: Env):
    code, output = cli("run", env.recipe(), "--run-dir", "runs/[model] test")
    return code, output, "run folder: runs/[model] test" in output and "export: runs/[model] test/export" in output


def case_run_folder_of_user_files(env: Env):
    (env.tmp / "documents").mkdir()
    (env.tmp / "documents" / "thesis.tex").write_text("mine")
    code_validate, output_validate = cli("validate", env.recipe(), "--run-dir", "documents")
    assert code_validate == 2 and "pocketlm did not write" in output_validate
    code, output = cli("run", env.recipe(), "--run-dir", "documents", "--overwrite")
    return code, output, [p.name for p in (env.tmp / "documents").iterdir()] == ["thesis.tex"]


def case_plan_impossible_retention(env: Env):
    return (*cli("plan", "--min-retention", "2"), True)


def case_plan_negative_size(env: Env):
    return (*cli("plan", "--target-size-mb", "-5"), True)


def case_eval_windows_0(env: Env):
    return (*cli("eval", env.model, "--windows", "0"), True)


def case_eval_windows_negative(env: Env):
    return (*cli("eval", env.model, "--windows", "-5"), True)


def case_export_command_writes_only_its_folder(env: Env):
    (env.tmp / "out").mkdir()
    code, output = cli("export", env.model, "--format", "hf", "-o", env.tmp / "out" / "exported")
    return code, output, sorted(p.name for p in (env.tmp / "out").iterdir()) == ["exported"]


def case_leftover_temporary_folders(env: Env):
    run = env.copy_run()
    shutil.rmtree(run / "export")
    (run / "report.json").unlink()
    (run / ".export.k3j2h1.tmp").mkdir()
    (run / ".export.k3j2h1.tmp" / "model.safetensors").write_bytes(b"half")
    (run / ".report.json.x8y7.tmp").write_text("{")
    (run / "stages" / ".03-toy-round.q1w2.tmp").mkdir()
    code, output = cli("run", env.recipe(), "--run-dir", run, "--resume")
    leftovers = [p for p in [*run.iterdir(), *(run / "stages").iterdir()] if p.name.endswith(".tmp")]
    return code, output, not leftovers and export_bytes(run) == export_bytes(env.finished)


def case_corrupted_checkpoint(env: Env):
    run = env.copy_run()
    shutil.rmtree(run / "export")
    (run / "report.json").unlink()
    weights = run / "stages" / "03-toy-round" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    code, output = cli("run", env.recipe(), "--run-dir", run, "--resume")
    log = (run / "run.log").read_text()
    return code, output, ("03-toy-round/model.safetensors does not match its recorded sha256" in log
                          and export_bytes(run) == export_bytes(env.finished))


def case_full_disk_injected(env: Env, monkeypatch=None):
    from pocketlm import checkpoint

    run = env.tmp / "run"
    original = checkpoint.save_tensors

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[1]))

    checkpoint.save_tensors = full
    try:
        code, output = cli("run", env.recipe(), "--run-dir", run)
    finally:
        checkpoint.save_tensors = original
    nothing_partial = not (run / "stages").exists() or not any((run / "stages").glob("*/stage.json"))
    code_resume, _ = cli("run", env.recipe(), "--run-dir", run, "--resume")
    return code, output, nothing_partial and code_resume == 0 and export_bytes(run) == export_bytes(env.finished)


def case_full_disk_tmpfs(env: Env):
    """A real full disk: a 1 MiB tmpfs as the run folder (the export is larger)."""
    folder = env.tmp / "small"
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (the injected ENOSPC case covers a full disk)")
    try:
        code, output = cli("run", env.recipe(), "--run-dir", folder / "run")
        stages = folder / "run" / "stages"
        visible = sorted(p.name for p in stages.iterdir()) if stages.exists() else []
        complete = all((stages / name / "stage.json").exists() for name in visible if not name.endswith(".work"))
        leftovers = [p for p in folder.rglob("*.tmp")]
    finally:
        subprocess.run(["umount", str(folder)], check=False)
    return code, output, complete and not leftovers


KILL_AT = """
import os, sys
sys.path.insert(0, {root!r})
real_replace = os.replace
def replace(src, dst, *args, **kwargs):
    if os.path.basename(str(dst)) == {name!r}:
        os.kill(os.getpid(), 9)  # the temporary copy is written; the rename never happens
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace
from pocketlm.pipeline import Run
from pocketlm.recipe import load_recipe
from tests.test_reliability import loaded_plugins
plugins = loaded_plugins()
Run(load_recipe({recipe!r}, plugins), {run!r}, plugins, echo=print).execute()
"""


def _kill_at(env: Env, name: str):
    run = env.tmp / "run"
    recipe = env.recipe()
    killed = subprocess.run([sys.executable, "-c", KILL_AT.format(root=str(ROOT), name=name, recipe=str(recipe),
                                                                  run=str(run))], capture_output=True, env=CHILD_ENV)
    assert killed.returncode == -signal.SIGKILL, killed.stdout.decode()[-2000:] + killed.stderr.decode()[-2000:]
    code, output = cli("run", recipe, "--run-dir", run, "--resume")
    leftovers = [p for p in run.rglob("*.tmp")]
    return killed.returncode, output, (code == 0 and not leftovers and
                                       export_bytes(run) == export_bytes(env.finished))


def case_kill_writing_the_resolved_recipe(env: Env):
    return _kill_at(env, "recipe.resolved.json")


def case_kill_writing_the_first_evaluation(env: Env):
    return _kill_at(env, "eval-before.json")


def case_kill_writing_a_stage_checkpoint(env: Env):
    return _kill_at(env, "02-boom")


def case_kill_writing_the_export(env: Env):
    return _kill_at(env, "export")


def case_kill_writing_the_report(env: Env):
    return _kill_at(env, "report.json")


def case_overwrite_that_succeeds(env: Env):
    run = env.copy_run()
    recipe = env.recipe(**{"bits = 4": "bits = 8"})
    code, output = cli("run", recipe, "--run-dir", run, "--overwrite")
    resolved = json.loads((run / "recipe.resolved.json").read_text())
    beside = [p.name for p in env.tmp.iterdir() if p.name.startswith(".")]
    return code, output, resolved["recipe"]["stages"][2]["bits"] == 8 and not beside


# (case, expected exit code, a fragment of the first line of the message)
CASES: list[tuple[Callable, int, str]] = [
    (case_export_into_a_user_folder, 2, "exists and is not a pocketlm export"),
    (case_export_command_into_a_user_folder, 2, "exists and is not a pocketlm export"),
    (case_export_onto_the_model_source, 2, "overlaps the model source"),
    (case_export_onto_a_source_that_is_an_export, 2, "overlaps the model source"),
    (case_export_path_dot, 2, "would replace the run folder"),
    (case_export_path_empty, 2, "the export path is empty"),
    (case_export_path_stages, 2, "would replace the run's own stages"),
    (case_export_path_parent, 2, "would replace the run folder"),
    (case_overwrite_that_fails, 1, "stage 2 (boom): plugin boomer 0.0.7 raised KeyError"),
    (case_overwrite_that_succeeds, 0, ""),
    (case_two_concurrent_runs, 2, "is in use by process"),
    (case_lock_left_by_a_dead_process, 0, "taking over the lock of process"),
    (case_plugin_calls_sys_exit_0, 1, "stage 2 (boom): plugin boomer 0.0.7 called sys.exit(0)"),
    (case_plugin_raises_keyerror, 1, "stage 2 (boom): plugin boomer 0.0.7 raised KeyError: 'missing-key'"),
    (case_plugin_raises_keyboardinterrupt, 130, "stage 2 (boom): plugin boomer 0.0.7 was interrupted"),
    (case_relative_source_from_the_recipe_folder, 0, "valid"),
    (case_missing_relative_source, 2, "no-such-model does not exist"),
    (case_yaml_duplicate_keys, 2, "duplicate key 'model' (first at line 1)"),
    (case_allow_pickle_yes, 2, "model.allow_pickle: Input should be a valid boolean"),
    (case_allow_pickle_1, 2, "model.allow_pickle: Input should be a valid boolean"),
    (case_trust_remote_code_on, 2, "model.trust_remote_code: Input should be a valid boolean"),
    (case_float_for_an_integer, 2, "calibration.samples: Input should be a valid integer"),
    (case_string_for_a_number, 2, "stages[2].bits: Input should be a valid integer"),
    (case_empty_evaluation_text, 2, "fewer than one window"),
    (case_seq_len_beyond_the_context, 2, "longer than the model's context of 1024 tokens"),
    (case_recipe_not_utf8, 2, "recipe.toml:2: the recipe is not UTF-8 text"),
    (case_empty_recipe, 2, "the recipe is empty"),
    (case_unsupported_architecture, 2, "no architecture is registered for model type 'mamba'"),
    (case_calibration_text_too_short, 2, "fewer than the 4 windows of 32 tokens need"),
    (case_evaluation_text_equals_calibration_text, 2, "calibrates on the text it evaluates on"),
    (case_unwritable_export_path, 2, "cannot be written"),
    (case_read_only_run_folder, 2, "cannot be written"),
    (case_brackets_in_messages, 2, "holds only pickle weights"),
    (case_brackets_in_a_run_folder_path, 0, ""),
    (case_run_folder_of_user_files, 2, "holds files that pocketlm did not write"),
    (case_plan_impossible_retention, 2, "Invalid value for '--min-retention'"),
    (case_plan_negative_size, 2, "Invalid value for '--target-size-mb'"),
    (case_eval_windows_0, 2, "Invalid value for '--windows'"),
    (case_eval_windows_negative, 2, "Invalid value for '--windows'"),
    (case_export_command_writes_only_its_folder, 0, "/out/exported"),
    (case_leftover_temporary_folders, 0, ""),
    (case_corrupted_checkpoint, 0, ""),
    (case_full_disk_injected, 1, "stage 1 (toy-mask): cannot write its checkpoint"),
    (case_full_disk_tmpfs, 1, "No space left on device"),
    (case_kill_writing_the_resolved_recipe, -signal.SIGKILL, ""),
    (case_kill_writing_the_first_evaluation, -signal.SIGKILL, ""),
    (case_kill_writing_a_stage_checkpoint, -signal.SIGKILL, ""),
    (case_kill_writing_the_export, -signal.SIGKILL, ""),
    (case_kill_writing_the_report, -signal.SIGKILL, ""),
]


# --------------------------------------------------------------------------- running them


def make_finished_run(base: Path, model: Path) -> Path:
    env = Env(base, model, base / "finished")
    os.chdir(base)
    code, output = cli("run", env.recipe(), "--run-dir", env.finished)
    assert code == 0, output
    return env.finished


@pytest.fixture(scope="module")
def reliability_env(tmp_path_factory, tiny_folder):
    plugins = loaded_plugins()
    saved = plugins_module.get_plugins
    plugins_module.get_plugins = lambda refresh=False: plugins
    cwd = os.getcwd()
    try:
        base = tmp_path_factory.mktemp("reliability")
        yield tiny_folder, make_finished_run(base, tiny_folder)
    finally:
        plugins_module.get_plugins = saved
        os.chdir(cwd)


def run_case(case, model: Path, finished: Path, tmp: Path):
    tmp.mkdir(parents=True, exist_ok=True)
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        return case(Env(tmp, model, finished))
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("case,expected_code,fragment", CASES, ids=[c[0].__name__[5:] for c in CASES])
def test_reliability_case(case, expected_code, fragment, reliability_env, tmp_path):
    model, finished = reliability_env
    code, output, intact = run_case(case, model, finished, tmp_path)
    assert code == expected_code, output
    assert fragment in first_line(output), output
    assert "Traceback" not in output
    assert intact, output


def test_the_default_recipe_is_printed_with_its_section_headers(reliability_env, tmp_path, monkeypatch):
    """`pocketlm run` with no recipe prints the recipe it runs; the console must not eat `[model]`."""
    from pocketlm import planner

    model, _ = reliability_env
    text = RECIPE.format(model=model, export='"export"')
    monkeypatch.setattr(planner, "default_recipe_text", lambda plugins: text)
    monkeypatch.chdir(tmp_path)
    code, output = cli("run")
    assert code == 0, output
    assert "[model]\nsource = " in output and "[[stages]]" in output and "[evaluate.perplexity]" in output
    assert "run folder: runs/default" in output


def table(rows) -> str:
    lines = ["| case | exit code | first line of the message | nothing lost |", "|---|---|---|---|"]
    for name, code, line, intact in rows:
        shown = "killed (SIGKILL), then `--resume`" if code == -signal.SIGKILL else str(code)
        lines.append(f"| {name} | {shown} | {line.replace('|', '/') or '(success)'} | {'yes' if intact else 'NO'} |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m tests.test_reliability: print the table of docs/reliability.md
    import tempfile

    from pocketlm.testing.models import save_tiny_model

    plugins = loaded_plugins()
    plugins_module.get_plugins = lambda refresh=False: plugins
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = save_tiny_model(tmp / "tiny-llama", "llama")
        finished = make_finished_run(tmp, model)
        rows = []
        for case, expected, fragment in CASES:
            try:
                code, output, intact = run_case(case, model, finished, tmp / case.__name__)
            except pytest.skip.Exception as skipped:
                print(f"skipped {case.__name__}: {skipped}", file=sys.stderr)
                continue
            folder = tmp / case.__name__  # paths shown relative to the case's folder
            line = first_line(output).replace(str(folder.resolve()) + "/", "").replace(str(folder) + "/", "")
            line = line.replace(str(model), "MODEL")
            rows.append((case.__name__[5:].replace("_", " "), code, line, intact))
        print(table(rows))
        clear = sum(1 for _, code, _, intact in rows if code not in (0, -signal.SIGKILL) and intact)
        print(f"\n{clear} of {sum(1 for r in rows if r[1] not in (0, -signal.SIGKILL))} refusals and failures end "
              f"in a clear error with nothing lost; {sum(1 for r in rows if r[3])} of {len(rows)} cases lose nothing.")


def test_validate_refuses_a_model_folder_without_or_with_a_damaged_config(tmp_path):
    """A broken model folder is found by `validate`, before any run loads it."""
    from click.testing import CliRunner

    from pocketlm.cli import main

    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{bad json")
    for folder, message in (("empty", "is not a transformers model folder: it has no config.json"),
                            ("broken", "config.json is damaged")):
        (tmp_path / "recipe.toml").write_text(f'[model]\nsource = "{folder}"\n')
        result = CliRunner().invoke(main, ["validate", str(tmp_path / "recipe.toml")])
        assert result.exit_code == 2, result.output
        assert "recipe.toml:2: model.source:" in result.output and message in " ".join(result.output.split())
        assert "Traceback" not in result.output
