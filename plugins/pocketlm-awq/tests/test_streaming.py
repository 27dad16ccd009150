"""awq on a model streamed from disk (offload = "disk") gives the grids of the whole model in memory."""

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
