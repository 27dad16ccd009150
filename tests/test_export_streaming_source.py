"""``pocketlm export`` of a plain model source (a transformers folder of safetensors, a ``.gguf``
file) into an exporter that streams: the decoder layers are read from the source files one at a
time, as ``offload = "disk"`` reads them, and the export holds the same bytes as the export of the
whole model loaded in memory. Sources the disk path cannot stream load whole, as before."""

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from pocketlm import streaming
from pocketlm.cli import main
from pocketlm.pipeline import Run
from pocketlm.testing import export_counting_layers, file_digests
from pocketlm.testing.models import save_tiny_model

LAYERS = 3


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("export-source") / "llama", "llama", layers=LAYERS)


def export(source, fmt, out, monkeypatch, *, whole=False):
    """``pocketlm export SOURCE --format FMT -o OUT``; ``whole``: the model loaded whole, as before
    plain sources streamed. Returns the files' sha256 and, at each layer the stream opened, the
    materialized decoder layers counted."""
    result, opened = export_counting_layers(source, fmt, out, whole=whole)
    assert result.exit_code == 0, result.output
    digest = file_digests(out)
    shutil.rmtree(out)
    return digest, opened


def test_an_hf_export_of_a_safetensors_folder_streams_and_writes_the_same_bytes(llama, tmp_path, monkeypatch):
    streamed, opened = export(llama, "hf", tmp_path / "out", monkeypatch)
    whole, opened_whole = export(llama, "hf", tmp_path / "out", monkeypatch, whole=True)
    assert streamed == whole and "model.safetensors" in streamed and "tokenizer.json" in streamed
    # each layer read once, in order, and never more than that one layer in memory
    assert opened == [(index, 1) for index in range(LAYERS)]
    assert opened_whole == []


def test_a_float16_folder_streams_into_the_same_float32_export(tmp_path, monkeypatch):
    """The source's storage dtype is converted to the load dtype as the whole load converts it."""
    import torch
    from transformers import AutoModelForCausalLM

    source = save_tiny_model(tmp_path / "llama", "llama", layers=LAYERS)
    AutoModelForCausalLM.from_pretrained(source, dtype=torch.float16).save_pretrained(source)
    streamed, opened = export(source, "hf", tmp_path / "out", monkeypatch)
    whole, _ = export(source, "hf", tmp_path / "out", monkeypatch, whole=True)
    assert streamed == whole and opened == [(index, 1) for index in range(LAYERS)]


def test_a_tied_head_streams_into_the_same_export(tmp_path, monkeypatch):
    from .test_export_streaming import save_tied_model

    source = save_tied_model(tmp_path / "tied")
    streamed, opened = export(source, "hf", tmp_path / "out", monkeypatch)
    whole, _ = export(source, "hf", tmp_path / "out", monkeypatch, whole=True)
    assert streamed == whole and opened == [(index, 1) for index in range(LAYERS)]


def test_a_sentence_transformers_encoder_streams_with_its_pooling(tmp_path, monkeypatch):
    """An encoder folder with sentence-transformers pooling streams too, and its export keeps the
    pooling the whole load records (config.json, modules.json)."""
    folder = save_tiny_model(tmp_path / "bert", "bert", layers=LAYERS)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    streamed, opened = export(folder, "hf", tmp_path / "out", monkeypatch)
    whole, _ = export(folder, "hf", tmp_path / "out", monkeypatch, whole=True)
    assert streamed == whole and opened == [(index, 1) for index in range(LAYERS)]
    assert "modules.json" in streamed


def test_sharded_sources_export_into_the_whole_models_shards(llama, tmp_path, monkeypatch):
    """A source in several shards, and an export above the shard limit: the streamed export's
    files are the whole model's (same shard names, index and bytes)."""
    from transformers import AutoModelForCausalLM

    source = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(llama).save_pretrained(source, max_shard_size="60KB")
    shutil.copy(llama / "tokenizer.json", source)
    shutil.copy(llama / "tokenizer_config.json", source)
    assert (source / "model.safetensors.index.json").is_file()
    layer = sum(info["data_offsets"][1] - info["data_offsets"][0]
                for name, (_, info) in streaming.SafetensorsFolder(llama).where.items() if ".layers.0." in name)
    monkeypatch.setattr(streaming, "MAX_SHARD_BYTES", int(2.5 * layer))
    streamed, opened = export(source, "hf", tmp_path / "out", monkeypatch)
    whole, _ = export(source, "hf", tmp_path / "out", monkeypatch, whole=True)
    assert streamed == whole and opened == [(index, 1) for index in range(LAYERS)]
    assert "model.safetensors.index.json" in streamed and sum(n.startswith("model-") for n in streamed) >= 2


def test_a_demo_source_streams_from_its_cached_folder(llama, tmp_path, monkeypatch):
    """``demo:NAME`` resolves to its cached safetensors folder, which streams like any folder."""
    shutil.copytree(llama, tmp_path / "cache" / "smollm2-135m")
    monkeypatch.setenv("POCKETLM_CACHE", str(tmp_path / "cache"))
    streamed, opened = export("demo:smollm2-135m", "hf", tmp_path / "out", monkeypatch)
    whole, _ = export("demo:smollm2-135m", "hf", tmp_path / "out", monkeypatch, whole=True)
    assert streamed == whole and opened == [(index, 1) for index in range(LAYERS)]


@pytest.mark.parametrize("spec", [dict(family="llama", kind="Q8_0", layers=LAYERS),
                                  dict(family="qwen2", kind="F16", tied=True, layers=LAYERS)])
def test_a_gguf_file_streams_into_the_same_hf_export(tmp_path, monkeypatch, spec):
    """A ``.gguf`` source is dequantized a layer at a time from the file, into the files the
    whole load through transformers gives."""
    from .test_gguf_source import write_gguf

    (tmp_path / "gguf").mkdir()
    path = write_gguf(tmp_path / "gguf" / "model.gguf", **spec)
    streamed, opened = export(path, "hf", tmp_path / "out", monkeypatch)
    whole, _ = export(path, "hf", tmp_path / "out", monkeypatch, whole=True)
    assert streamed == whole and opened == [(index, 1) for index in range(LAYERS)]


def test_a_gguf_file_streams_into_the_same_gguf_file(tmp_path):
    """A K-quant GGUF file converted to GGUF (as ``pocketlm export`` does, here without
    the tiny tokenizer, which has more ids than the model has rows) streams into the same file."""
    pytest.importorskip("pocketlm_gguf")
    from pocketlm.plugins import get_plugins
    from pocketlm.recipe import parse_recipe

    from .test_gguf_source import write_gguf

    (tmp_path / "gguf").mkdir()
    path = write_gguf(tmp_path / "gguf" / "model.gguf", family="llama", kind="K", hidden=256, intermediate=512,
                      layers=LAYERS)
    plugins, files = get_plugins(), {}
    for stream in (True, False):
        out = tmp_path / "out"          # the same recipe text both times: the file records it
        recipe = parse_recipe(f'[model]\nsource = "{path}"\n[evaluate]\nmetrics = []\nper_stage = []\n'
                              f'[export]\nformat = "gguf"\ntokenizer = false\npath = "{out}"\n',
                              plugins, file="<export>")
        run = Run(recipe, tmp_path, plugins, owns_folder=False, echo=lambda m: None)
        loaded = run.load(str(path), stream=stream)
        assert streaming.is_streamed(loaded.model) is stream
        files[stream] = (Path(run.export(loaded.model, loaded.tokenizer)) / "model.gguf").read_bytes()
        shutil.rmtree(out)
    assert files[True] == files[False]


def test_a_streamed_stage_keeps_its_export_layout(llama, tmp_path, monkeypatch, toy_plugins):
    """A stage written with offload = "disk" (a layer shard each) is not a plain source: its
    export keeps one shard per part, as before."""
    from pocketlm.recipe import parse_recipe

    recipe = (f'[model]\nsource = "{llama}"\noffload = "disk"\n[calibration]\nsamples = 4\nseq_len = 32\n'
              '[[stages]]\nmethod = "toy-round"\nbits = 4\n[evaluate]\nmetrics = []\nbefore = false\nper_stage = []\n')
    Run(parse_recipe(recipe, toy_plugins, file="recipe.toml"), tmp_path / "run", toy_plugins,
        echo=lambda m: None).execute()
    stage = tmp_path / "run" / "stages" / "01-toy-round"
    assert (stage / "layers").is_dir()
    streamed, opened = export(stage, "hf", tmp_path / "out", monkeypatch)
    before, _ = export(stage, "hf", tmp_path / "out", monkeypatch, whole=True)
    assert streamed == before and opened == [(index, 1) for index in range(LAYERS)]
    assert "model.safetensors.index.json" in streamed and sum(n.startswith("model-") for n in streamed) == LAYERS + 1


def test_a_pickle_folder_is_refused_as_before(llama, tmp_path, monkeypatch):
    """Pickle weights never stream: the export refuses them with the same message as before."""
    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "pickle"
    shutil.copytree(llama, folder)
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["export", str(folder), "--format", "hf", "-o", "out"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.startswith(f"error: model.allow_pickle: {folder} holds only pickle weights "
                                    "(pytorch_model.bin); loading pickle can run arbitrary code")
    assert not (tmp_path / "out").exists()


def test_a_model_the_disk_path_cannot_build_loads_whole_as_before(llama, tmp_path, monkeypatch):
    """Where the disk path cannot build the model's shell, the export loads it whole and writes
    what it wrote before; ``offload = "disk"`` itself names the reason."""
    def refuse(config, dtype):
        raise ValueError("no meta shell for this architecture")

    monkeypatch.setattr(streaming, "build_shell", refuse)
    streamed, opened = export(llama, "hf", tmp_path / "out", monkeypatch)
    whole, _ = export(llama, "hf", tmp_path / "out", monkeypatch, whole=True)
    assert streamed == whole and opened == []
    with pytest.raises(streaming.NotStreamable, match="offload = \"disk\" cannot build the model of .*: "
                       "ValueError: no meta shell for this architecture"):
        streaming.load_streamed(llama, __import__("torch").float32)


def test_a_config_transformers_does_not_know_is_not_streamable(llama, tmp_path):
    """A model that needs its folder's own code (or an architecture transformers lacks) cannot
    stream: that is NotStreamable, so ``pocketlm export`` leaves it to the whole load."""
    import torch

    folder = tmp_path / "custom"
    shutil.copytree(llama, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "my-own-llama"}))
    with pytest.raises(streaming.NotStreamable, match="offload = \"disk\" cannot build the model of "):
        streaming.load_streamed(folder, torch.float32)


def _truncate(file):
    data = file.read_bytes()
    file.write_bytes(data[:len(data) // 2])


def test_a_truncated_source_gives_one_message(llama, tmp_path, monkeypatch):
    folder = tmp_path / "damaged"
    shutil.copytree(llama, folder)
    _truncate(folder / "model.safetensors")
    size = (llama / "model.safetensors").stat().st_size
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["export", str(folder), "--format", "hf", "-o", "out"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stdout == ""
    assert result.stderr == (f"error: model.source: the weight file {folder}/model.safetensors is truncated: it "
                             f"holds {size // 2:,} bytes of the {size:,} its header "
                             "announces\n  fix: copy or download it again\n")
    assert not (tmp_path / "out").exists()
