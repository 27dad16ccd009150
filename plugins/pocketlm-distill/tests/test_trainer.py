"""``distill``'s trainer step by step, and its files written atomically: a crash while a file is
written leaves the previous one whole, and a resume after it ends where an uninterrupted run does."""

from __future__ import annotations

import copy
import csv
import io
from pathlib import Path

import pytest
import torch
from conftest import SEQ_LEN, params_hash

from pocketlm.testing import make_context
from pocketlm.testing.models import tiny_model
from pocketlm_distill import DistillOptions, distill
from pocketlm_distill.distill import STATE_FILE, Trainer, write_correction_curve

PNG_START, PNG_END = b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"


def options(corpus, **kwargs) -> DistillOptions:
    defaults = dict(text=str(corpus["train"]), seq_len=SEQ_LEN, batch_size=2, lr=3e-3, checkpoint_every=0)
    return DistillOptions(**{**defaults, **kwargs})


def context(corpus, teacher, folder: Path):
    return make_context(None, tokenizer=corpus["tokenizer"], teacher=teacher, stage_dir=folder / "stage")


def student(corpus):
    return tiny_model("llama", vocab_size=len(corpus["tokenizer"]), seed=1)


def leftovers(folder: Path) -> list[str]:
    """Temporary files an atomic write left behind (none, whatever happened)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp"))


class _Crash(Exception):
    pass


def crash_writing(monkeypatch, name: str) -> None:
    """Every write of the bytes of ``name`` (to a temporary file or not) dies half-way through."""
    original = Path.write_bytes

    def write_bytes(self, data):
        if name in self.name:
            original(self, data[:len(data) // 2])
            raise _Crash(f"killed while writing {name}")
        return original(self, data)
    monkeypatch.setattr(Path, "write_bytes", write_bytes)


def test_a_crash_while_writing_the_curve_leaves_the_previous_curve_whole(corpus, teacher, tmp_path, monkeypatch):
    stage = tmp_path / "stage"
    distill(student(corpus), options(corpus, steps=2), context(corpus, teacher, tmp_path))
    old_csv, old_png = (stage / "loss.csv").read_bytes(), (stage / "loss.png").read_bytes()
    assert len(list(csv.DictReader(io.StringIO(old_csv.decode())))) == 2
    assert old_png.startswith(PNG_START) and old_png.endswith(PNG_END)

    with monkeypatch.context() as patch:
        crash_writing(patch, "loss.csv")
        with pytest.raises(_Crash):
            distill(student(corpus), options(corpus, steps=3), context(corpus, teacher, tmp_path))
    assert (stage / "loss.csv").read_bytes() == old_csv and (stage / "loss.png").read_bytes() == old_png
    assert leftovers(stage) == []

    with monkeypatch.context() as patch:
        crash_writing(patch, "loss.png")
        with pytest.raises(_Crash):
            distill(student(corpus), options(corpus, steps=3), context(corpus, teacher, tmp_path))
    assert (stage / "loss.png").read_bytes() == old_png   # the csv before it was written whole
    assert len(list(csv.DictReader(open(stage / "loss.csv")))) == 3
    assert leftovers(stage) == []

    distill(student(corpus), options(corpus, steps=3), context(corpus, teacher, tmp_path))
    rows = list(csv.DictReader(open(stage / "loss.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3] and all(float(r["loss"]) > 0 for r in rows)
    png = (stage / "loss.png").read_bytes()
    assert png.startswith(PNG_START) and png.endswith(PNG_END) and png != old_png
    assert leftovers(stage) == [] and sorted(p.name for p in stage.iterdir()) == ["loss.csv", "loss.png"]


def test_a_crash_while_checkpointing_keeps_the_last_state_and_the_resume_matches(corpus, teacher, tmp_path,
                                                                                  monkeypatch):
    opts = options(corpus, steps=8, checkpoint_every=3, grad_accum=2, warmup_steps=2)
    straight = student(corpus)
    distill(straight, opts, context(corpus, teacher, tmp_path / "a"))

    stage = tmp_path / "b" / "stage"
    save = torch.save

    def dies_saving_step_6(state, path, *args, **kwargs):
        if isinstance(state, dict) and state.get("step") == 6:
            Path(path).write_bytes(b"half a checkpoint")
            raise _Crash("killed while saving step 6")
        return save(state, path, *args, **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", dies_saving_step_6)
        with pytest.raises(_Crash):
            distill(student(corpus), opts, context(corpus, teacher, tmp_path / "b"))
    assert torch.load(stage / STATE_FILE, weights_only=True)["step"] == 3   # the step-3 state, whole
    assert leftovers(stage) == []

    messages = []
    ctx = context(corpus, teacher, tmp_path / "b")
    ctx.logger = messages.append
    resumed = student(corpus)
    distill(resumed, opts, ctx)
    assert any("resuming at step 3 of 8" in m for m in messages), messages
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name
    losses = [[r["loss"] for r in csv.DictReader(open(folder / "stage" / "loss.csv"))]
              for folder in (tmp_path / "a", tmp_path / "b")]
    assert losses[0] == losses[1] and len(losses[0]) == 8
    assert not (stage / STATE_FILE).exists() and leftovers(stage) == []


def test_the_trainer_steps_called_one_by_one_are_distill(corpus, teacher, tmp_path):
    opts = options(corpus, steps=4, grad_accum=2)
    whole = student(corpus)
    distill(whole, opts, context(corpus, teacher, tmp_path / "a"))

    trainer = Trainer(student(corpus), opts, context(corpus, teacher, tmp_path / "b"))
    trainer.resume()
    assert trainer.start == 0 and trainer.total == 4 and trainer.tokens_per_step == 2 * 2 * SEQ_LEN
    trainer.correct_teachers()
    trainer.prepare()
    rows = [trainer.step(step) for step in range(4)]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and [r["tokens"] for r in rows] == [256, 512, 768, 1024]
    assert rows[-1]["loss"] < rows[0]["loss"]
    model = trainer.finish()
    assert params_hash(model) == params_hash(whole)
    assert (tmp_path / "a" / "stage" / "loss.csv").read_text().splitlines()[0] == \
        (tmp_path / "b" / "stage" / "loss.csv").read_text().splitlines()[0]


def test_the_correction_curve_keeps_earlier_teachers_and_one_header(tmp_path):
    path = tmp_path / "teacher-correction.csv"
    write_correction_curve(path, 0, [2.5, 2.25])
    write_correction_curve(path, 1, [3.0])
    assert path.read_bytes() == b"teacher,step,ce\r\n0,1,2.5\r\n0,2,2.25\r\n1,1,3.0\r\n"
    write_correction_curve(path, 0, [1.5])   # a new run starts the file again
    assert path.read_bytes() == b"teacher,step,ce\r\n0,1,1.5\r\n"
    assert leftovers(tmp_path) == []
