"""offload = "disk": layers streamed from the source files, per-layer stage shards, resume inside a
stage, streamed evaluation and hf export; the same results as the whole model in memory."""

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

from pocketlm import PocketError, streaming
from pocketlm.context import Context
from pocketlm.pipeline import Run
from pocketlm.recipe import parse_recipe
from pocketlm.testing.models import save_tiny_model, tiny_tokenizer, tiny_windows

ROOT = Path(__file__).resolve().parent.parent

RECIPE = """[model]
source = "{model}"
offload = "{offload}"
[calibration]
samples = 4
seq_len = 32
[[stages]]
method = "toy-round"
bits = 4
[evaluate]
metrics = ["perplexity", "size", "parameters"]
[evaluate.perplexity]
windows = 3
seq_len = 32
[export]
format = "hf"
"""


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _run(model, offload, plugins, run_dir, resume=False):
    recipe = parse_recipe(RECIPE.format(model=model, offload=offload), plugins, file="recipe.toml")
    return Run(recipe, run_dir, plugins, resume=resume, echo=lambda m: None).execute()


def _state(folder: Path) -> dict:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """The same tiny 3-layer llama as float32 in one file and as bfloat16 in several shards."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("stream-models")
    single = save_tiny_model(root / "f32-single", "llama", layers=3)
    model = AutoModelForCausalLM.from_pretrained(single, dtype=torch.bfloat16)
    sharded = root / "bf16-sharded"
    model.save_pretrained(sharded, max_shard_size="40KB")
    tiny_tokenizer().save_pretrained(sharded)
    assert (sharded / "model.safetensors.index.json").is_file()
    return {"f32-single": single, "bf16-sharded": sharded}


@pytest.mark.parametrize("source", ["f32-single", "bf16-sharded"])
def test_disk_gives_the_same_export_as_none_and_shards_the_stage_by_layer(sources, toy_plugins, tmp_path, source):
    none = _run(sources[source], "none", toy_plugins, tmp_path / "none")
    disk = _run(sources[source], "disk", toy_plugins, tmp_path / "disk")
    a, b = _state(tmp_path / "none" / "export"), _state(tmp_path / "disk" / "export")
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)           # identical grids, identical everything
    stage = tmp_path / "disk" / "stages" / "01-toy-round"
    assert sorted(p.name for p in (stage / "layers").iterdir()) == [f"layer-0000{i}.safetensors" for i in range(3)]
    assert (stage / "stage.json").is_file() and (stage / "rest" / "model.safetensors").is_file()
    index = json.loads((tmp_path / "disk" / "export" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 4         # one shard per layer and one for the rest
    assert "offload disk: 3 decoder layers stream from" in (tmp_path / "disk" / "run.log").read_text()
    assert "offload disk" not in (tmp_path / "none" / "run.log").read_text()
    assert disk["after"]["parameters"] == none["after"]["parameters"]
    assert disk["stages"][0]["metrics"]["size_mb"] == none["stages"][0]["metrics"]["size_mb"]
    # The streamed perplexity applies the head in vocabulary chunks: equal up to float summation order.
    assert disk["after"]["perplexity"] == pytest.approx(none["after"]["perplexity"], rel=1e-4)
    assert disk["before"]["perplexity"] == pytest.approx(none["before"]["perplexity"], rel=1e-4)


def test_the_walker_holds_at_most_one_layer_of_a_streamed_model(sources, toy_plugins):
    from tests.conftest import ToyRoundOptions, _ToyRoundHandler

    model = streaming.load_streamed(sources["bf16-sharded"], torch.float32)
    layers = model.model.layers
    assert all(p.is_meta for p in layers.parameters())            # nothing of the layers is loaded up front
    assert not model.model.embed_tokens.weight.is_meta
    seen = []

    class Counting(_ToyRoundHandler):
        def solve(self, index, layer, names):
            seen.append(sum(streaming.is_materialized(layer) for layer in layers))
            super().solve(index, layer, names)

    context = Context(plugins=toy_plugins)
    context.walk(model, Counting(ToyRoundOptions(bits=4)), windows=tiny_windows(4, 16))
    assert seen and max(seen) == 1
    assert streaming.stream_of(model).most_open == 1
    assert all(p.is_meta for p in layers.parameters())            # and each is freed after its turn


def test_closing_a_layer_frees_modules_a_method_replaced_but_still_holds(sources):
    from torch import nn

    model = streaming.load_streamed(sources["f32-single"], torch.float32)
    stream = streaming.stream_of(model)
    layer = stream.open(0)
    kept = layer.mlp.up_proj                                      # as a method's selection would
    layer.mlp.up_proj = nn.Linear(kept.in_features, kept.out_features, bias=False)
    assert not kept.weight.is_meta
    stream.close(0)
    assert kept.weight.is_meta                                    # no layer's weights outlive its turn


def test_bf16_storage_computes_in_the_recipes_dtype(sources):
    model = streaming.load_streamed(sources["bf16-sharded"], torch.float32)
    layer = streaming.stream_of(model).open(0)
    assert layer.mlp.up_proj.weight.dtype == torch.float32 and model.lm_head.weight.dtype == torch.float32


KILLED = """
import sys
sys.path.insert(0, {root!r})
from pocketlm.plugins import Plugins
from pocketlm.pipeline import Run
from pocketlm.recipe import parse_recipe
from tests.conftest import make_toy_plugin
plugins = Plugins(entry_points=False, extra=[("toy", make_toy_plugin())])
recipe = parse_recipe({recipe!r}, plugins, file="recipe.toml")
Run(recipe, {run!r}, plugins, echo=print).execute()
"""


def test_sigkill_inside_a_streamed_stage_then_resume_continues_at_the_layer(sources, toy_plugins, tmp_path):
    model = sources["bf16-sharded"]
    _run(model, "disk", toy_plugins, tmp_path / "straight")
    run = tmp_path / "killed"
    script = KILLED.format(root=str(ROOT), run=str(run),
                           recipe=RECIPE.format(model=model, offload="disk"))
    env = dict(os.environ, POCKETLM_TEST_SLOW_LAYER="2")
    process = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    layers = run / "stages" / "01-toy-round" / "layers"
    deadline = time.time() + 240
    while not (layers / "layer-00001.safetensors").exists():
        assert process.poll() is None, process.stdout.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.2)
    time.sleep(1.0)  # now in layer 2, which sleeps
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (run / "stages" / "01-toy-round" / "stage.json").exists()
    assert not list(layers.glob(".*tmp"))                      # no half-written shard is visible
    first = (layers / "layer-00000.safetensors").stat().st_mtime_ns
    _run(model, "disk", toy_plugins, run, resume=True)
    assert (layers / "layer-00000.safetensors").stat().st_mtime_ns == first   # layers 0 and 1 were not redone
    assert _digest(run / "export") == _digest(tmp_path / "straight" / "export")


def test_a_missing_or_truncated_source_shard_is_named(sources, toy_plugins, tmp_path):
    import shutil

    for damage in ("missing", "truncated"):
        folder = tmp_path / damage
        shutil.copytree(sources["bf16-sharded"], folder)
        shard = sorted(folder.glob("model-*.safetensors"))[1]
        if damage == "missing":
            shard.unlink()
        else:
            shard.write_bytes(shard.read_bytes()[:-100])
        with pytest.raises(PocketError) as error:
            _run(folder, "disk", toy_plugins, tmp_path / f"run-{damage}")
        assert shard.name in str(error.value) and damage in str(error.value)
        assert error.value.exit_code == 1


def test_not_enough_memory_for_one_layer_is_refused_before_work(sources, toy_plugins, tmp_path, monkeypatch):
    monkeypatch.setattr(streaming, "available_memory", lambda: 100_000)
    with pytest.raises(PocketError) as error:
        _run(sources["f32-single"], "disk", toy_plugins, tmp_path / "run")
    message = str(error.value)
    assert "not enough memory for one decoder layer" in message and "a layer is 0 MB in float32" in message
    assert 'dtype = "bfloat16"' in message and "100,000" not in message
    assert not (tmp_path / "run" / "stages").exists()


def test_auto_streams_only_when_the_model_is_large_for_the_memory(sources, tmp_path, monkeypatch):
    from pocketlm.builtins.loaders import load_folder
    from pocketlm.recipe import ModelSection

    size = streaming.model_float_bytes(sources["f32-single"], torch.float32)
    options = ModelSection(source=str(sources["f32-single"]), offload="auto")
    monkeypatch.setattr(streaming, "available_memory", lambda: 100 * size)
    assert not streaming.is_streamed(load_folder(str(sources["f32-single"]), options).model)
    monkeypatch.setattr(streaming, "available_memory", lambda: int(1.5 * size))
    assert streaming.is_streamed(load_folder(str(sources["f32-single"]), options).model)


def test_large_activations_wait_in_a_memmap(sources, toy_plugins, tmp_path, monkeypatch):
    monkeypatch.setattr(streaming, "ACTIVATIONS_IN_MEMORY", 0)
    parked, park = [], streaming.LayerStream.park

    def recording_park(self, hidden, index):
        result = park(self, hidden, index)
        if self.scratch is not None:
            parked.extend(f.name for f in self.scratch.glob("activations-*.bin"))
        return result

    monkeypatch.setattr(streaming.LayerStream, "park", recording_park)
    none = _run(sources["f32-single"], "none", toy_plugins, tmp_path / "none")
    _run(sources["f32-single"], "disk", toy_plugins, tmp_path / "disk")
    assert "activations-0.bin" in parked and "activations-1.bin" in parked
    # the walk's scratch (the memmaps among it) is removed once the stage has finished
    assert not (tmp_path / "disk" / "stages" / "01-toy-round.work").exists()
    a, b = _state(tmp_path / "none" / "export"), _state(tmp_path / "disk" / "export")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert none["after"]["perplexity"] > 1
