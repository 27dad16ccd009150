"""rtn and gptq on a model streamed from disk (offload = "disk") give the grids of the whole model in
memory, bit for bit; the gptq and compressed-tensors exports stream layer by layer."""

import pytest
import torch
from safetensors.torch import load_file

from pocketlm.pipeline import Run
from pocketlm.plugins import Plugins
from pocketlm.recipe import parse_recipe
from pocketlm.testing.models import save_tiny_model

RECIPE = """[model]
source = "{model}"
offload = "{offload}"
[calibration]
samples = 4
seq_len = 32
[[stages]]
method = "{method}"
bits = 4
group_size = 32
[evaluate]
metrics = ["size"]
before = false
[export]
format = "{format}"
"""


@pytest.fixture(scope="module")
def plugins():
    return Plugins()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("stream") / "llama", "llama", layers=3)


def _run(source, offload, method, plugins, run_dir, export="hf"):
    recipe = parse_recipe(RECIPE.format(model=source, offload=offload, method=method, format=export), plugins,
                          file="recipe.toml")
    return Run(recipe, run_dir, plugins, echo=lambda m: None).execute()


def _grids(stage) -> dict[str, torch.Tensor]:
    """Every tensor of a stage checkpoint by full name, whole or sharded by layer."""
    if (stage / "layers").is_dir():
        tensors = load_file(str(stage / "rest" / "model.safetensors"))
        for shard in sorted((stage / "layers").glob("layer-*.safetensors")):
            index = int(shard.stem.split("-")[1])
            tensors.update({f"model.layers.{index}.{k}": v for k, v in load_file(str(shard)).items()})
        return tensors
    return load_file(str(stage / "model.safetensors"))


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_disk_gives_the_grids_of_none(source, plugins, tmp_path, method):
    _run(source, "none", method, plugins, tmp_path / "none")
    _run(source, "disk", method, plugins, tmp_path / "disk")
    name = f"01-{method}"
    a, b = _grids(tmp_path / "none" / "stages" / name), _grids(tmp_path / "disk" / "stages" / name)
    qweights = [k for k in a if k.endswith("storage.qweight")]
    assert len(qweights) == 3 * 7
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
def test_gptq_export_streams_the_same_tensors_layer_by_layer(source, plugins, tmp_path, checkpoint_format):
    import json

    recipe = RECIPE.replace('format = "{format}"', f'format = "gptq"\ncheckpoint_format = "{checkpoint_format}"')
    for offload in ("none", "disk"):
        Run(parse_recipe(recipe.format(model=source, offload=offload, method="gptq"), plugins, file="recipe.toml"),
            tmp_path / offload, plugins, echo=lambda m: None).execute()
    none, disk = tmp_path / "none" / "export", tmp_path / "disk" / "export"
    assert [p.name for p in none.glob("*.safetensors")] == ["model.safetensors"]
    index = json.loads((disk / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) == 1 + 3          # the rest, then one shard per decoder layer
    a, b = _all_tensors(none), _all_tensors(disk)
    assert sorted(a) == sorted(b) and sum(k.endswith(".qweight") for k in a) == 3 * 7
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    config = lambda folder: json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config(none) == config(disk) and config(disk)["checkpoint_format"] == checkpoint_format


def _all_tensors(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


@pytest.mark.parametrize("symmetric", [True, False])
def test_compressed_tensors_streams_the_same_tensors_layer_by_layer(source, plugins, tmp_path, symmetric):
    import json

    recipe = RECIPE.replace("group_size = 32\n", f"group_size = 32\nsymmetric = {str(symmetric).lower()}\n")
    for offload in ("none", "disk"):
        parsed = parse_recipe(recipe.format(model=source, offload=offload, method="gptq", format="compressed-tensors"),
                              plugins, file="recipe.toml")
        Run(parsed, tmp_path / offload, plugins, echo=lambda m: None).execute()
    a, b = _all_tensors(tmp_path / "none" / "export"), _all_tensors(tmp_path / "disk" / "export")
    assert sorted(a) == sorted(b) and any(k.endswith("weight_packed") for k in a)
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert (tmp_path / "disk" / "export" / "model.safetensors.index.json").is_file()
    config = lambda run: json.loads((tmp_path / run / "export" / "config.json").read_text())["quantization_config"]
    assert config("none") == config("disk")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    ids = torch.randint(3, 200, (1, 12))
    # run_compressed=False: decompress on load (the default path mis-sizes asymmetric zero points).
    outputs = [AutoModelForCausalLM.from_pretrained(tmp_path / run / "export", dtype=torch.float32,
               quantization_config=CompressedTensorsConfig(run_compressed=False))(ids).logits for run in ("none", "disk")]
    assert torch.equal(outputs[0], outputs[1])


def _export_command(stage, fmt, out, monkeypatch, *, whole=False) -> tuple[dict[str, str], list]:
    """``pocketlm export STAGE --format FMT -o OUT``: the sha256 of each file, and the
    materialized decoder layers counted each time the stream opened one. ``whole``: the stage
    loaded whole, as before exporters that stream got a checkpoint's layers one at a time."""
    import shutil

    from pocketlm.testing import export_counting_layers, file_digests

    result, opened = export_counting_layers(stage, fmt, out, whole=whole)
    assert result.exit_code == 0, result.output
    files = file_digests(out)
    shutil.rmtree(out)
    return files, opened


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_exporting_a_whole_stage_checkpoint_streams_it_into_the_same_files(source, plugins, tmp_path, monkeypatch,
                                                                         fmt):
    """``pocketlm export`` of a stage written with offload = "none" reads its decoder layers one
    at a time into an exporter that streams, and writes the files of the whole model in memory."""
    recipe = RECIPE.replace("[export]\n", "").replace('format = "{format}"\n', "")
    Run(parse_recipe(recipe.format(model=source, offload="none", method="rtn"), plugins, file="recipe.toml"),
        tmp_path / "run", plugins, echo=lambda m: None).execute()
    stage = tmp_path / "run" / "stages" / "01-rtn"
    streamed, opened = _export_command(stage, fmt, tmp_path / "out", monkeypatch)
    whole, opened_whole = _export_command(stage, fmt, tmp_path / "out", monkeypatch, whole=True)
    assert opened == [(0, 1), (1, 1), (2, 1)] and opened_whole == []
    assert streamed == whole and "model.safetensors" in streamed


def _save_tied(folder):
    from transformers import AutoModelForCausalLM

    tied = save_tiny_model(folder, "llama", layers=3)
    model = AutoModelForCausalLM.from_pretrained(tied)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(tied)
    return tied


@pytest.mark.parametrize("fmt", ["compressed-tensors", "hf"])
def test_a_quantized_embedding_with_its_tied_head_streams_into_the_same_files(plugins, tmp_path, monkeypatch, fmt):
    """The head reads the 8-bit embedding's storage, stored once in the checkpoint: the streamed
    checkpoint rebuilds the sharing and writes what the whole model does."""
    tied = _save_tied(tmp_path / "tied")
    recipe = RECIPE.replace("[export]\n", "").replace('format = "{format}"\n', "") + \
        '[[stages]]\nmethod = "rtn"\nbits = 8\ngroup_size = 32\ntargets = ["embed"]\nignore = []\n'
    Run(parse_recipe(recipe.format(model=tied, offload="none", method="rtn"), plugins, file="recipe.toml"),
        tmp_path / "run", plugins, echo=lambda m: None).execute()
    stage = tmp_path / "run" / "stages" / "02-rtn"
    import json

    assert json.loads((stage / "pocketlm-modules.json").read_text())["lm_head"]["shares"] == "model.embed_tokens"
    streamed, opened = _export_command(stage, fmt, tmp_path / "out", monkeypatch)
    whole, _ = _export_command(stage, fmt, tmp_path / "out", monkeypatch, whole=True)
    assert opened == [(0, 1), (1, 1), (2, 1)]
    assert streamed == whole


def test_a_disk_stage_whose_head_shares_the_quantized_embedding_loads_again(plugins, tmp_path):
    """A streamed stage checkpoint stores the shared storage once, under the embedding: loading
    it back (``pocketlm export``, ``--resume``) ties the head to it again."""
    from pocketlm.checkpoint import load_checkpoint

    tied = _save_tied(tmp_path / "tied")
    recipe = RECIPE.replace("[export]\n", "").replace('format = "{format}"\n', "").replace(
        "group_size = 32\n", 'group_size = 32\ntargets = ["embed"]\nignore = []\n').replace("bits = 4", "bits = 8")
    for offload in ("none", "disk"):
        Run(parse_recipe(recipe.format(model=tied, offload=offload, method="rtn"), plugins, file="recipe.toml"),
            tmp_path / offload, plugins, echo=lambda m: None).execute()
    whole = load_checkpoint(tmp_path / "none" / "stages" / "01-rtn").model
    streamed = load_checkpoint(tmp_path / "disk" / "stages" / "01-rtn").model
    assert streamed.lm_head.storage is streamed.model.embed_tokens.storage
    assert torch.equal(streamed.lm_head.storage.qweight, whole.lm_head.storage.qweight)
    assert torch.equal(streamed.lm_head.storage.scales, whole.lm_head.storage.scales)


def test_a_head_solved_on_a_model_streamed_from_disk_has_the_grids_of_the_whole_model(plugins, tmp_path):
    """``head = "solve"`` on a tied model: the walker hands over the head's inputs after the last
    streamed layer; the embedding's solved grid is the one the model in memory gets."""
    tied = _save_tied(tmp_path / "tied")
    recipe = RECIPE.replace("group_size = 32\n", 'group_size = 32\ntargets = ["*", "embed"]\nignore = []\n')
    for offload in ("none", "disk"):
        Run(parse_recipe(recipe.format(model=tied, offload=offload, method="gptq", format="hf"), plugins,
                         file="recipe.toml"), tmp_path / offload, plugins, echo=lambda m: None).execute()
    a, b = (_grids(tmp_path / offload / "stages" / "01-gptq") for offload in ("none", "disk"))
    assert "model.embed_tokens.storage.qweight" in a
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
