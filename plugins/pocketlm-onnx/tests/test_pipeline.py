"""The exporter through the core: a recipe run from the command line (the conformance kit is in
test_conformance.py)."""

from __future__ import annotations

import json

from click.testing import CliRunner
from conftest import SENTENCES, cosines

from pocketlm import sentence
from pocketlm.cli import main
from pocketlm.testing.models import save_tiny_model
from pocketlm_onnx import runtime


def test_recipe_with_onnx_export_from_the_command_line(tmp_path):
    save_tiny_model(tmp_path / "tiny-bert", "bert")
    (tmp_path / "recipe.toml").write_text(
        '[model]\nsource = "tiny-bert"\n'
        '[[stages]]\nmethod = "rtn"\nbits = 8\ngroup_size = -1\ntargets = ["*"]\nignore = []\n'
        '[evaluate]\nmetrics = ["size"]\n[export]\nformat = "onnx"\npath = "out"\n')
    result = CliRunner().invoke(main, ["run", str(tmp_path / "recipe.toml"), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "onnx: 12 8-bit MatMulInteger; token embedding as a 8-bit uint8 table" in result.output
    out = tmp_path / "run" / "out"
    described = json.loads((out / "pocketlm-onnx.json").read_text())
    assert described["quantized_linears"] == {"8-bit MatMulInteger": 12}
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    original = AutoModel.from_pretrained(tmp_path / "tiny-bert")
    vectors = runtime.embed(out, tokenizer, SENTENCES)
    # the exported int8 model against the float original: weight and activation rounding
    assert cosines(vectors, sentence.embed(original, tokenizer, SENTENCES).numpy()).min() > 0.99
