"""The pocketlm conformance kit on the ``lm-eval`` evaluator: a flat dict of finite numbers, the
model left as it was found (weights and train/eval mode), on the local task of conftest.py."""

from pocketlm.testing.conformance import check_evaluator, check_light_registration


def test_evaluator_conformance(task_folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # no teacher in the kit's context, so no original model to measure recovery against
    result = check_evaluator("lm-eval", {"tasks": ["tinycloze"], "include_path": str(task_folder), "batch_size": 4,
                                         "recovery": False})
    assert list(result) == ["tinycloze:acc"] and 0 <= result["tinycloze:acc"] <= 1


def test_registration_is_light():
    # `pocketlm validate` loads every plugin: registering this one must import no tensor library
    check_light_registration("pocketlm_lmeval")
