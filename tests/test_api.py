"""The Python API: pocketlm.run on a path, a dict and a parsed recipe; pocketlm.compress on a
model in memory."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pocketlm
from pocketlm.recipe import parse_recipe
from pocketlm.weights import QuantizedLinear

RECIPE = {
    "calibration": {"samples": 4, "seq_len": 32},
    "stages": [{"method": "toy-mask", "sparsity": 0.5}, {"method": "toy-round", "bits": 4}],
    "evaluate": {"metrics": ["perplexity", "sparsity"], "perplexity": {"windows": 2, "seq_len": 32}},
    "export": {"format": "hf"},
}


def _recipe(tiny_folder) -> dict:
    return {"model": {"source": str(tiny_folder)}, **json.loads(json.dumps(RECIPE))}


def test_importing_pocketlm_does_not_import_torch():
    code = "import sys, pocketlm, pocketlm.cli; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_validating_a_recipe_imports_no_tensor_library(tmp_path):
    """`pocketlm validate` reads options and size effects only: the built-in plugins name their
    code lazily, so neither torch nor transformers is imported (the 2-second budget)."""
    recipe = tmp_path / "r.toml"
    recipe.write_text('[model]\nsource = "demo:smollm2-135m"\n[evaluate]\n'
                      'metrics = ["perplexity", "kl-divergence", "size"]\n[export]\nformat = "hf"\n')
    code = ("import sys; from pocketlm.cli import main\n"
            "try:\n    main(['validate', sys.argv[1]])\nexcept SystemExit as stop:\n    assert not stop.code, stop.code\n"
            "print(*[m in sys.modules for m in ('torch', 'transformers', 'safetensors', 'numpy', 'lm_eval', "
            "'huggingface_hub', 'datasets')])")
    done = subprocess.run([sys.executable, "-c", code, str(recipe)], capture_output=True, text=True, check=True,
                          env={**os.environ, "POCKETLM_PLUGINS": "none"}, cwd=tmp_path)
    assert done.stdout.splitlines()[0] == f"{recipe}: valid (no stages)"
    assert done.stdout.split()[-7:] == ["False"] * 7


def test_run_takes_a_dict_and_returns_report_folder_export_and_model(tiny_folder, toy_plugins, tmp_path):
    result = pocketlm.run(_recipe(tiny_folder), run_dir=tmp_path / "run", plugins=toy_plugins, echo=None)
    assert result.run_dir == tmp_path / "run"
    assert result.export == tmp_path / "run" / "export" and (result.export / "config.json").is_file()
    assert result.report == json.loads((tmp_path / "run" / "report.json").read_text())
    assert 0.49 < result.after["sparsity"] < 0.51
    assert any(isinstance(m, QuantizedLinear) for m in result.model.modules())
    assert result.before["perplexity"] > 1 and result.after["perplexity"] > 1


def test_run_takes_a_path_and_a_parsed_recipe(tiny_folder, toy_plugins, tmp_path):

    text = (f'[model]\nsource = "{tiny_folder}"\n[calibration]\nsamples = 2\nseq_len = 32\n'
            '[[stages]]\nmethod = "toy-round"\nbits = 8\n[evaluate]\nmetrics = []\nper_stage = []\n')
    path = tmp_path / "small.toml"
    path.write_text(text)
    by_path = pocketlm.run(path, run_dir=tmp_path / "a", plugins=toy_plugins, echo=None)
    parsed = parse_recipe(text, toy_plugins)
    by_recipe = pocketlm.run(parsed, run_dir=tmp_path / "b", plugins=toy_plugins, echo=None)
    assert by_path.export is None and by_recipe.export is None
    for result in (by_path, by_recipe):
        assert [s["method"] for s in result.report["stages"]] == ["toy-round"]
    first = dict(by_path.model.named_buffers())
    second = dict(by_recipe.model.named_buffers())
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_run_rejects_bad_input_with_a_pocket_error(toy_plugins, tmp_path):
    with pytest.raises(pocketlm.PocketError, match="recipe path, a dict or a parsed recipe"):
        pocketlm.run(42, plugins=toy_plugins)
    with pytest.raises(pocketlm.PocketError, match="unknown method 'nope'"):
        pocketlm.run({"stages": [{"method": "nope"}]}, plugins=toy_plugins, run_dir=tmp_path)


def test_compress_changes_a_model_in_memory_and_keeps_the_original_as_teacher(toy_plugins, tmp_path):
    from pocketlm.testing.models import tiny_model, tiny_tokenizer

    model, tokenizer = tiny_model("llama", vocab_size=len(tiny_tokenizer())), tiny_tokenizer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = pocketlm.compress(model, tokenizer, stages=[{"method": "toy-round", "bits": 4}],
                               calibration={"samples": 4, "seq_len": 32}, evaluate=["perplexity", "size"],
                               export={"format": "hf", "path": str(tmp_path / "out")}, plugins=toy_plugins)
    assert result.model is model
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 2 * 7  # 2 layers x q,k,v,o,gate,up,down
    assert result.run_dir is None and result.export == tmp_path / "out"
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(result.export)
    ids = torch.randint(3, len(tokenizer), (1, 16))
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, model(ids).logits, atol=1e-4)
    # 4-bit rounding moves perplexity, but not far on a random model
    assert result.after["perplexity"] != result.before["perplexity"]
    assert abs(result.after["perplexity"] / result.before["perplexity"] - 1) < 0.2
    assert torch.equal(model.model.embed_tokens.weight, before["model.embed_tokens.weight"])  # not a target


def test_compress_hands_the_original_to_the_teacher(toy_plugins):
    from pocketlm.testing.models import tiny_model, tiny_tokenizer

    model, tokenizer = tiny_model("llama", vocab_size=len(tiny_tokenizer())), tiny_tokenizer()
    result = pocketlm.compress(model, tokenizer, stages=[{"method": "toy-round", "bits": 2}],
                               calibration={"samples": 2, "seq_len": 32},
                               evaluate={"metrics": ["kl-divergence"], "kl-divergence": {"windows": 2, "seq_len": 32}},
                               plugins=toy_plugins)
    # kl-divergence compares with context.teacher(): zero before the stages, a real gap after
    # 2-bit rounding, so the teacher is the original and not the model being changed
    assert result.before["kl_divergence"] == pytest.approx(0.0, abs=1e-6)
    assert result.after["kl_divergence"] > 1e-3


def test_the_readme_example_runs(tiny_folder, tmp_path, monkeypatch):
    """The README's Python example, on the tiny model (with the first-party plugins installed)."""
    import re

    from pocketlm.plugins import get_plugins

    plugins = get_plugins()
    if not {"gptq"} <= set(plugins.methods) or "gguf" not in plugins.exporters:
        pytest.skip("needs pocketlm-gptq and pocketlm-gguf")
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    code = re.search(r"## From Python.*?```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipe.toml").write_text(f'[model]\nsource = "{tiny_folder}"\n[calibration]\nsamples = 2\nseq_len = 32\n'
                                          '[[stages]]\nmethod = "rtn"\nbits = 8\n[evaluate]\nmetrics = ["perplexity"]\n'
                                          '[evaluate.perplexity]\nwindows = 2\nseq_len = 32\n')
    namespace: dict = {}
    exec(compile(code.replace("path/to/model", str(tiny_folder)), "README.md", "exec"), namespace)  # noqa: S102
    result = namespace["result"]
    assert (tmp_path / "runs" / "recipe" / "report.json").is_file()
    assert result.export == (tmp_path / "model-w4").resolve() and (result.export / "model.gguf").is_file()
    assert (result.export / "README.md").is_file()
    assert result.after["kl_divergence"] > 0 and result.report["stages"][0]["method"] == "gptq"
