"""Export with thresholds: the sidecar, the pocketlm loader, plain transformers, GGUF metadata, and
a recipe through `pocketlm run` with its printed table."""

import json

import pytest
import torch
from click.testing import CliRunner

from pocketlm import PocketError, atomic
from pocketlm.cli import main
from pocketlm.plugins import get_plugins
from pocketlm.testing import make_context
from pocketlm.testing.models import save_tiny_model, tiny_model, tiny_tokenizer, tiny_windows
from pocketlm_dynamic import export, sparsity
from pocketlm_dynamic.sparsity import thresholds

WINDOWS = tiny_windows(4, 16)


def thresholded(family="llama", **options):
    plugins = get_plugins()
    method = plugins.methods["activation-sparsity"]
    model = tiny_model(family, vocab_size=len(tiny_tokenizer()))
    plugins.hook.compress(model=model, method=method, options=method.options(sparsity=0.5, **options),
                          context=make_context(WINDOWS, plugins=plugins))
    return model


@torch.no_grad()
def logits(model):
    return model(input_ids=WINDOWS, use_cache=False).logits


def export_to(model, folder, **options):
    plugins = get_plugins()
    exporter = plugins.exporters["dynamic"]
    context = make_context(WINDOWS, plugins=plugins, tokenizer=tiny_tokenizer())
    with atomic.folder(folder) as tmp:
        plugins.hook.export(model=model, exporter=exporter, options=exporter.options(**options), path=tmp,
                            context=context)
    return folder


@pytest.mark.parametrize("mode", ["teal", "cats"])
def test_hf_base_round_trips_through_the_pocketlm_loader_and_plain_transformers(tmp_path, mode):
    from transformers import AutoModelForCausalLM

    model = thresholded(mode=mode)
    expected = logits(model)
    folder = export_to(model, tmp_path / "export", base="hf")
    doc = json.loads((folder / export.SIDECAR).read_text())
    assert doc["format"] == "pocketlm-activation-thresholds" and doc["version"] == 1
    assert doc["weights_format"] == "hf" and doc["model_type"] == "llama"
    assert len(doc["thresholds"]) == len(thresholds(model)) and thresholds(model)  # the model kept them
    # pocketlm: the loader claims the folder and applies the thresholds
    loaded = get_plugins().hook.load_model(source=str(folder), options=None, context=make_context())
    assert thresholds(loaded.model) == thresholds(model)
    assert torch.allclose(logits(loaded.model), expected, atol=1e-5)
    # plain transformers plus forward hooks
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    dense = logits(plain)
    export.apply_thresholds(plain, folder / export.SIDECAR)
    assert torch.allclose(logits(plain), expected, atol=1e-5) and not torch.allclose(dense, expected, atol=1e-3)


def test_low_rank_correction_round_trips_and_a_missing_factor_file_is_refused(tmp_path):
    from transformers import AutoModelForCausalLM

    model = thresholded(low_rank=8)
    expected = logits(model)
    folder = export_to(model, tmp_path / "export", base="hf")
    doc = json.loads((folder / export.SIDECAR).read_text())
    assert doc["version"] == 2 and all(e["low_rank"] == 8 for e in doc["thresholds"])
    assert (folder / export.LOW_RANK_SIDECAR).is_file() and sparsity.low_ranks(model)  # the model kept them
    loaded = get_plugins().hook.load_model(source=str(folder), options=None, context=make_context())
    assert sparsity.low_ranks(loaded.model).keys() == sparsity.low_ranks(model).keys()
    assert torch.allclose(logits(loaded.model), expected, atol=1e-5)
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    export.apply_thresholds(plain, folder / export.SIDECAR)
    assert torch.allclose(logits(plain), expected, atol=1e-5)
    # without the correction the model is another one: never run it so
    (folder / export.LOW_RANK_SIDECAR).unlink()
    with pytest.raises(PocketError, match="activation-low-rank.safetensors cannot be read.*low-rank correction "
                                          "for 14 linears") as info:
        get_plugins().hook.load_model(source=str(folder), options=None, context=make_context())
    assert info.value.file == str(folder / export.LOW_RANK_SIDECAR) and "copy the export folder whole" in info.value.fix


def test_thresholds_that_do_not_match_the_model_are_refused_at_load(tmp_path):
    folder = export_to(thresholded(), tmp_path / "export", base="hf")
    sidecar = folder / export.SIDECAR
    doc = json.loads(sidecar.read_text())
    doc["thresholds"][0]["width"] = 999
    sidecar.write_text(json.dumps(doc))
    with pytest.raises(PocketError, match="do not match the model: .*expected a linear with 999 inputs") as info:
        get_plugins().hook.load_model(source=str(folder), options=None, context=make_context())
    assert info.value.file == str(sidecar) and "recalibrate" in info.value.fix
    doc["thresholds"][0]["width"], doc["num_hidden_layers"] = 64, 7
    sidecar.write_text(json.dumps(doc))
    with pytest.raises(PocketError, match="num_hidden_layers is 2 in the model, 7 in the thresholds"):
        get_plugins().hook.load_model(source=str(folder), options=None, context=make_context())


@pytest.mark.skipif("gguf" not in get_plugins().exporters, reason="pocketlm-gguf is not installed")
def test_gguf_base_carries_the_thresholds_as_metadata(tmp_path):
    model = thresholded()
    folder = export_to(model, tmp_path / "export", base="gguf")
    files = sorted(p.name for p in folder.iterdir())
    assert export.SIDECAR in files and any(f.endswith(".gguf") for f in files) and not any(f.endswith(".tmp") for f in files)
    stored = export.read_gguf_metadata(next(folder.glob("*.gguf")))
    assert stored == json.loads((folder / export.SIDECAR).read_text())
    from transformers import AutoModelForCausalLM  # the rewritten file still loads

    gguf_file = next(folder.glob("*.gguf")).name
    plain = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    assert torch.isfinite(logits(plain)).all()


RECIPE = """[model]
source = "{model}"
[calibration]
samples = 2
seq_len = 16
[[stages]]
method = "activation-sparsity"
sparsity = {sparsity}
allocation = "greedy"
[evaluate]
metrics = ["perplexity"]
[export]
format = "{format}"
"""


def test_recipe_through_the_cli_prints_the_table_and_exports_thresholds(tmp_path, monkeypatch):
    save_tiny_model(tmp_path / "tiny", "llama")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipe.toml").write_text(RECIPE.format(model="tiny", sparsity=0.4, format="dynamic"))
    result = CliRunner().invoke(main, ["run", "recipe.toml"])
    assert result.exit_code == 0, result.output
    assert "activation-sparsity (teal, greedy): 14 thresholds, 40.0% of input channels below them" in \
        " ".join(result.output.split())
    assert "tiny: before and after" in " ".join(result.output.split())
    table = result.output[result.output.rindex("┏"):]  # the table's top edge
    assert "perplexity" in table and "before" in table and "after" in table
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in table.splitlines()
            if line.count("│") > 2 and line.split("│")[1].strip() in ("before", "after")}
    before, after = float(rows["before"]), float(rows["after"])
    assert before > 0 and after != before  # evaluation ran the thresholds
    assert (tmp_path / "runs" / "recipe" / "export" / export.SIDECAR).is_file()


def test_recipe_with_a_low_rank_correction_through_the_cli(tmp_path, monkeypatch):
    save_tiny_model(tmp_path / "tiny", "llama")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipe.toml").write_text(RECIPE.format(model="tiny", sparsity="0.4\nlow_rank = 4", format="dynamic"))
    result = CliRunner().invoke(main, ["run", "recipe.toml"])
    assert result.exit_code == 0, result.output
    printed = " ".join(result.output.split())
    assert "activation-sparsity (teal, greedy): 14 thresholds, 40.0% of input channels below them" in printed
    assert "low-rank correction of rank 4 on 14 linears" in printed
    folder = tmp_path / "runs" / "recipe" / "export"
    assert json.loads((folder / export.SIDECAR).read_text())["version"] == 2
    assert (folder / export.LOW_RANK_SIDECAR).is_file()


@pytest.mark.parametrize("text,message", [
    (RECIPE.format(model="x", sparsity=0.96, format="dynamic"), "sparsity must lie in [0, 0.95]"),
    (RECIPE.format(model="x", sparsity="0.4\nlow_rank = -1", format="dynamic"),
     "stages[0].low_rank: Input should be greater than or equal to 0, got -1"),
    (RECIPE.format(model="x", sparsity=0.4, format="hf"), "export format 'hf' cannot represent thresholds"),
])
def test_bad_recipes_are_refused_with_exit_code_2(tmp_path, monkeypatch, text, message):
    monkeypatch.chdir(tmp_path)
    save_tiny_model(tmp_path / "x", "llama")  # a source that exists, so the check under test is reached
    (tmp_path / "recipe.toml").write_text(text)
    result = CliRunner().invoke(main, ["validate", "recipe.toml"])
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output
