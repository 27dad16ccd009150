"""``[calibration] generated``: windows the original model writes itself, after the text's.

Calibrating and training on the model's own samples as well as on one text keeps more of the
domains the text lacks (docs/bench/recovery.md); the windows are written once per run folder,
so every stage and a resumed run see the same ones."""

import json
import re

import pytest
import torch

from pocketlm import data
from pocketlm.context import GENERATED_FILE, CalibrationSpec, Context
from pocketlm.errors import PocketError
from pocketlm.pipeline import Run
from pocketlm.recipe import parse_recipe

RECIPE = """[model]
source = "{model}"
[calibration]
samples = 4
seq_len = 32
generated = {generated}
[[stages]]
method = "toy-round"
bits = 4
[evaluate]
metrics = ["size"]
before = false
[export]
format = "hf"
"""


def _loaded(tiny_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_folder).eval(), AutoTokenizer.from_pretrained(tiny_folder)


def _context(tiny_folder, run_dir, generated=3, seed=0, around=None, temperature=1.0):
    model, tokenizer = _loaded(tiny_folder)
    said = []
    spec = CalibrationSpec(data.resolve_text(data.DEFAULT_CALIBRATION_TEXT), samples=4, seq_len=32, seed=seed,
                           around=around, generated=generated, generated_temperature=temperature)
    context = Context(tokenizer=tokenizer, calibration=spec, run_dir=run_dir, seed=seed, logger=said.append,
                      teacher_factory=lambda: _loaded(tiny_folder)[0], recipe={"model": {"source": "tiny"}})
    return context, model, tokenizer, said


def test_generated_windows_follow_the_texts_and_are_the_models_own_samples(tiny_folder, tmp_path):
    context, model, tokenizer, said = _context(tiny_folder, tmp_path)
    windows = context.calibration_windows()
    text = data.calibration_windows(tokenizer, data.resolve_text(data.DEFAULT_CALIBRATION_TEXT), 4, 32, 0)
    assert windows.shape == (7, 32)
    assert torch.equal(windows[:4], text)
    assert torch.equal(windows[4:], data.generate_windows(model, 3, 32, len(tokenizer), 0))
    assert int(windows[4:].max()) < len(tokenizer)
    assert len(said) == 1 and re.fullmatch(
        rf"calibration: the original model wrote 3 windows of 32 tokens in \d+ s \({GENERATED_FILE}\)", said[0])
    # a later stage's context (and a resumed run) reads them back instead of sampling again
    again, _, _, said_again = _context(tiny_folder, tmp_path)
    again.teacher_factory = None   # reading must not need the model
    assert torch.equal(again.calibration_windows(), windows)
    assert said_again == [f"calibration: reusing the 3 windows the original model wrote ({GENERATED_FILE})"]
    # other settings are other windows: the file is written anew, not read
    other, _, _, said_other = _context(tiny_folder, tmp_path, seed=1)
    assert not torch.equal(other.calibration_windows()[-3:], windows[-3:])
    assert said_other[0].startswith("calibration: the original model wrote 3 windows")


def test_generated_windows_at_another_temperature_are_written_anew(tiny_folder, tmp_path):
    from safetensors import safe_open

    plain, model, tokenizer, _ = _context(tiny_folder, tmp_path)
    at_one = plain.calibration_windows()[4:]
    with safe_open(str(tmp_path / GENERATED_FILE), framework="pt") as handle:   # as a core before the option wrote it
        assert json.loads(handle.metadata()["described"]) == {"count": 3, "seq_len": 32, "seed": 0, "model": "tiny"}
    cooler, _, _, said = _context(tiny_folder, tmp_path, temperature=0.5)
    windows = cooler.calibration_windows()[4:]
    assert torch.equal(windows, data.generate_windows(model, 3, 32, len(tokenizer), 0, temperature=0.5))
    assert not torch.equal(windows, at_one)
    assert re.fullmatch(rf"calibration: the original model wrote 3 windows of 32 tokens at temperature 0.5 in \d+ s "
                        rf"\({GENERATED_FILE}\)", said[0])
    # sampled at a lower temperature, the tiny model's own text is likelier under it: less spread
    with torch.no_grad():
        mean_nll = [float(model(input_ids=w, labels=w).loss) for w in (windows, at_one)]
    assert mean_nll[0] < mean_nll[1]
    again, _, _, said_again = _context(tiny_folder, tmp_path, temperature=0.5)
    again.teacher_factory = None
    assert torch.equal(again.calibration_windows()[4:], windows) and said_again[0].startswith("calibration: reusing")


def test_an_encoder_is_refused_generated_windows(tiny_folder, tmp_path):
    context, *_ = _context(tiny_folder, tmp_path, around=(1, 2))
    with pytest.raises(PocketError) as error:
        context.calibration_windows()
    assert error.value.field == "calibration.generated"
    assert "an encoder writes none" in str(error.value) and "set generated = 0" in error.value.fix


def test_a_run_calibrates_on_the_text_and_the_generated_windows(tiny_folder, toy_plugins, tmp_path, monkeypatch):
    from pocketlm import calibration

    seen = []
    walk = calibration.walk_layers
    monkeypatch.setattr(calibration, "walk_layers", lambda model, arch, windows, *a, **k: (
        seen.append(tuple(windows.shape)), walk(model, arch, windows, *a, **k))[1])
    lines = []
    recipe = parse_recipe(RECIPE.format(model=tiny_folder, generated=2), toy_plugins, file="recipe.toml")
    Run(recipe, tmp_path / "run", toy_plugins, echo=lines.append).execute()
    assert seen == [(6, 32)]   # 4 windows of the text, 2 the model wrote
    assert (tmp_path / "run" / GENERATED_FILE).is_file()
    assert any(line.startswith("calibration: the original model wrote 2 windows of 32 tokens") for line in lines)
    resolved = json.loads((tmp_path / "run" / "recipe.resolved.json").read_text())
    assert resolved["recipe"]["calibration"]["generated"] == 2


def test_a_run_resolved_before_the_option_existed_still_resumes(tiny_folder, toy_plugins, tmp_path):
    """A core upgrade that adds a [calibration] option at its default does not make a run
    folder "a different recipe"."""
    recipe = parse_recipe(RECIPE.format(model=tiny_folder, generated=0), toy_plugins, file="recipe.toml")
    Run(recipe, tmp_path / "run", toy_plugins, echo=lambda m: None).execute()
    resolved_path = tmp_path / "run" / "recipe.resolved.json"
    resolved = json.loads(resolved_path.read_text())
    del resolved["recipe"]["calibration"]["generated"]   # as the previous core wrote it
    resolved["fingerprint"] = "from an older core"
    resolved_path.write_text(json.dumps(resolved))
    lines = []
    Run(recipe, tmp_path / "run", toy_plugins, resume=True, echo=lines.append).execute()
    assert any("resuming after stage 1 (toy-round)" in line for line in lines)
    edited = parse_recipe(RECIPE.format(model=tiny_folder, generated=2), toy_plugins, file="recipe.toml")
    with pytest.raises(PocketError, match=r"different recipe \(its \[calibration\] differ\)"):
        Run(edited, tmp_path / "run", toy_plugins, resume=True, echo=lambda m: None).execute()


def test_validate_names_a_bad_generated_count(tmp_path):
    from click.testing import CliRunner

    from pocketlm.cli import main

    path = tmp_path / "recipe.toml"
    path.write_text(RECIPE.format(model="demo:smollm2-135m", generated=-1).replace("toy-round", "rtn"))
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2
    assert "recipe.toml:6: calibration.generated:" in result.output
    assert "Traceback" not in result.output


def test_validate_names_a_bad_generated_temperature(tmp_path):
    from click.testing import CliRunner

    from pocketlm.cli import main

    path = tmp_path / "recipe.toml"
    path.write_text(RECIPE.format(model="demo:smollm2-135m", generated=4).replace("toy-round", "rtn")
                    .replace("generated = 4\n", "generated = 4\ngenerated_temperature = 0\n"))
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2
    assert "recipe.toml:7: calibration.generated_temperature:" in result.output
    assert "greater than 0" in result.output and "Traceback" not in result.output
