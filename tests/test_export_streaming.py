"""``pocketlm export`` of a stage checkpoint written whole (``offload = "none"``) into an exporter
that streams: the decoder layers are read from the checkpoint one at a time, when the exporter
reaches them, and the export holds the same bytes as the export of the whole model in memory."""

import json
import shutil

import pytest
from click.testing import CliRunner

from pocketlm import streaming
from pocketlm.checkpoint import load_checkpoint
from pocketlm.cli import main
from pocketlm.pipeline import Run
from pocketlm.recipe import parse_recipe
from pocketlm.testing import export_counting_layers, file_digests
from pocketlm.testing.models import save_tiny_model
from pocketlm.weights import MASK_BUFFER

LAYERS = 3
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
metrics = []
before = false
per_stage = []
"""


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """Two whole stage checkpoints of a tiny 3-layer llama: masked (dense), then quantized."""
    from pocketlm.plugins import Plugins

    from .conftest import make_toy_plugin

    root = tmp_path_factory.mktemp("export-streaming")
    source = save_tiny_model(root / "llama", "llama", layers=LAYERS)
    plugins = Plugins(entry_points=False, extra=[("toy", make_toy_plugin())])
    Run(parse_recipe(RECIPE.format(model=source), plugins, file="recipe.toml"), root / "run", plugins,
        echo=lambda m: None).execute()
    folders = {"masked": root / "run" / "stages" / "01-toy-mask", "quantized": root / "run" / "stages" / "02-toy-round"}
    assert all((f / "model.safetensors").is_file() and not (f / "layers").exists() for f in folders.values())
    return folders


def export(stage, fmt, out, monkeypatch, *, whole=False):
    """``pocketlm export STAGE --format FMT -o OUT``; ``whole``: the model loaded whole, as
    before exporters that stream got it a layer at a time. Returns the files' sha256 and the
    materialized decoder layers counted at each layer the stream opened."""
    result, opened = export_counting_layers(stage, fmt, out, whole=whole)
    assert result.exit_code == 0, result.output
    digest = file_digests(out)
    shutil.rmtree(out)
    return digest, opened


@pytest.mark.parametrize("stage", ["masked", "quantized"])
def test_an_hf_export_of_a_whole_checkpoint_streams_and_writes_the_same_bytes(stages, stage, tmp_path, monkeypatch):
    streamed, opened = export(stages[stage], "hf", tmp_path / "out", monkeypatch)
    whole, opened_whole = export(stages[stage], "hf", tmp_path / "out", monkeypatch, whole=True)
    assert streamed == whole and "model.safetensors" in streamed
    # each layer read once, in order, and never more than that one layer in memory
    assert opened == [(index, 1) for index in range(LAYERS)]
    assert opened_whole == []


def save_tied_model(folder):
    """The tiny llama with its head tied to the token embedding (stored once)."""
    from transformers import AutoModelForCausalLM

    source = save_tiny_model(folder, "llama", layers=LAYERS)
    model = AutoModelForCausalLM.from_pretrained(source)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(source)
    return source


def test_a_tied_head_streams_into_the_same_export(tmp_path, toy_plugins, monkeypatch):
    source = save_tied_model(tmp_path / "tied")
    recipe = RECIPE.replace('[[stages]]\nmethod = "toy-mask"\nsparsity = 0.5\n', "")
    Run(parse_recipe(recipe.format(model=source), toy_plugins, file="recipe.toml"), tmp_path / "run", toy_plugins,
        echo=lambda m: None).execute()
    stage = tmp_path / "run" / "stages" / "01-toy-round"
    assert json.loads((stage / "config.json").read_text())["tie_word_embeddings"] is True
    streamed, opened = export(stage, "hf", tmp_path / "out", monkeypatch)
    whole, _ = export(stage, "hf", tmp_path / "out", monkeypatch, whole=True)
    assert streamed == whole and opened == [(index, 1) for index in range(LAYERS)]


def test_joined_shards_are_the_shards_of_the_whole_model(stages, tmp_path, monkeypatch):
    """With a shard limit below the model's size, the part files of the streamed export are
    joined into the shards the export of the whole model has: same names, index and bytes."""
    tensors = load_checkpoint(stages["quantized"]).model.state_dict()
    part = sum(t.numel() * t.element_size() for name, t in tensors.items() if name.startswith("model.layers.0."))
    monkeypatch.setattr(streaming, "MAX_SHARD_BYTES", int(2.5 * part))   # two layers to a shard
    streamed, _ = export(stages["quantized"], "hf", tmp_path / "out", monkeypatch)
    whole, _ = export(stages["quantized"], "hf", tmp_path / "out", monkeypatch, whole=True)
    assert streamed == whole
    shards = sorted(name for name in streamed if name.startswith("model-"))
    assert len(shards) >= 2 and "model.safetensors.index.json" in streamed


def test_the_streamed_checkpoint_is_the_model_load_checkpoint_builds(stages):
    import torch

    for folder in stages.values():
        whole = load_checkpoint(folder).model
        streamed = load_checkpoint(folder, stream=True).model
        stream = streaming.stream_of(streamed)
        assert stream is not None and len(stream) == LAYERS
        layers = streaming.get_module(streamed, stream.layers_path)
        assert not any(streaming.is_materialized(layer) for layer in layers)   # nothing of the layers read yet
        expected = whole.state_dict()
        with streaming.without_layers(streamed, stream.layers_path):
            rest = streamed.state_dict()
        assert all(torch.equal(rest[k], expected[k]) for k in rest)
        for index, layer in stream.each():
            prefix = f"{stream.layers_path}.{index}."
            got = layer.state_dict()
            assert sorted(prefix + k for k in got) == sorted(k for k in expected if k.startswith(prefix))
            assert all(torch.equal(v, expected[prefix + k]) and v.dtype == expected[prefix + k].dtype
                       for k, v in got.items())
            masks = {n: m._buffers[MASK_BUFFER] for n, m in layer.named_modules()
                     if m._buffers.get(MASK_BUFFER) is not None}
            want = {n[len(prefix):]: m._buffers[MASK_BUFFER] for n, m in whole.named_modules()
                    if n.startswith(prefix) and m._buffers.get(MASK_BUFFER) is not None}
            assert sorted(masks) == sorted(want) and all(torch.equal(masks[n], want[n]) for n in masks)


def _damaged(stages, tmp_path, damage):
    folder = tmp_path / "stage"
    shutil.copytree(stages["quantized"], folder)
    damage(folder)
    return folder


def _widen(config):
    """A config.json that no longer matches the weights."""
    config.write_text(json.dumps({**json.loads(config.read_text()), "hidden_size": 96}))


def _truncate(file):
    data = file.read_bytes()
    file.write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize("damage, message", [
    (lambda f: _truncate(f / "model.safetensors"),
     "the weight file {folder}/model.safetensors is truncated: it holds 101,020 bytes of the 202,040 its header "
     "announces"),
    (lambda f: (f / "masks.safetensors").unlink(), "the weight file {folder}/masks.safetensors is missing"),
    (lambda f: _widen(f / "config.json"), "RuntimeError: Error(s) in loading state_dict for LlamaForCausalLM:"),
    (lambda f: (f / "model.safetensors").write_bytes(b"\x00" * 4),
     "the weight file {folder}/model.safetensors is not a readable safetensors file"),
])
def test_a_damaged_checkpoint_gives_one_message(stages, tmp_path, monkeypatch, damage, message):
    folder = _damaged(stages, tmp_path, damage)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["export", str(folder), "--format", "hf", "-o", "out"])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert result.stdout == ""
    assert result.stderr.startswith(f"error: the checkpoint in {folder} cannot be loaded: "
                                    + message.format(folder=folder))
    assert result.stderr.endswith("\n  fix: delete this stage folder and rerun with --resume to recompute it\n")
    assert result.stderr.count("error:") == 1
    assert not (tmp_path / "out").exists()


def test_a_tensor_missing_from_a_layer_is_named_when_the_export_reaches_it(stages, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    def drop(folder):
        tensors = load_file(str(folder / "model.safetensors"))
        del tensors["model.layers.2.mlp.up_proj.storage.qweight"]
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})

    folder = _damaged(stages, tmp_path, drop)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["export", str(folder), "--format", "hf", "-o", "out"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr == (f"exporting (hf) to {tmp_path / 'out'}\nerror: model.source: the weights in {folder} lack "
                             "model.layers.2.mlp.up_proj.storage.qweight\n  fix: check that the folder is complete\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage"]     # no export, no unfinished copy of one


def test_a_whole_checkpoint_as_the_source_of_a_disk_run_streams_and_gives_the_run_of_none(stages, tmp_path):
    """``offload = "disk"`` with a whole stage checkpoint as the source: its layers stream from
    the checkpoint's files (masks included) and the run ends where ``offload = "none"`` ends."""
    import torch
    from safetensors.torch import load_file

    from pocketlm.plugins import Plugins

    from .conftest import make_toy_plugin

    plugins = Plugins(entry_points=False, extra=[("toy", make_toy_plugin())])
    recipe = RECIPE.split("[[stages]]")[0].replace("[model]\n", "[model]\noffload = \"{offload}\"\n") + \
        '[[stages]]\nmethod = "toy-round"\nbits = 4\n[evaluate]\nmetrics = ["sparsity"]\nbefore = false\n' \
        'per_stage = []\n[export]\nformat = "hf"\n'
    lines = {}
    for offload in ("none", "disk"):
        lines[offload] = []
        Run(parse_recipe(recipe.format(model=stages["masked"], offload=offload), plugins, file="recipe.toml"),
            tmp_path / offload, plugins, echo=lines[offload].append).execute()
    assert f"offload disk: {LAYERS} decoder layers stream from {stages['masked']}, one at a time" in lines["disk"]
    assert (tmp_path / "disk" / "stages" / "01-toy-round" / "layers").is_dir()
    a, b = (load_file(str(tmp_path / offload / "export" / "model.safetensors")) for offload in ("none", "disk"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    reports = [json.loads((tmp_path / offload / "report.json").read_text()) for offload in ("none", "disk")]
    assert reports[0]["after"]["sparsity"] == reports[1]["after"]["sparsity"] > 0.2   # the masks came along


def test_joined_safetensors_are_the_bytes_of_one_save(tmp_path):
    import torch

    from pocketlm.tensorfiles import join_safetensors, save_tensors

    generator = torch.Generator().manual_seed(0)
    parts = [{"a.weight": torch.randn(3, 5, generator=generator), "a.empty": torch.zeros(0, 4)},
             {"b.qweight": torch.randint(-8, 8, (7, 2), dtype=torch.int8, generator=generator),
              "b.scales": torch.randn(7, generator=generator).to(torch.bfloat16)},
             {"c.mask": torch.rand(3, 3, generator=generator) > 0.5}]
    files = []
    for number, part in enumerate(parts):
        files.append(tmp_path / f"part-{number}.safetensors")
        save_tensors(part, files[-1])
    join_safetensors(files, tmp_path / "joined.safetensors")
    save_tensors({k: v for part in parts for k, v in part.items()}, tmp_path / "whole.safetensors")
    assert (tmp_path / "joined.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()
