"""The lm-eval evaluator, offline: a multiple-choice task written here (YAML + JSONL), run on a
tiny model in memory, checked against log-likelihoods computed by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pocketlm import PocketError
from pocketlm.testing import make_context
from pocketlm.testing.models import save_tiny_model, tiny_model, tiny_tokenizer
from pocketlm_lmeval import LMEvalOptions, evaluate_tasks, local_task_configs

from conftest import QUESTIONS

@torch.no_grad()
def accuracy_by_hand(model, tokenizer) -> float:
    """lm-eval's ``acc``: the choice with the highest summed log-likelihood given the context."""
    right = 0
    for context, choices, label in QUESTIONS:
        scores = []
        for choice in choices:
            context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
            whole = tokenizer(context + choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([whole])
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            continuation = range(len(context_ids), len(whole))
            scores.append(sum(logprobs[i - 1, whole[i]].item() for i in continuation))
        right += int(max(range(len(choices)), key=scores.__getitem__) == label)
    return right / len(QUESTIONS)


def _context(tokenizer, teacher, base: Path):
    context = make_context(tokenizer=tokenizer, teacher=teacher)
    context.recipe = {"model": {"source": f"test-{id(teacher)}"}, "_base": str(base)}
    return context


def test_local_task_files_get_absolute_data_paths(task_folder):
    configs = local_task_configs(task_folder)
    assert list(configs) == ["tinycloze"]
    assert configs["tinycloze"]["dataset_kwargs"]["data_files"] == {"test": str(task_folder / "tinycloze.jsonl")}


def test_a_local_multiple_choice_task_runs_offline_on_the_model_in_memory(task_folder, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # the JSONL is found from the YAML's folder, not the current one
    tokenizer = tiny_tokenizer()
    original = tiny_model("llama", vocab_size=len(tokenizer), seed=0)
    changed = tiny_model("llama", vocab_size=len(tokenizer), seed=1)
    options = LMEvalOptions(tasks=["tinycloze"], include_path=str(task_folder), batch_size=4)
    metrics = evaluate_tasks(changed, options, _context(tokenizer, original, task_folder))
    assert metrics["tinycloze:acc"] == pytest.approx(accuracy_by_hand(changed, tokenizer))
    assert metrics["tinycloze:acc_original"] == pytest.approx(accuracy_by_hand(original, tokenizer))
    if metrics["tinycloze:acc_original"]:
        assert metrics["tinycloze:acc_recovery"] == pytest.approx(metrics["tinycloze:acc"] / metrics["tinycloze:acc_original"])


def test_a_recipe_reports_accuracy_and_recovery(task_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from pocketlm.pipeline import Run, render_report
    from pocketlm.plugins import get_plugins
    from pocketlm.recipe import parse_recipe

    folder = save_tiny_model(tmp_path / "tiny", "llama")
    (tmp_path / "tasks").mkdir()
    for name in ("tinycloze.yaml", "tinycloze.jsonl"):
        (tmp_path / "tasks" / name).write_bytes((task_folder / name).read_bytes())
    recipe_path = tmp_path / "recipe.toml"
    recipe_path.write_text(f'[model]\nsource = "{folder}"\n[evaluate]\nmetrics = ["lm-eval"]\nper_stage = []\n'
                           '[evaluate.lm-eval]\ntasks = ["tinycloze"]\ninclude_path = "tasks"\nbatch_size = 4\n')
    plugins = get_plugins()
    recipe = parse_recipe(recipe_path.read_text(), plugins, path=recipe_path)
    report = Run(recipe, tmp_path / "run", plugins, echo=lambda m: None).execute()
    assert report["after"]["tinycloze:acc"] == report["before"]["tinycloze:acc"]
    if report["after"]["tinycloze:acc"]:
        assert report["after"]["tinycloze:acc_recovery"] == 1.0
    assert "tinycloze:acc" in render_report(report)


def test_an_unknown_task_and_a_missing_folder_are_named(task_folder, tmp_path):
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tokenizer))
    with pytest.raises(PocketError, match="lm-eval has no task 'nosuchtask'"):
        evaluate_tasks(model, LMEvalOptions(tasks=["nosuchtask"], include_path=str(task_folder)),
                       _context(tokenizer, model, task_folder))
    with pytest.raises(PocketError, match="is not a folder"):
        evaluate_tasks(model, LMEvalOptions(tasks=["tinycloze"], include_path="nowhere"),
                       _context(tokenizer, model, tmp_path))


def test_the_recipe_must_name_tasks(tmp_path):
    from pocketlm.plugins import get_plugins
    from pocketlm.recipe import parse_recipe

    with pytest.raises(PocketError) as info:
        parse_recipe('[evaluate]\nmetrics = ["lm-eval"]\n', get_plugins(), file="r.toml")
    assert "evaluate.lm-eval.tasks: required key 'tasks' is missing" in str(info.value)


def test_the_original_results_are_cached_per_original_model():
    from pocketlm_lmeval.lmeval import weights_fingerprint

    tokenizer = tiny_tokenizer()
    first = tiny_model("llama", vocab_size=len(tokenizer), seed=0)
    same = tiny_model("llama", vocab_size=len(tokenizer), seed=0)
    other = tiny_model("llama", vocab_size=len(tokenizer), seed=1)
    assert weights_fingerprint(first) == weights_fingerprint(same) != weights_fingerprint(other)
