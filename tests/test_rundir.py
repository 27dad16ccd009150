"""The run-folder machinery's pieces, one at a time (pocketlm.rundir), and the runtime guards
that back the up-front checks."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from pocketlm import rundir
from pocketlm.rundir import PLAN_MARKER, write_marker
from pocketlm.errors import PocketError


def _stage_folder(tmp_path: Path) -> Path:
    """A stage folder shaped like a sharded checkpoint: many files, a subfolder, any names."""
    folder = tmp_path / "stage"
    (folder / "shards").mkdir(parents=True)
    for index in range(5):
        (folder / "shards" / f"layer-{index:03d}.safetensors").write_bytes(os.urandom(256))
    (folder / "config.json").write_text("{}")
    (folder / "stage.json").write_text("{}")
    return folder


def test_checksums_cover_every_file_of_a_stage_whatever_its_names(tmp_path):
    folder = _stage_folder(tmp_path)
    rundir.write_checksums(folder)
    recorded = json.loads((folder / rundir.CHECKSUMS).read_text())
    assert sorted(recorded) == ["config.json", *[f"shards/layer-{i:03d}.safetensors" for i in range(5)], "stage.json"]
    assert rundir.checksum_problem(folder) is None


@pytest.mark.parametrize("damage,expected", [
    ("flip", "shards/layer-003.safetensors does not match its recorded sha256"),
    ("delete", "shards/layer-003.safetensors is missing"),
    ("add", "shards/extra.safetensors was not part of the checkpoint"),
    ("manifest", f"{rundir.CHECKSUMS} is missing"),
])
def test_a_damaged_stage_folder_names_the_file(tmp_path, damage, expected):
    folder = _stage_folder(tmp_path)
    rundir.write_checksums(folder)
    shard = folder / "shards" / "layer-003.safetensors"
    if damage == "flip":
        data = bytearray(shard.read_bytes())
        data[17] ^= 0x01
        shard.write_bytes(bytes(data))
    elif damage == "delete":
        shard.unlink()
    elif damage == "add":
        (folder / "shards" / "extra.safetensors").write_bytes(b"x")
    else:
        (folder / rundir.CHECKSUMS).unlink()
    assert expected in rundir.checksum_problem(folder)


def test_a_second_lock_on_a_folder_names_the_holder_and_the_first_release_frees_it(tmp_path):
    first = rundir.RunLock(tmp_path).acquire()
    with pytest.raises(PocketError, match=f"is in use by process {os.getpid()}"):
        rundir.RunLock(tmp_path).acquire()
    first.release()
    rundir.RunLock(tmp_path).acquire().release()


def test_leftovers_are_only_pocketlm_temporary_names(tmp_path):
    run = tmp_path / "run"
    (run / "stages" / ".02-gptq.abc.tmp").mkdir(parents=True)
    (run / ".report.json.xyz.tmp").write_text("{")
    (run / ".export.old-123").mkdir()
    (run / "notes.tmp").write_text("not ours: no leading dot")
    (run / ".hidden").write_text("not ours: no temporary suffix")
    build = rundir.overwrite_build(run)
    build.mkdir()
    (build / rundir.RUN_MARKER).write_text("{}")
    removed = {p.name for p in rundir.remove_leftovers(run)}
    assert removed == {".02-gptq.abc.tmp", ".report.json.xyz.tmp", ".export.old-123", build.name}
    assert (run / "notes.tmp").exists() and (run / ".hidden").exists()


def test_export_leftovers_beside_a_user_folder_are_removed_only_when_marked(tmp_path):
    ours = tmp_path / ".export.a1.tmp"
    theirs = tmp_path / ".export.b2.tmp"
    ours.mkdir()
    theirs.mkdir()
    (ours / rundir.EXPORT_MARKER).write_text("{}")
    rundir.remove_export_leftovers(tmp_path / "export")
    assert not ours.exists() and theirs.exists()


@pytest.mark.parametrize("path,message", [
    (".", "would replace the run folder"),
    ("..", "would replace the run folder"),
    ("stages/x", "would replace the run's own stages"),
    ("run.log", "would replace the run's own run.log"),
    ("", "the export path is empty"),
])
def test_export_paths_that_overlap_the_run_are_refused(tmp_path, path, message):
    with pytest.raises(PocketError, match=message):
        rundir.check_export_path(path, tmp_path / "run", None)


def test_an_export_pocketlm_wrote_may_be_replaced_and_an_empty_folder_used(tmp_path):
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "model.safetensors").write_bytes(b"x")
    rundir.write_marker(ours, rundir.EXPORT_MARKER)
    (tmp_path / "empty").mkdir()
    assert rundir.check_export_path(str(ours), tmp_path / "run", None) == ours
    assert rundir.check_export_path(str(tmp_path / "empty"), tmp_path / "run", None) == tmp_path / "empty"


def test_a_run_folder_of_someone_elses_files_is_refused(tmp_path):
    (tmp_path / "thesis.tex").write_text("x")
    with pytest.raises(PocketError, match="holds files that pocketlm did not write"):
        rundir.check_run_folder(tmp_path)


def test_perplexity_refuses_an_empty_text_and_windows_beyond_the_context(tmp_path, tiny_folder):
    from pocketlm.builtins.evaluators import PerplexityOptions, perplexity
    from pocketlm.context import Context
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_folder)
    context = Context(tokenizer=AutoTokenizer.from_pretrained(tiny_folder), recipe={"_base": str(tmp_path)})
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(PocketError, match="holds fewer than 32 tokens, not one window"):
        perplexity(model, PerplexityOptions(text="empty.txt", seq_len=32), context)
    with pytest.raises(PocketError, match="longer than the model's context of 1024 tokens"):
        perplexity(model, PerplexityOptions(seq_len=4096), context)


def test_plan_writes_no_chosen_recipe_when_no_candidate_meets_the_retention(tmp_path, tiny_folder, toy_plugins):
    from rich.console import Console

    from pocketlm.plan_eval import evaluate_candidates
    from pocketlm.planner import DEMO_STATS, PlanBudget, candidates

    found = [c for c in candidates(toy_plugins, DEMO_STATS, PlanBudget()) if c.label.startswith("toy-round")][:1]
    console = Console(record=True, markup=False, width=200)
    plan = tmp_path / "plan"
    plan.mkdir()
    write_marker(plan, PLAN_MARKER)                  # an earlier plan's folder, with its choice
    (plan / "chosen.toml").write_text("stale")
    points = evaluate_candidates(found, str(tiny_folder), toy_plugins, plan, PlanBudget(min_retention=10.0),
                                 console)
    assert points and not (plan / "chosen.toml").exists()
    assert "warning: no candidate meets --min-retention 10.0" in console.export_text()
    evaluate_candidates(found, str(tiny_folder), toy_plugins, plan, PlanBudget(), console)
    assert (plan / "chosen.toml").read_text() == points[0]["recipe"]


def test_plan_refuses_a_folder_it_did_not_make(tmp_path, tiny_folder, toy_plugins):
    from rich.console import Console

    from pocketlm.plan_eval import evaluate_candidates
    from pocketlm.planner import DEMO_STATS, PlanBudget, candidates

    found = [c for c in candidates(toy_plugins, DEMO_STATS, PlanBudget()) if c.label.startswith("toy-round")][:1]
    folder = tmp_path / "documents"
    folder.mkdir()
    (folder / "chosen.toml").write_text("my own recipe")
    with pytest.raises(PocketError, match="holds files that pocketlm did not write") as caught:
        evaluate_candidates(found, str(tiny_folder), toy_plugins, folder, PlanBudget(), Console())
    assert caught.value.field == "--out"
    assert sorted(p.name for p in folder.iterdir()) == ["chosen.toml"]
    assert (folder / "chosen.toml").read_text() == "my own recipe"


def test_every_candidate_the_planner_proposes_is_a_valid_strict_recipe(tiny_folder):
    """Strict recipes must still accept what the installed plugins' plan() proposes."""
    from pocketlm.plugins import Plugins
    from pocketlm.planner import DEMO_STATS, PlanBudget, candidates, to_toml
    from pocketlm.recipe import parse_recipe

    plugins = Plugins()
    found = candidates(plugins, DEMO_STATS, PlanBudget())
    for candidate in found:
        parse_recipe(to_toml(candidate.recipe(str(tiny_folder), "auto")), plugins, file=candidate.label)
    from pocketlm.planner import default_recipe_text

    parse_recipe(default_recipe_text(plugins), plugins, file="<default recipe>")


def test_sys_exit_outside_any_hook_is_never_a_silent_success():
    import click
    from click.testing import CliRunner

    from pocketlm.cli import _handle_errors

    @click.command()
    @_handle_errors
    def command():
        sys.exit(0)  # model or library code that gives up

    result = CliRunner().invoke(command, [])
    assert result.exit_code == 1
    assert result.output.startswith("error: the run stopped: something called sys.exit(0)")


def test_a_full_disk_outside_any_stage_names_the_path_and_the_way_on():
    import errno

    import click
    from click.testing import CliRunner

    from pocketlm.cli import _handle_errors

    @click.command()
    @_handle_errors
    def command():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "runs/x/report.json")

    result = CliRunner().invoke(command, [])
    assert result.exit_code == 1
    assert result.output.splitlines() == ["error: No space left on device: runs/x/report.json",
                                          "  fix: free space or choose a writable folder, then continue with --resume"]
