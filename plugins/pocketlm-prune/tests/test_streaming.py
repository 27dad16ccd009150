"""The pruners on a model streamed from disk (offload = "disk") give the masks and weights of the
whole model in memory; what needs every layer at once says so."""

import pytest
import torch
from safetensors.torch import load_file

from pocketlm import PocketError
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
{options}
[evaluate]
metrics = ["sparsity"]
before = false
per_stage = ["sparsity"]
"""


@pytest.fixture(scope="module")
def plugins():
    return Plugins()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("stream") / "llama", "llama", layers=3)


def _run(source, offload, method, options, plugins, run_dir):
    recipe = parse_recipe(RECIPE.format(model=source, offload=offload, method=method, options=options), plugins,
                          file="recipe.toml")
    return Run(recipe, run_dir, plugins, echo=lambda m: None).execute()


def _tensors(stage) -> dict[str, torch.Tensor]:
    if (stage / "layers").is_dir():
        out = {}
        for shard in sorted((stage / "layers").glob("layer-*.safetensors")):
            index = int(shard.stem.split("-")[1])
            for key, value in load_file(str(shard)).items():
                key = key.replace("__mask__.", "mask:")
                out[f"model.layers.{index}.{key}" if not key.startswith("mask:") else f"mask:model.layers.{index}.{key[5:]}"] = value
        out.update(load_file(str(stage / "rest" / "model.safetensors")))
        return out
    out = load_file(str(stage / "model.safetensors"))
    out.update({f"mask:{k}": v for k, v in load_file(str(stage / "masks.safetensors")).items()})
    return out


@pytest.mark.parametrize("method,options", [("sparsegpt", "sparsity = 0.5"), ("wanda", 'pattern = "2:4"'),
                                            ("magnitude", "sparsity = 0.5")])
def test_disk_gives_the_masks_of_none(source, plugins, tmp_path, method, options):
    none = _run(source, "none", method, options, plugins, tmp_path / "none")
    disk = _run(source, "disk", method, options, plugins, tmp_path / "disk")
    a, b = _tensors(tmp_path / "none" / "stages" / f"01-{method}"), _tensors(tmp_path / "disk" / "stages" / f"01-{method}")
    assert sorted(a) == sorted(b) and sum(k.startswith("mask:") for k in a) == 3 * 7
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert disk["after"]["sparsity"] == none["after"]["sparsity"] > 0.4


def test_what_needs_every_layer_at_once_is_refused(source, plugins, tmp_path):
    for method, options, what in [("magnitude", 'sparsity = 0.5\nscope = "global"', 'scope = "global"'),
                                  ("prune-depth", "layers = 1", "prune-depth")]:
        with pytest.raises(PocketError) as error:
            _run(source, "disk", method, options, plugins, tmp_path / method)
        assert what in str(error.value) and "needs the whole model in memory" in str(error.value)
        assert 'offload = "none"' in str(error.value)


HYBRID = """[model]
source = "{model}"
offload = "{offload}"
[calibration]
samples = 4
seq_len = 32
[[stages]]
method = "sparsegpt"
sparsity = 0.5
[[stages]]
method = "gptq"
bits = 4
group_size = 32
[evaluate]
metrics = ["sparsity", "size"]
[export]
format = "compressed-tensors"
"""


def _digest(folder):
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_streamed_hybrid_keeps_masks_across_stages_and_resumes_at_a_stage_boundary(source, plugins, tmp_path):
    import shutil

    from safetensors import safe_open

    runs = {}
    for offload in ("none", "disk"):
        recipe = parse_recipe(HYBRID.format(model=source, offload=offload), plugins, file="recipe.toml")
        runs[offload] = Run(recipe, tmp_path / offload, plugins, echo=lambda m: None).execute()
    tensors = {}
    for offload in ("none", "disk"):
        tensors[offload] = {}
        for file in (tmp_path / offload / "export").glob("*.safetensors"):
            with safe_open(str(file), "pt") as handle:
                tensors[offload].update({k: handle.get_tensor(k) for k in handle.keys()})
    assert sorted(tensors["none"]) == sorted(tensors["disk"])
    assert all(torch.equal(tensors["none"][k], tensors["disk"][k]) for k in tensors["none"])
    assert runs["disk"]["after"]["sparsity"] == runs["none"]["after"]["sparsity"] > 0.4
    # Resume after the first streamed stage: stage 2 reads stage 1's layer shards.
    run = tmp_path / "disk"
    straight = _digest(run / "export")
    for name in ("stages/02-gptq", "export", "report.json"):
        target = run / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    recipe = parse_recipe(HYBRID.format(model=source, offload="disk"), plugins, file="recipe.toml")
    Run(recipe, run, plugins, resume=True, echo=lambda m: None).execute()
    assert _digest(run / "export") == straight
    assert "resuming after stage 1" in (run / "run.log").read_text()
