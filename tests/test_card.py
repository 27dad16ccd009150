"""The model card in every export: Hub metadata, the measured table, the recipe, versions."""

import json
import tomllib

import yaml

import pocketlm

from pocketlm.card import base_model, card_metadata, to_toml
from pocketlm.pipeline import Run
from pocketlm.recipe import parse_recipe

RECIPE = """[model]
source = "{model}"
[calibration]
samples = 2
seq_len = 32
[[stages]]
method = "toy-round"
bits = 4
[evaluate]
metrics = ["perplexity", "size"]
per_stage = []
[evaluate.perplexity]
windows = 2
seq_len = 32
[export]
format = "hf"
"""


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_metadata_names_the_base_model_methods_and_format():
    recipe = {"model": {"source": "HuggingFaceTB/SmolLM2-135M"}, "stages": [{"method": "a"}, {"method": "b"}, {"method": "a"}],
              "export": {"format": "gguf"}}
    assert card_metadata(recipe, library="gguf") == {"base_model": "HuggingFaceTB/SmolLM2-135M", "tags": ["pocketlm", "a", "b", "gguf"],
                                     "pipeline_tag": "text-generation", "library_name": "gguf"}
    assert base_model("demo:smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model("./models/tiny") is None and base_model("/abs/path") is None and base_model("x.gguf") is None


def test_to_toml_round_trips_a_resolved_recipe():
    recipe = {"model": {"source": "m", "revision": None, "allow_pickle": False}, "calibration": {"samples": 4},
              "stages": [{"method": "a", "bits": 4, "ignore": ["lm_head"]}],
              "evaluate": {"metrics": ["perplexity"], "perplexity": {"windows": 2, "text": "builtin:x"}},
              "export": {"format": "hf", "path": "export"}}
    parsed = tomllib.loads(to_toml(recipe))
    recipe["model"].pop("revision")  # None has no TOML form: left out, as its default
    assert parsed == recipe


def test_every_export_carries_a_card_with_metadata_metrics_and_recipe(tiny_folder, toy_plugins, tmp_path):
    recipe = parse_recipe(RECIPE.format(model=tiny_folder), toy_plugins, file="recipe.toml")
    report = Run(recipe, tmp_path / "run", toy_plugins, echo=lambda m: None).execute()
    card = (tmp_path / "run" / "export" / "README.md").read_text()
    metadata = _front_matter(card)
    assert metadata["tags"] == ["pocketlm", "toy-round", "hf"]
    assert metadata["pipeline_tag"] == "text-generation" and "base_model" not in metadata  # a local folder
    before, after = report["before"]["perplexity"], report["after"]["perplexity"]
    assert f"| before | {before:.2f} |" in card and f"| after | {after:.2f} |" in card
    body = card.split("```toml\n")[1].split("```")[0]
    resolved = json.loads((tmp_path / "run" / "recipe.resolved.json").read_text())["recipe"]
    assert tomllib.loads(body)["stages"] == resolved["stages"] == [{"method": "toy-round", "bits": 4}]
    assert f"| pocketlm | {pocketlm.__version__} |" in card and "| torch |" in card
    assert str(tmp_path) not in card  # no path of the machine that made it
    # the card is the only file the pipeline adds to what the exporter wrote
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "export")
