"""awq on a model streamed from disk (offload = "disk") gives the grids of the whole model in memory,
and the awq export of it is written layer by layer with the same tensors."""

import json

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
method = "awq"
bits = 4
group_size = 32
[evaluate]
metrics = ["size"]
before = false
[export]
format = "awq"
"""


def _tensors(stage) -> dict[str, torch.Tensor]:
    if (stage / "layers").is_dir():
        out = load_file(str(stage / "rest" / "model.safetensors"))
        for shard in sorted((stage / "layers").glob("layer-*.safetensors")):
            index = int(shard.stem.split("-")[1])
            out.update({f"model.layers.{index}.{k}": v for k, v in load_file(str(shard)).items()})
        return out
    return load_file(str(stage / "model.safetensors"))


def test_disk_gives_the_grids_of_none(tmp_path):
    plugins = Plugins()
    source = save_tiny_model(tmp_path / "llama", "llama", layers=2, outliers=True)
    for offload in ("none", "disk"):
        recipe = parse_recipe(RECIPE.format(model=source, offload=offload), plugins, file="recipe.toml")
        Run(recipe, tmp_path / offload, plugins, echo=lambda m: None).execute()
    a, b = _tensors(tmp_path / "none" / "stages" / "01-awq"), _tensors(tmp_path / "disk" / "stages" / "01-awq")
    assert sorted(a) == sorted(b) and sum(k.endswith("qweight") for k in a) == 2 * 7
    assert all(torch.equal(a[k], b[k]) for k in a)
    exports = {offload: tmp_path / offload / "export" for offload in ("none", "disk")}
    assert [p.name for p in exports["none"].glob("*.safetensors")] == ["model.safetensors"]
    index = json.loads((exports["disk"] / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) == 1 + 2          # the rest, then one shard per decoder layer
    a, b = ({k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
            for folder in exports.values())
    assert sorted(a) == sorted(b) and sum(k.endswith(".qweight") for k in a) == 2 * 7
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    config = lambda folder: json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config(exports["none"]) == config(exports["disk"])


def test_exporting_a_whole_stage_checkpoint_streams_it_into_the_same_files(tmp_path, monkeypatch):
    """``pocketlm export --format awq`` of a stage written with offload = "none" reads its
    decoder layers one at a time and writes the files of the whole model in memory."""
    import shutil

    from pocketlm.testing import export_counting_layers, file_digests

    plugins = Plugins()
    source = save_tiny_model(tmp_path / "llama", "llama", layers=2, outliers=True)
    recipe = RECIPE.replace('[export]\nformat = "awq"\n', "")
    Run(parse_recipe(recipe.format(model=source, offload="none"), plugins, file="recipe.toml"), tmp_path / "run",
        plugins, echo=lambda m: None).execute()
    stage, out = tmp_path / "run" / "stages" / "01-awq", tmp_path / "out"
    files, opened = {}, {}
    for way in ("streamed", "whole"):
        result, opened[way] = export_counting_layers(stage, "awq", out, whole=way == "whole")
        assert result.exit_code == 0, result.output
        files[way] = file_digests(out)
        shutil.rmtree(out)
    assert opened == {"streamed": [(0, 1), (1, 1)], "whole": []}   # each layer alone in memory
    assert files["streamed"] == files["whole"] and "model.safetensors" in files["streamed"]
