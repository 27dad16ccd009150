"""The pipeline: run folder, reports, atomic stage checkpoints, kill-and-resume, determinism."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pocketlm.pipeline import Run
from pocketlm.recipe import parse_recipe

ROOT = Path(__file__).resolve().parent.parent

RECIPE = """[model]
source = "{model}"
[calibration]
samples = 4
seq_len = 32
[[stages]]
method = "toy-mask"
sparsity = 0.5
[[stages]]
method = "toy-round"
bits = 4
[evaluate]
metrics = ["perplexity", "size", "sparsity"]
[evaluate.perplexity]
windows = 3
seq_len = 32
[export]
format = "hf"
"""


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _run(tiny_folder, plugins, run_dir, resume=False):
    recipe = parse_recipe(RECIPE.format(model=tiny_folder), plugins, file="recipe.toml")
    return Run(recipe, run_dir, plugins, resume=resume, echo=lambda m: None).execute()


def test_a_run_leaves_reports_checkpoints_and_an_export_transformers_loads(tiny_folder, toy_plugins, tmp_path):
    from transformers import AutoModelForCausalLM

    report = _run(tiny_folder, toy_plugins, tmp_path / "run")
    run = tmp_path / "run"
    for name in ("recipe.resolved.json", "report.json", "report.md", "eval-before.json", "run.log"):
        assert (run / name).is_file()
    # finished stages keep their checkpoints and drop their empty scratch folders
    assert sorted(p.name for p in (run / "stages").iterdir()) == ["01-toy-mask", "02-toy-round"]
    resolved = json.loads((run / "recipe.resolved.json").read_text())
    assert resolved["provenance"]["data"]["calibration"]["sha256"]
    assert resolved["recipe"]["stages"][1] == {"method": "toy-round", "bits": 4}
    assert report["before"]["perplexity"] > 1 and report["after"]["perplexity"] > 1
    assert abs(report["stages"][0]["metrics"]["sparsity"] - 0.5) < 0.01
    assert report["stages"][1]["metrics"]["size_mb"] < report["stages"][0]["metrics"]["size_mb"]
    assert report["after"]["size_on_disk"] == 1.0
    model = AutoModelForCausalLM.from_pretrained(run / "export")
    assert (model.model.layers[0].mlp.up_proj.weight == 0).float().mean() >= 0.5  # the mask survived quantization


def test_runs_are_deterministic(tiny_folder, toy_plugins, tmp_path):
    _run(tiny_folder, toy_plugins, tmp_path / "a")
    _run(tiny_folder, toy_plugins, tmp_path / "b")
    assert _digest(tmp_path / "a" / "export") == _digest(tmp_path / "b" / "export")


KILLED = """
import sys
sys.path.insert(0, {root!r})
from pocketlm.plugins import Plugins
from pocketlm.pipeline import Run
from pocketlm.recipe import parse_recipe
from tests.conftest import make_toy_plugin, RECIPE_FOR_KILL
plugins = Plugins(entry_points=False, extra=[("toy", make_toy_plugin())])
recipe = parse_recipe(RECIPE_FOR_KILL, plugins, file="recipe.toml")
Run(recipe, {run!r}, plugins, echo=print).execute()
"""


def test_kill_during_a_stage_then_resume_gives_the_identical_export(tiny_folder, toy_plugins, tmp_path):
    _run(tiny_folder, toy_plugins, tmp_path / "straight")
    run = tmp_path / "killed"
    env = dict(os.environ, POCKETLM_TEST_SLOW_STAGE="toy-round", POCKETLM_TEST_RECIPE=RECIPE.format(model=tiny_folder))
    process = subprocess.Popen([sys.executable, "-c", KILLED.format(root=str(ROOT), run=str(run))], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while not (run / "stages" / "01-toy-mask" / "stage.json").exists():
        assert process.poll() is None, process.stdout.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.2)
    time.sleep(1.0)  # now inside stage 2, which sleeps before working
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (run / "stages" / "02-toy-round").exists()  # no half-written checkpoint is visible
    assert not (run / "export").exists()
    report = _run(tiny_folder, toy_plugins, run, resume=True)
    assert [s["method"] for s in report["stages"]] == ["toy-mask", "toy-round"]
    assert _digest(run / "export") == _digest(tmp_path / "straight" / "export")
    assert "resuming after stage 1" in (run / "run.log").read_text()


def test_resume_refuses_a_different_recipe(tiny_folder, toy_plugins, tmp_path):
    from pocketlm.errors import PocketError

    _run(tiny_folder, toy_plugins, tmp_path / "run")
    other = parse_recipe(RECIPE.format(model=tiny_folder).replace("bits = 4", "bits = 8"), toy_plugins)
    with pytest.raises(PocketError, match=r"different recipe \(its \[\[stages\]\] differ\)"):
        Run(other, tmp_path / "run", toy_plugins, resume=True, echo=lambda m: None).execute()
    with pytest.raises(PocketError, match="already holds a run"):
        Run(other, tmp_path / "run", toy_plugins, echo=lambda m: None).execute()


def test_resume_after_only_the_export_changed_keeps_the_finished_stages(tiny_folder, toy_plugins, tmp_path):
    """An export that failed, then the exporter upgraded (a new option and its default change the
    resolved recipe) or its options edited: --resume keeps every finished stage and writes the
    export with the new settings, where it used to refuse the run as a different recipe."""
    run = tmp_path / "run"
    _run(tiny_folder, toy_plugins, run)
    stamps = {p: p.stat().st_mtime_ns for p in (run / "stages").glob("*/*") if p.is_file()}
    moved = RECIPE.format(model=tiny_folder).replace('format = "hf"', 'format = "hf"\npath = "export-2"')
    lines = []
    report = Run(parse_recipe(moved, toy_plugins, file="recipe.toml"), run, toy_plugins, resume=True,
                 echo=lines.append).execute()
    assert report["export"].endswith("export-2") and (run / "export-2" / "config.json").is_file()
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps   # no stage ran again
    said = "\n".join(lines)
    assert "the recipe's [export] changed since the run started: the finished stages are kept" in said
    assert "resuming after stage 2 (toy-round)" in said
    resolved = json.loads((run / "recipe.resolved.json").read_text())
    assert resolved["recipe"]["export"]["path"] == "export-2"   # a later --resume compares against this
    # the same weights and config; only the card (README.md) differs, as it names the export path
    weights = {name: digest for name, digest in _digest(run / "export").items() if name != "README.md"}
    assert {n: d for n, d in _digest(run / "export-2").items() if n != "README.md"} == weights


def test_a_run_that_finished_nothing_can_be_rerun_without_flags(tiny_folder, toy_plugins, tmp_path):
    """A model that fails to load leaves only the resolved recipe; fixing it and rerunning just works."""
    from pocketlm.errors import PocketError

    (tmp_path / "broken-model").mkdir()  # a config validation accepts, but no weights to load
    (tmp_path / "broken-model" / "config.json").write_text('{"model_type": "llama"}')
    broken = parse_recipe(RECIPE.format(model=tmp_path / "broken-model"), toy_plugins, file="recipe.toml")
    with pytest.raises(PocketError):
        Run(broken, tmp_path / "run", toy_plugins, echo=lambda m: None).execute()
    assert (tmp_path / "run" / "recipe.resolved.json").exists()
    report = _run(tiny_folder, toy_plugins, tmp_path / "run")
    assert [s["method"] for s in report["stages"]] == ["toy-mask", "toy-round"]
    # once a stage has finished, the folder holds work, and a plain rerun refuses again
    with pytest.raises(PocketError, match="already holds a run"):
        _run(tiny_folder, toy_plugins, tmp_path / "run")


def test_a_failing_export_leaves_no_partial_folder(tiny_folder, toy_plugins, tmp_path, monkeypatch):
    from pocketlm.builtins import export_hf

    def explode(*args, **kwargs):
        raise OSError("disk full")

    exporter = toy_plugins.exporters["hf"]
    monkeypatch.setitem(toy_plugins.exporters, "hf", type(exporter)(exporter.name, exporter.options, explode,
                                                                      exporter.represents))
    from pocketlm.errors import PocketError

    with pytest.raises(PocketError, match=r"export \(hf\): plugin pocketlm .* raised OSError: disk full"):
        _run(tiny_folder, toy_plugins, tmp_path / "run")
    assert not (tmp_path / "run" / "export").exists()
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".export")]
