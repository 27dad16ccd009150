"""Hub sources, offline: a Hugging Face cache folder filled by the test (the layout
huggingface_hub reads: refs/<branch or tag> -> commit, snapshots/<commit>/files), never the
network."""

import json
import shutil
from pathlib import Path

import pytest

import pocketlm
from pocketlm.hub import is_hub_id, resolve
from pocketlm.pipeline import Run
from pocketlm.recipe import parse_recipe

MAIN = "a" * 40
TAGGED = "b" * 40


@pytest.fixture
def hub_cache(tiny_folder, tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hub"
    repo = cache / "models--tiny-org--tiny-llama"
    for commit in (MAIN, TAGGED):
        shutil.copytree(tiny_folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v1").write_text(TAGGED)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_ids_are_told_from_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("HuggingFaceTB/SmolLM2-135M") and is_hub_id("org/name.v2")
    assert not is_hub_id("model.gguf") and not is_hub_id("demo:smollm2-135m") and not is_hub_id("a/b/c")
    (tmp_path / "local" / "model").mkdir(parents=True)
    assert not is_hub_id("local/model")  # an existing folder is a folder


def test_resolve_finds_branches_tags_and_commits_in_the_cache_offline(hub_cache):
    assert resolve("tiny-org/tiny-llama").commit == MAIN
    assert resolve("tiny-org/tiny-llama", "v1").commit == TAGGED
    snapshot = resolve("tiny-org/tiny-llama", TAGGED)
    assert snapshot.commit == TAGGED and (snapshot.folder / "config.json").is_file()


def test_a_run_from_a_hub_id_records_the_commit(hub_cache, toy_plugins, tmp_path):
    text = ('[model]\nsource = "tiny-org/tiny-llama"\nrevision = "v1"\n[calibration]\nsamples = 2\nseq_len = 32\n'
            '[[stages]]\nmethod = "toy-round"\n[evaluate]\nmetrics = []\nper_stage = []\n[export]\nformat = "hf"\n')
    Run(parse_recipe(text, toy_plugins), tmp_path / "run", toy_plugins, echo=lambda m: None).execute()
    provenance = json.loads((tmp_path / "run" / "recipe.resolved.json").read_text())["provenance"]
    assert provenance["source"] == {"id": "tiny-org/tiny-llama", "revision": "v1", "commit": TAGGED}
    card = (tmp_path / "run" / "export" / "README.md").read_text()
    assert "base_model: \"tiny-org/tiny-llama\"" in card and f"(commit `{TAGGED}`)" in card


def test_a_model_missing_from_the_cache_offline_says_how_to_fetch_it(hub_cache, toy_plugins, tmp_path):
    with pytest.raises(pocketlm.PocketError) as info:
        resolve("tiny-org/not-cached", "v2")
    message = str(info.value)
    assert "model tiny-org/not-cached at revision v2 is not in the Hugging Face cache and HF_HUB_OFFLINE is set" in message
    assert "fix: fetch it once while online: hf download tiny-org/not-cached --revision v2" in message
    assert info.value.exit_code == 1
    with pytest.raises(pocketlm.PocketError, match="no revision|not in the Hugging Face cache"):
        resolve("tiny-org/tiny-llama", "v9")


def test_the_cli_prints_the_fetch_command_and_no_traceback(hub_cache, tmp_path):
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "pocketlm.cli", "eval", "tiny-org/not-cached", "--metrics", "size"],
                            capture_output=True, text=True, cwd=tmp_path, env=os.environ.copy())
    assert result.returncode == 1
    assert "hf download tiny-org/not-cached" in result.stderr and "Traceback" not in result.stderr


def test_a_quantized_checkpoint_on_the_hub_keeps_its_grids(tiny_folder, tmp_path, monkeypatch):
    """A GPTQ checkpoint named by its Hub id goes to the loader of its format, as a local folder does."""
    pytest.importorskip("pocketlm_gptq")
    from pocketlm.pipeline import Run as _Run
    from pocketlm.plugins import get_plugins
    from pocketlm.weights import QuantizedLinear

    plugins = get_plugins()
    text = (f'[model]\nsource = "{tiny_folder}"\n[calibration]\nsamples = 2\nseq_len = 32\n'
            '[[stages]]\nmethod = "rtn"\nbits = 4\ngroup_size = 32\n[evaluate]\nmetrics = []\nper_stage = []\n'
            '[export]\nformat = "gptq"\n')
    _Run(parse_recipe(text, plugins), tmp_path / "run", plugins, echo=lambda m: None).execute()
    cache = tmp_path / "hub"
    shutil.copytree(tmp_path / "run" / "export", cache / "models--tiny-org--tiny-gptq" / "snapshots" / MAIN)
    (cache / "models--tiny-org--tiny-gptq" / "refs").mkdir()
    (cache / "models--tiny-org--tiny-gptq" / "refs" / "main").write_text(MAIN)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from pocketlm.context import Context

    loaded = plugins.hook.load_model(source="tiny-org/tiny-gptq", options=None, context=Context(plugins=plugins))
    grids = [m for m in loaded.model.modules() if isinstance(m, QuantizedLinear)]
    assert grids and all(m.bits == 4 and m.group_size == 32 for m in grids)
    assert loaded.revision == MAIN and loaded.source == "tiny-org/tiny-gptq"
