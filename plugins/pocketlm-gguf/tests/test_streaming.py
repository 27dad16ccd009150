"""A model streamed from disk (offload = "disk") is written to GGUF one decoder layer at a time,
and the file holds exactly what the export of the whole model in memory holds."""

from __future__ import annotations

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
