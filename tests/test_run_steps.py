"""``Run``'s public steps (``load``, ``evaluate``, ``export``), what the commands built on them
print, and the export format ``report.json`` records."""

import json
import types

import pytest
from click.testing import CliRunner

from pocketlm import Exporter, Options, hookimpl
from pocketlm.cli import main
from pocketlm.pipeline import Run
from pocketlm.plugins import Plugins
from pocketlm.recipe import parse_recipe
from pocketlm.testing.models import save_tiny_model

from .conftest import make_toy_plugin

RECIPE = """[model]
source = "{model}"
[calibration]
samples = 2
seq_len = 16
[[stages]]
method = "toy-round"
[evaluate]
metrics = ["size"]
before = false
per_stage = []
{export}"""


def _packing_exporter_plugin():
    """An exporter that packs quantized weights, so ``format = "auto"`` prefers it to ``hf``."""
    module = types.ModuleType("toy_pack")
    module.POCKETLM_API = ">=1.0,<2"

    def export(model, path, options, context):
        (path / "weights.bin").write_bytes(b"packed")

    @hookimpl
    def register_exporters(register):
        register(Exporter("toy-pack", Options, export, represents=frozenset({"dense", "quantized"}),
                          packs=frozenset({"quantized"}), summary="test-only packing exporter"))

    module.register_exporters = register_exporters
    return module


@pytest.fixture
def plugins():
    return Plugins(entry_points=False, extra=[("toy", make_toy_plugin()), ("toy-pack", _packing_exporter_plugin())])


@pytest.mark.parametrize("export, recorded", [('[export]\nformat = "auto"\n', "toy-pack"),
                                              ('[export]\nformat = "hf"\n', "hf"),
                                              ("", None)])
def test_report_json_records_the_export_format(tiny_folder, plugins, tmp_path, export, recorded):
    lines = []
    recipe = parse_recipe(RECIPE.format(model=tiny_folder, export=export), plugins, file="recipe.toml")
    report = Run(recipe, tmp_path / "run", plugins, echo=lines.append).execute()
    assert report["export_format"] == recorded
    assert json.loads((tmp_path / "run" / "report.json").read_text())["export_format"] == recorded
    if recorded == "toy-pack":   # what auto chose, as the log says
        assert "export format auto: chose 'toy-pack'" in lines
        assert (tmp_path / "run" / "export" / "weights.bin").read_bytes() == b"packed"


def test_plan_evaluate_reads_the_chosen_format_from_the_report(tiny_folder, plugins, tmp_path, monkeypatch):
    from pocketlm import plan_eval
    from pocketlm.planner import Candidate, PlanBudget

    method = plugins.methods["toy-round"]
    candidate = Candidate([(method, {"bits": 4})], [method.effect(method.options(bits=4))], 0.1, 4.0)
    printed = []
    monkeypatch.setattr(plan_eval, "plot", lambda *args, **kwargs: None)   # matplotlib is not what is tested
    points = plan_eval.evaluate_candidates([candidate], str(tiny_folder), plugins, tmp_path / "plan", PlanBudget(),
                                           types.SimpleNamespace(print=printed.append))
    assert [p["export"] for p in points] == ["toy-pack"]
    report = json.loads((tmp_path / "plan" / "candidate-1" / "report.json").read_text())
    assert report["export_format"] == "toy-pack"
    assert "| toy-round(bits=4) | toy-pack |" in (tmp_path / "plan" / "pareto.md").read_text()


def test_public_steps_load_evaluate_and_export(tiny_folder, plugins, tmp_path):
    recipe = parse_recipe(RECIPE.format(model=tiny_folder, export='[export]\nformat = "hf"\npath = "out"\n'),
                          plugins, file=str(tmp_path / "recipe.toml"))
    run = Run(recipe, tmp_path / "run", plugins, echo=lambda m: None)
    loaded = run.load(str(tiny_folder))
    assert loaded.source == str(tiny_folder) and loaded.tokenizer is not None
    parameters = sum(p.numel() for p in loaded.model.parameters())
    assert run.evaluate(loaded.model, loaded.tokenizer, ["parameters", "sparsity"]) == \
        {"parameters": parameters, "sparsity": 0.0}
    path = run.export(loaded.model, loaded.tokenizer)
    assert path == tmp_path / "run" / "out" and (path / "config.json").is_file() and run.exporter.name == "hf"
    # the old names stay, as thin aliases
    assert run._evaluate(loaded.model, loaded.tokenizer, ["parameters"]) == {"parameters": parameters}


def test_eval_and_export_commands_print_what_they_printed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_tiny_model(tmp_path / "tiny-llama", "llama")
    result = CliRunner().invoke(main, ["eval", "tiny-llama", "--metrics", "parameters,sparsity,size"])
    assert result.exit_code == 0, result.output
    assert result.output == (
        "          tiny-llama           \n"
        "┏━━━━━━━━━━━━━━━━━┳━━━━━━━━━━━┓\n"
        "┃ metric          ┃     value ┃\n"
        "┡━━━━━━━━━━━━━━━━━╇━━━━━━━━━━━┩\n"
        "│ parameters      │ 1.072e+05 │\n"
        "│ sparsity        │         0 │\n"
        "│ size_mb         │    0.4378 │\n"
        "│ bits_per_weight │     32.67 │\n"
        "│ size_on_disk    │         1 │\n"
        "└─────────────────┴───────────┘\n")
    result = CliRunner().invoke(main, ["export", "tiny-llama", "--format", "hf", "-o", "out/exported"])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"exported tiny-llama as hf to {tmp_path / 'out' / 'exported'}\n"
    # what the run and the exporter log goes to stderr, so a notice of the exporter is seen
    assert result.stderr == f"exporting (hf) to {tmp_path / 'out' / 'exported'}\n"
    assert (tmp_path / "out" / "exported" / "config.json").is_file()


def test_a_model_folder_without_a_tokenizer_gets_one_message_saying_how_to_add_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = save_tiny_model(tmp_path / "tiny-llama", "llama")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
        (folder / name).unlink(missing_ok=True)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = CliRunner().invoke(main, ["eval", "tiny-llama", "--metrics", "parameters"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "tiny-llama has no tokenizer (none of tokenizer.json, tokenizer_config.json" in result.output
    assert "model.source" in result.output
    assert "fix: save the original model's tokenizer into the folder: " \
           "AutoTokenizer.from_pretrained(ORIGINAL).save_pretrained('tiny-llama')" in result.output
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written, nothing lost


def test_plan_evaluate_measures_an_encoder_by_retrieval(plugins, tmp_path, monkeypatch):
    """An encoder predicts no tokens: the plan ranks it by retrieval MRR@10, retention after/before."""
    from pocketlm import plan_eval
    from pocketlm.context import Context
    from pocketlm.planner import Candidate, PlanBudget, model_stats
    from pocketlm.testing.models import save_tiny_model

    folder = save_tiny_model(tmp_path / "tiny-bert", "bert")
    context = Context(plugins=plugins)
    loaded = plugins.hook.load_model(source=str(folder), options=None, context=context)
    quality = plan_eval.quality_of(model_stats(loaded.model, context.architecture(loaded.model)))
    assert quality is plan_eval.RETRIEVAL
    method = plugins.methods["toy-round"]
    candidate = Candidate([(method, {"bits": 2})], [method.effect(method.options(bits=2))], 0.1, 2.0)
    monkeypatch.setattr(plan_eval, "plot", lambda *args, **kwargs: None)
    points = plan_eval.evaluate_candidates([candidate], str(folder), plugins, tmp_path / "plan", PlanBudget(),
                                           types.SimpleNamespace(print=lambda *a: None), quality=quality)
    point = points[0]
    assert 0 <= point["mrr_at_10"] <= 1 and point["baseline_mrr_at_10"] > 0
    assert point["retention"] == pytest.approx(point["mrr_at_10"] / point["baseline_mrr_at_10"])
    table = (tmp_path / "plan" / "pareto.md").read_text()
    assert table.startswith("| candidate | export | size (MB) | retrieval MRR@10 | retention |")
    recipe = (tmp_path / "plan" / "chosen.toml").read_text()
    assert 'metrics = ["retrieval", "size"]' in recipe


def test_pareto_follows_the_direction_of_the_quality():
    from pocketlm.plan_eval import PERPLEXITY, RETRIEVAL, pareto

    small_bad = {"size_mb": 1.0, "perplexity": 30.0, "mrr_at_10": 0.2}
    big_good = {"size_mb": 2.0, "perplexity": 20.0, "mrr_at_10": 0.4}
    big_bad = {"size_mb": 2.0, "perplexity": 40.0, "mrr_at_10": 0.1}
    assert pareto([small_bad, big_good, big_bad], PERPLEXITY) == [small_bad, big_good]
    assert pareto([small_bad, big_good, big_bad], RETRIEVAL) == [small_bad, big_good]
    assert pareto([small_bad, {**big_good, "mrr_at_10": 0.1}], RETRIEVAL) == [small_bad]
