"""A multiple-choice task written here (YAML + JSONL): lm-eval runs it offline, on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

QUESTIONS = [
    ("The river flows into the", [" sea", " piano", " seven"], 0),
    ("In 1990 the band released its first", [" album", " river", " of"], 0),
    ("She was born in", [" the", " album", " purple"], 1),
    ("The game was played on", [" Sunday", " the", " green"], 0),
    ("He studied at the University of", [" Cambridge", " water", " and"], 2),
    ("The population of the town was", [" 2", " blue", " ran"], 0),
]

TASK_YAML = """task: tinycloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: tinycloze.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tasks")
    (folder / "tinycloze.yaml").write_text(TASK_YAML)
    (folder / "tinycloze.jsonl").write_text("".join(json.dumps({"context": c, "choices": o, "label": l}) + "\n"
                                                    for c, o, l in QUESTIONS))
    return folder
