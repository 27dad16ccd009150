"""The ``lm-eval`` evaluator: lm-evaluation-harness tasks on the model in memory.

The model is handed to lm-eval as it is (``HFLM(pretrained=model, tokenizer=...)``): quantized,
masked or restructured layers run exactly as in the pipeline, with nothing saved or reloaded.

Tasks come from lm-eval's own registry (``hellaswag``, ``arc_easy``, ...; their data sets come
from the Hugging Face Hub or its local cache) or from local task files: lm-eval's YAML with
``dataset_path: json`` and ``dataset_kwargs.data_files`` pointing at a JSONL file, in the folder
named by ``include_path``. Local files run fully offline. A relative ``data_files`` path is taken
from the YAML file's folder (lm-eval itself would take it from the current folder).

With ``recovery = true`` the original model (``context.teacher()``) is evaluated on the same
tasks once per process, and each accuracy is reported with its recovery, after / original
(llm-compressor's tests ask 95% or more).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import yaml

from pocketlm import PocketError

from .options import LMEvalOptions


class _Tagged:
    """Stands for a YAML tag (``!function utils.process_docs``) the safe loader does not run."""


class _TaskLoader(yaml.SafeLoader):
    pass


_TaskLoader.add_multi_constructor("!", lambda loader, suffix, node: _Tagged())


def _holds_tags(value) -> bool:
    if isinstance(value, _Tagged):
        return True
    if isinstance(value, dict):
        return any(_holds_tags(v) for v in value.values())
    if isinstance(value, list):
        return any(_holds_tags(v) for v in value)
    return False


def _absolute_files(files, folder: Path):
    """``data_files`` (a path, a list, or split -> path/list) with relative paths taken from ``folder``."""
    if isinstance(files, dict):
        return {split: _absolute_files(value, folder) for split, value in files.items()}
    if isinstance(files, list):
        return [_absolute_files(value, folder) for value in files]
    path = Path(files).expanduser()
    return str(path if path.is_absolute() else (folder / path).resolve())


def local_task_configs(include_path: Path) -> dict[str, dict]:
    """Self-contained task configs in ``include_path`` (task name -> config dict), their
    ``data_files`` made absolute. Files that hold tags, ``include`` another file or define
    groups are left to lm-eval's own TaskManager (which then reads ``data_files`` from the
    current folder)."""
    configs = {}
    for path in sorted(Path(include_path).rglob("*.yaml")):
        try:
            config = yaml.load(path.read_text(encoding="utf-8"), Loader=_TaskLoader)
        except yaml.YAMLError:
            continue
        if not isinstance(config, dict) or not isinstance(config.get("task"), str):
            continue
        if _holds_tags(config) or "include" in config or "group" in config:
            continue
        files = (config.get("dataset_kwargs") or {}).get("data_files")
        if files is not None:
            config = {**config, "dataset_kwargs": {**config["dataset_kwargs"],
                                                   "data_files": _absolute_files(files, path.parent)}}
        configs[config["task"]] = config
    return configs


def task_metrics(results: dict, tasks: list[str]) -> dict[str, float]:
    """``{"task:acc": ..., "task:acc_norm": ...}`` from lm-eval's results: every numeric metric
    of the default filter, without standard errors."""
    metrics: dict[str, float] = {}
    for task in tasks:
        for key, value in results["results"].get(task, {}).items():
            name, _, filter_name = key.partition(",")
            if filter_name != "none" or name.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            metrics[f"{task}:{name}"] = float(value)
    return metrics


def _task_specs(options: LMEvalOptions, base: Path | None):
    """What to hand lm-eval: config dicts for self-contained local tasks, names for the rest,
    and a TaskManager that knows ``include_path``."""
    from lm_eval.tasks import TaskManager

    include = None
    if options.include_path:
        include = Path(options.include_path).expanduser()
        include = include if include.is_absolute() or base is None else base / include
        if not include.is_dir():
            raise PocketError(f"lm-eval include_path {include} is not a folder", field="evaluate.lm-eval.include_path",
                              fix="give the folder that holds your task YAML files")
    local = local_task_configs(include) if include else {}
    manager = TaskManager(include_path=str(include) if include else None)
    specs: list[Any] = []
    for task in options.tasks:
        if task in local:
            specs.append(local[task])
        elif task in manager.all_tasks:
            specs.append(task)
        else:
            raise PocketError(f"lm-eval has no task {task!r}", field="evaluate.lm-eval.tasks",
                              fix="name a task from `lm-eval ls tasks`, or put its YAML in the folder "
                              "include_path names" + (f" ({include})" if include else ""))
    return specs, manager


def run_tasks(model, tokenizer, options: LMEvalOptions, base: Path | None) -> dict[str, float]:
    """Evaluate ``model`` in memory on ``options.tasks``; numeric metrics by ``task:name``."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    specs, manager = _task_specs(options, base)
    was_training = model.training
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=options.batch_size)
    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=specs, task_manager=manager, num_fewshot=options.num_fewshot,
                                          limit=options.limit, log_samples=False, bootstrap_iters=0,
                                          verbosity="ERROR")
    except (ConnectionError, OSError) as exc:
        raise PocketError(f"lm-eval could not read a task's data set: {type(exc).__name__}: {str(exc)[:300]}",
                          field="evaluate.lm-eval.tasks", exit_code=1,
                          fix="registry tasks read their data set from the Hugging Face Hub: fetch it once while "
                          "online (it is cached), or use a local task file (dataset_path: json) in include_path") from None
    finally:
        model.train(was_training)
    return task_metrics(results, options.tasks)


_ORIGINAL: dict[str, dict[str, float]] = {}  # the original model's results, once per process


def weights_fingerprint(model) -> str:
    """A digest of a model's parameters (names, shapes and sums): two different originals
    (two models compressed from one notebook) never share cached results."""
    import torch

    digest = hashlib.sha256()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            digest.update(f"{name}{tuple(parameter.shape)}".encode())
            digest.update(parameter.detach().double().sum().cpu().numpy().tobytes())
    return digest.hexdigest()


def _original_key(options: LMEvalOptions, original, base: Path | None) -> str:
    return json.dumps({"weights": weights_fingerprint(original), "base": str(base),
                       "options": options.model_dump(mode="json")}, sort_keys=True)


def evaluate_tasks(model, options: LMEvalOptions, context) -> dict[str, float]:
    """Accuracy (``task:acc``, ``task:acc_norm``) and, with ``recovery``, the original model's
    (``task:acc_original``) and their ratio (``task:acc_recovery``)."""
    recipe = context.recipe or {}
    base = Path(recipe["_base"]) if recipe.get("_base") else None
    metrics = run_tasks(model, context.tokenizer, options, base)
    if not options.recovery:
        return metrics
    original_model = context.teacher()
    key = _original_key(options, original_model, base)
    if key not in _ORIGINAL:
        context.log("lm-eval: evaluating the original model for the recovery")
        _ORIGINAL[key] = run_tasks(original_model, context.tokenizer, options, base)
    original = _ORIGINAL[key]
    for name in list(metrics):
        if name.endswith((":acc", ":acc_norm")) and name in original:
            metrics[name + "_original"] = original[name]
            metrics[name + "_recovery"] = metrics[name] / original[name] if original[name] else math.nan
    return metrics
