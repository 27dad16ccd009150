"""A model streamed from disk (offload = "disk"), or a whole stage checkpoint that ``pocketlm
export`` reads a layer at a time, is written to GGUF one decoder layer at a time, and the file
holds exactly what the export of the whole model in memory holds."""

from __future__ import annotations

import json
import shutil

import pytest
from gguf import GGUFReader

from pocketlm.pipeline import Run
from pocketlm.plugins import get_plugins
from pocketlm.recipe import parse_recipe
from pocketlm.testing.models import save_tiny_model

RECIPE = """[model]
source = "{model}"
offload = "{offload}"
[calibration]
samples = 4
seq_len = 32
[[stages]]
method = "rtn"
bits = 4
group_size = 32
[evaluate]
metrics = []
before = false
per_stage = []
[export]
format = "gguf"
quantize = "q8_0"
tokenizer = {tokenizer}
"""


def _contents(path) -> tuple[dict, dict]:
    """Tensors (type, shape, bytes) and metadata of a GGUF file; the recipe (which names the
    offload mode) left out."""
    reader = GGUFReader(path)
    tensors = {t.name: (t.tensor_type, tuple(t.shape), bytes(t.data.tobytes())) for t in reader.tensors}
    fields = {name: field.contents() for name, field in reader.fields.items()
              if name != "pocketlm.recipe" and not name.startswith("GGUF.")}
    return tensors, fields


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_streamed_gguf_export_equals_the_whole_model_export(tmp_path, family):
    plugins = get_plugins()
    source = save_tiny_model(tmp_path / family, family, layers=3)
    logs = {}
    for offload in ("none", "disk"):
        lines = []
        recipe = parse_recipe(RECIPE.format(model=source, offload=offload,
                                             # the tiny qwen2 has fewer embedding rows than its tokenizer has ids
                                             tokenizer=str(family == "llama").lower()), plugins, file="recipe.toml")
        Run(recipe, tmp_path / offload, plugins, echo=lines.append).execute()
        logs[offload] = [line for line in lines if line.startswith("gguf:")]
    none, disk = (_contents(tmp_path / run / "export" / "model.gguf") for run in ("none", "disk"))
    assert none[0] == disk[0]
    assert none[1] == disk[1]
    assert sum(name.startswith("blk.") and name.endswith("attn_q.weight") for name in disk[0]) == 3
    assert logs["none"] == logs["disk"] and any("Q4_0 exact" in line for line in logs["disk"])
    assert not [p for p in (tmp_path / "disk" / "export").iterdir() if p.name.startswith("tmp")]  # no scratch left


# the same run without the export, its stage checkpoint written whole (offload = "none")
STAGE_RECIPE = RECIPE.split("[export]")[0].replace('offload = "{offload}"', 'offload = "none"')


def _export(stage, out, monkeypatch, *, whole=False):
    """``pocketlm export STAGE --format gguf -o OUT``: the file's bytes, and the materialized
    decoder layers counted each time the stream opened one. ``whole``: the stage loaded whole,
    as ``pocketlm export`` loaded it before the gguf exporter got a checkpoint's layers one at a time."""
    from pocketlm.testing import export_counting_layers

    result, opened = export_counting_layers(stage, "gguf", out, whole=whole)
    assert result.exit_code == 0, result.output
    data = (out / "model.gguf").read_bytes()
    moved = out.parent / f"{out.name}-{'whole' if whole else 'streamed'}.gguf"
    (out / "model.gguf").rename(moved)
    shutil.rmtree(out)
    return data, moved, opened, result.stderr


def test_exporting_a_whole_stage_checkpoint_streams_it_into_the_same_file(tmp_path, monkeypatch):
    """A stage written with offload = "none" (one model.safetensors) is exported by ``pocketlm
    export --format gguf`` a decoder layer at a time: never more than one layer in memory, and
    the file is byte for byte the one the whole model in memory gives."""
    layers = 4
    plugins = get_plugins()
    source = save_tiny_model(tmp_path / "llama", "llama", layers=layers)
    Run(parse_recipe(STAGE_RECIPE.format(model=source), plugins, file="recipe.toml"), tmp_path / "run", plugins,
        echo=lambda m: None).execute()
    stage = tmp_path / "run" / "stages" / "01-rtn"
    assert (stage / "model.safetensors").is_file() and not (stage / "layers").exists()
    streamed, streamed_file, opened, said = _export(stage, tmp_path / "out", monkeypatch)
    whole, whole_file, opened_whole, said_whole = _export(stage, tmp_path / "out", monkeypatch, whole=True)
    assert opened == [(index, 1) for index in range(layers)]   # each layer once, alone in memory
    assert opened_whole == []
    assert streamed == whole
    tensors, fields = _contents(streamed_file)
    assert (tensors, fields) == _contents(whole_file)
    assert sum(name.startswith("blk.") and name.endswith("attn_q.weight") for name in tensors) == layers
    assert json.loads(fields["pocketlm.tensors"]) == {"F16 dense": 2, "Q4_0 exact": 7 * layers}
    assert said == said_whole and "Q4_0 exact" in said


def _export_source(source, out, monkeypatch, *, whole=False):
    """``pocketlm export SOURCE --format gguf -o OUT`` of a plain model source: the file's bytes,
    and the materialized decoder layers counted each time the stream opened one. ``whole``: the
    source loaded whole, as before plain sources streamed."""
    data, moved, opened, said = _export(source, out, monkeypatch, whole=whole)
    moved.unlink()
    return data, opened, said


def test_exporting_a_safetensors_folder_streams_it_into_the_same_file(tmp_path, monkeypatch):
    """An original model (a transformers folder of safetensors) converted to GGUF is read a
    decoder layer at a time, into the same file the whole model in memory gives."""
    layers = 3
    source = save_tiny_model(tmp_path / "llama", "llama", layers=layers)
    streamed, opened, said = _export_source(source, tmp_path / "out", monkeypatch)
    whole, opened_whole, said_whole = _export_source(source, tmp_path / "out", monkeypatch, whole=True)
    assert opened == [(index, 1) for index in range(layers)] and opened_whole == []
    assert streamed == whole and said == said_whole
    (tmp_path / "check.gguf").write_bytes(streamed)
    tensors, _ = _contents(tmp_path / "check.gguf")
    assert sum(name.startswith("blk.") and name.endswith("attn_q.weight") for name in tensors) == layers
