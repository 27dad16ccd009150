"""Tests of ``distill`` on a tiny llama trained on real text (see conftest.py)."""

from __future__ import annotations

import copy
import csv
import importlib
import math
import multiprocessing
import os
from pathlib import Path

import pytest
import torch
from conftest import SEQ_LEN, kl_to, params_hash, perplexity
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from pocketlm import LoadedModel, Progress
from pocketlm.plugins import get_plugins
from pocketlm.testing import free_port, make_context
from pocketlm.testing.models import tiny_model
from pocketlm.weights import QuantizedLinear, get_mask, linear_weight, masks, minmax_grid, quantize, set_mask
from pocketlm.modules import select_linears, set_module
from pocketlm_distill import DistillOptions, distill, kd_loss, lr_factor
from pocketlm_distill.distill import (
    GENERATED_FILE,
    STATE_FILE,
    TEACHER_FILE,
    batch_order,
    ce_loss,
    correct_teacher,
    load_corrected,
    sample_windows,
    save_corrected,
)

def options(corpus, **kwargs) -> DistillOptions:
    defaults = dict(text=str(corpus["train"]), seq_len=SEQ_LEN, batch_size=4, lr=3e-3, checkpoint_every=0)
    return DistillOptions(**{**defaults, **kwargs})


def context(corpus, teacher, tmp_path, **kwargs):
    return make_context(None, tokenizer=corpus["tokenizer"], teacher=teacher, stage_dir=tmp_path / "stage", **kwargs)


def magnitude_prune(model, sparsity):
    """Unstructured magnitude pruning of every linear, the head included (in this tiny model
    the head carries most of what the teacher learned, so pruning it is what hurts)."""
    for name, module in select_linears(model, ["*"], []).items():
        weight = linear_weight(module)
        k = int(weight.numel() * sparsity)
        threshold = weight.abs().flatten().kthvalue(k).values
        set_mask(module, weight.abs() > threshold)


# ------------------------------------------------------------------------------ registration


def test_registered():
    method = get_plugins().methods["distill"]
    assert method.kind == "distill" and method.needs_calibration and method.phase == 20
    assert method.effect(options_for_effect()).params_removed == 0.0


def options_for_effect():
    return DistillOptions(steps=1)


def test_options_validation():
    with pytest.raises(ValidationError):
        DistillOptions()  # neither steps nor tokens
    with pytest.raises(ValidationError):
        DistillOptions(steps=10, tokens=1000)
    with pytest.raises(ValidationError):
        DistillOptions(steps=10, teacher="a", teachers=["b"])
    with pytest.raises(ValidationError):
        DistillOptions(steps=10, hidden_weight=1.0)  # no layer_map
    with pytest.raises(ValidationError):
        DistillOptions(steps=10, kl_weight=0.0)
    with pytest.raises(ValidationError):
        DistillOptions(steps=10, bogus=1)
    with pytest.raises(ValidationError, match="give generated_windows too"):
        DistillOptions(steps=10, generated_only=True)
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        DistillOptions(steps=10, generated_windows=-1)
    with pytest.raises(ValidationError, match="less than 1"):
        DistillOptions(steps=10, average_last=1.0)   # the whole run's mean would start from untrained values
    with pytest.raises(ValidationError, match="'no', 'bf16' or 'auto'"):
        DistillOptions(steps=10, mixed_precision="fp16")


def test_teacher_correction_options():
    assert DistillOptions(steps=1).teacher_correction_steps == 0  # off by default
    with pytest.raises(ValidationError, match="teacher_correction_steps"):
        DistillOptions(steps=10, teacher_correction_steps=-1)
    with pytest.raises(ValidationError, match="teacher_correction_steps.*no teacher"):
        DistillOptions(steps=10, kl_weight=0.0, ce_weight=1.0, teacher_correction_steps=5)
    with pytest.raises(ValidationError, match="teacher_correction_lr"):
        DistillOptions(steps=10, teacher_correction_steps=5, teacher_correction_lr=0.0)
    # a teacher used through the hidden-state loss alone can be corrected
    DistillOptions(steps=10, kl_weight=0.0, hidden_weight=1.0, layer_map={"0": 0}, teacher_correction_steps=5)


# ------------------------------------------------------------------------------ pure functions


def test_kd_loss_matches_definition():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    T = 2.0
    p = torch.softmax(t / T, -1)
    expected = (p * (p.log() - torch.log_softmax(s / T, -1))).sum(-1).mean() * T**2
    assert torch.allclose(kd_loss(s, [t], T), expected, atol=1e-6)
    assert kd_loss(t, [t], 1.0).abs() < 1e-6
    # two identical teachers average to the same distribution; two different ones to their mean
    assert torch.allclose(kd_loss(s, [t, t.clone()], T), expected, atol=1e-5)
    u = torch.randn(2, 5, 11)
    mean = (torch.softmax(t, -1) + torch.softmax(u, -1)) / 2
    expected2 = (mean * (mean.log() - torch.log_softmax(s, -1))).sum(-1).mean()
    assert torch.allclose(kd_loss(s, [t, u], 1.0), expected2, atol=1e-5)


def test_schedule_and_order():
    factors = [lr_factor(step, 4, 20, 0.1) for step in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(factors[3:], factors[4:]))
    assert math.isclose(lr_factor(20, 4, 20, 0.1), 0.1)
    order = batch_order(10, 4, 5, seed=3)
    assert order == batch_order(10, 4, 5, seed=3) and order != batch_order(10, 4, 5, seed=4)
    flat = sum(order, [])
    assert sorted(flat[:10]) == list(range(10))  # every window once per epoch


# ------------------------------------------------------------------------------ behaviour


def test_lowers_kl_and_leaves_teacher_untouched(corpus, teacher, tmp_path):
    student = tiny_model("llama", vocab_size=len(corpus["tokenizer"]), seed=1)
    held = corpus["held"]
    before = kl_to(teacher, student, held)
    teacher_hash = params_hash(teacher)
    ctx = context(corpus, teacher, tmp_path)
    ctx.progress = _Recorder()
    result = distill(student, options(corpus, steps=15), ctx)
    assert result is student
    assert ctx.progress.tasks == [("distill", 15)] and len(ctx.progress.fields) == 15
    assert all(f["loss"] > 0 and f["tokens_per_s"] > 0 for f in ctx.progress.fields)
    after = kl_to(teacher, student, held)
    assert after < 0.5 * before, (before, after)
    assert params_hash(teacher) == teacher_hash
    assert all(not p.requires_grad for p in teacher.parameters())
    rows = list(csv.DictReader(open(tmp_path / "stage" / "loss.csv")))
    assert [int(r["step"]) for r in rows] == list(range(1, 16))
    assert float(rows[-1]["kl"]) < float(rows[0]["kl"])
    assert int(rows[-1]["tokens"]) == 15 * 4 * SEQ_LEN
    assert (tmp_path / "stage" / "loss.png").stat().st_size > 1000
    assert not (tmp_path / "stage" / STATE_FILE).exists()  # resume state dropped once done


def test_bf16_mixed_precision_trains_in_bfloat16_and_keeps_float32_parameters(corpus, teacher, tmp_path,
                                                                               monkeypatch):
    distill_module = importlib.import_module("pocketlm_distill.distill")   # the package's name is the function
    seen = []   # the dtype of every teacher and student logits of the run's loss
    kd = distill_module.kd_loss
    monkeypatch.setattr(distill_module, "kd_loss", lambda s, t, temperature: seen.append(
        (s.dtype, t[0].dtype)) or kd(s, t, temperature))
    held = corpus["held"]
    runs = {}
    for precision in ("no", "bf16"):
        student = tiny_model("llama", vocab_size=len(corpus["tokenizer"]), seed=1)
        before = kl_to(teacher, student, held)
        distill(student, options(corpus, steps=15, mixed_precision=precision), context(corpus, teacher,
                                                                                    tmp_path / precision))
        runs[precision] = student
        assert kl_to(teacher, student, held) < 0.5 * before, precision
        assert all(p.dtype == torch.float32 for p in student.parameters())
    assert seen[:15] == [(torch.float32, torch.float32)] * 15
    assert seen[15:] == [(torch.bfloat16, torch.bfloat16)] * 15
    # the same steps in another precision: close, not equal
    assert params_hash(runs["no"]) != params_hash(runs["bf16"])
    assert abs(kl_to(teacher, runs["no"], held) - kl_to(teacher, runs["bf16"], held)) < 0.1


@pytest.mark.parametrize("native", [True, False])
def test_auto_mixed_precision_is_bf16_where_the_device_multiplies_it_natively(corpus, teacher, tmp_path,
                                                                              monkeypatch, native):
    distill_module = importlib.import_module("pocketlm_distill.distill")
    monkeypatch.setattr(distill_module, "bfloat16_is_native", lambda device: native)
    seen = []
    kd = distill_module.kd_loss
    monkeypatch.setattr(distill_module, "kd_loss", lambda s, t, temperature: seen.append(s.dtype)
                        or kd(s, t, temperature))
    messages = []
    ctx = context(corpus, teacher, tmp_path)
    ctx.logger = messages.append
    student = tiny_model("llama", vocab_size=len(corpus["tokenizer"]), seed=1)
    distill(student, options(corpus, steps=2, mixed_precision="auto"), ctx)
    assert seen == [torch.bfloat16 if native else torch.float32] * 2
    line = next(m for m in messages if m.startswith("distill: 2 steps"))
    assert line.endswith("on 1 process(es) in bf16") == native and line.endswith("on 1 process(es)") != native


def test_bfloat16_is_native_on_gpus_that_support_it_and_cpus_with_amx(monkeypatch):
    distill_module = importlib.import_module("pocketlm_distill.distill")
    for amx in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
        assert distill_module.bfloat16_is_native(torch.device("cpu")) is amx
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")  # a torch without the probe: float32
    assert distill_module.bfloat16_is_native(torch.device("cpu")) is False
    assert distill_module.bfloat16_is_native(torch.device("meta")) is False
    if torch.cuda.is_available():
        assert distill_module.bfloat16_is_native(torch.device("cuda")) is torch.cuda.is_bf16_supported()


def test_recovers_pruned_perplexity_and_keeps_masks(corpus, teacher, tmp_path):
    held = corpus["held"]
    student = copy.deepcopy(teacher)
    magnitude_prune(student, 0.7)
    kept = {name: mask.clone() for name, mask in masks(student).items()}
    assert len(kept) == 15  # 7 linears x 2 layers + the head
    teacher_ppl, pruned_ppl = perplexity(teacher, held), perplexity(student, held)
    assert pruned_ppl > teacher_ppl * 1.1, (teacher_ppl, pruned_ppl)
    distill(student, options(corpus, steps=20, lr=2e-3), context(corpus, teacher, tmp_path))
    distilled_ppl = perplexity(student, held)
    # at least half of the perplexity lost to pruning comes back, on text it never saw
    assert distilled_ppl < pruned_ppl - (pruned_ppl - teacher_ppl) / 2, (teacher_ppl, pruned_ppl, distilled_ppl)
    now = masks(student)
    assert set(now) == set(kept)
    for name, mask in kept.items():
        assert torch.equal(now[name], mask)
        weight = linear_weight(student.get_submodule(name))
        assert torch.count_nonzero(weight[~mask]) == 0
        assert torch.count_nonzero(weight[mask]) == mask.sum()  # the kept weights still train


class _Recorder(Progress):
    def __init__(self):
        self.tasks, self.fields = [], []

    def task(self, description, total):
        import contextlib

        self.tasks.append((description, total))

        @contextlib.contextmanager
        def run():
            yield lambda steps=1, **fields: self.fields.append(fields)
        return run()


class _Killed(Exception):
    pass


class _KillAfter(Progress):
    """A progress reporter that 'kills' the run after ``steps`` optimizer steps."""

    def __init__(self, steps):
        self.steps = steps

    def task(self, description, total):
        import contextlib

        @contextlib.contextmanager
        def run():
            done = [0]

            def advance(steps=1, **fields):
                done[0] += steps
                if done[0] >= self.steps:
                    raise _Killed()
            yield advance
        return run()


def test_tail_average_ends_at_the_mean_of_the_last_steps_and_resumes_exactly(corpus, teacher, tmp_path,
                                                                             monkeypatch):
    from pocketlm_distill.distill import Trainer

    base = tiny_model("llama", vocab_size=len(corpus["tokenizer"]), seed=1)
    opts = options(corpus, steps=8, checkpoint_every=3, warmup_steps=2, average_last=0.5)  # steps 5 to 8
    after_each_step = []
    one_step = Trainer.step

    def recorded(self, step):
        row = one_step(self, step)
        after_each_step.append({name: p.detach().clone() for name, p in self.student.model.named_parameters()})
        return row

    monkeypatch.setattr(Trainer, "step", recorded)
    averaged = copy.deepcopy(base)
    distill(averaged, opts, context(corpus, teacher, tmp_path / "a"))
    monkeypatch.undo()
    assert len(after_each_step) == 8
    for name, parameter in averaged.named_parameters():
        mean = torch.stack([values[name] for values in after_each_step[4:]]).mean(0)
        assert torch.allclose(parameter, mean, atol=1e-6, rtol=0), name
    weight = "model.layers.0.mlp.up_proj.weight"
    assert not torch.allclose(dict(averaged.named_parameters())[weight], after_each_step[-1][weight])

    ctx = context(corpus, teacher, tmp_path / "b")
    ctx.progress = _KillAfter(7)  # dies after step 7: the last checkpoint holds step 6, two steps into the tail
    with pytest.raises(_Killed):
        distill(copy.deepcopy(base), opts, ctx)
    assert len(torch.load(tmp_path / "b" / "stage" / STATE_FILE, weights_only=True)["average"]) > 0
    resumed = copy.deepcopy(base)
    distill(resumed, opts, context(corpus, teacher, tmp_path / "b"))
    for (name, a), (_, b) in zip(averaged.state_dict().items(), resumed.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name


def test_resume_equals_uninterrupted(corpus, teacher, tmp_path):
    base = tiny_model("llama", vocab_size=len(corpus["tokenizer"]), seed=1)
    opts = options(corpus, steps=8, checkpoint_every=3, grad_accum=2, batch_size=2, warmup_steps=2)

    straight = copy.deepcopy(base)
    distill(straight, opts, context(corpus, teacher, tmp_path / "a"))

    killed = copy.deepcopy(base)
    ctx = context(corpus, teacher, tmp_path / "b")
    ctx.progress = _KillAfter(5)  # dies after step 5: the last checkpoint holds step 3
    with pytest.raises(_Killed):
        distill(killed, opts, ctx)
    state = torch.load(tmp_path / "b" / "stage" / STATE_FILE, weights_only=True)
    assert state["step"] == 3
    messages = []
    resumed = copy.deepcopy(base)  # the pipeline restarts from the previous stage's output
    ctx = context(corpus, teacher, tmp_path / "b")
    ctx.logger = messages.append
    distill(resumed, opts, ctx)
    assert any("resuming at step 3" in m for m in messages)
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name
    assert not torch.equal(straight.state_dict()["model.layers.0.mlp.up_proj.weight"],
                           base.state_dict()["model.layers.0.mlp.up_proj.weight"])
    losses_a = [r["loss"] for r in csv.DictReader(open(tmp_path / "a" / "stage" / "loss.csv"))]
    losses_b = [r["loss"] for r in csv.DictReader(open(tmp_path / "b" / "stage" / "loss.csv"))]
    assert losses_a == losses_b and len(losses_a) == 8


def test_stale_checkpoint_with_other_options_is_ignored(corpus, teacher, tmp_path):
    student = tiny_model("llama", vocab_size=len(corpus["tokenizer"]), seed=1)
    ctx = context(corpus, teacher, tmp_path)
    ctx.progress = _KillAfter(2)
    with pytest.raises(_Killed):
        distill(copy.deepcopy(student), options(corpus, steps=4, checkpoint_every=2), ctx)
    messages = []
    ctx = context(corpus, teacher, tmp_path)
    ctx.logger = messages.append
    distill(student, options(corpus, steps=3, checkpoint_every=2, lr=1e-3), ctx)
    assert any("ignoring" in m for m in messages)
    assert len(list(csv.DictReader(open(tmp_path / "stage" / "loss.csv")))) == 3


def test_token_budget_and_grad_accum(corpus, teacher, tmp_path):
    student = tiny_model("llama", vocab_size=len(corpus["tokenizer"]), seed=1)
    # 5 steps of 2 x 2 windows of 64 tokens = 1280 tokens; 1100 rounds up to 5 steps
    distill(student, options(corpus, tokens=1100, batch_size=2, grad_accum=2), context(corpus, teacher, tmp_path))
    rows = list(csv.DictReader(open(tmp_path / "stage" / "loss.csv")))
    assert len(rows) == 5 and int(rows[-1]["tokens"]) == 1280


def test_grad_accum_equals_larger_batch(corpus, teacher, tmp_path):
    """4 windows in one micro-batch and 2 x 2 accumulated give the same update."""
    base = tiny_model("llama", vocab_size=len(corpus["tokenizer"]), seed=1)
    one, two = copy.deepcopy(base), copy.deepcopy(base)
    distill(one, options(corpus, steps=3, batch_size=4, ce_weight=0.5), context(corpus, teacher, tmp_path / "a"))
    # the same windows: batch_order draws the same flat sequence for both layouts
    distill(two, options(corpus, steps=3, batch_size=2, grad_accum=2, ce_weight=0.5),
            context(corpus, teacher, tmp_path / "b"))
    for (name, a), (_, b) in zip(one.state_dict().items(), two.state_dict().items()):
        assert torch.allclose(a, b, atol=2e-5, rtol=1e-4), name


def _quantize_linears(model, bits=4, group=32):
    for name, module in select_linears(model, ["*"], ["lm_head"]).items():
        weight = linear_weight(module)
        out, cols = weight.shape
        grouped = weight.reshape(out * cols // group, group)
        scale, zero = minmax_grid(grouped, bits, symmetric=False)
        q = quantize(grouped, scale, zero, bits).reshape(out, cols)
        new = QuantizedLinear.from_grid(q.to(torch.int64), scale.reshape(out, -1), zero.reshape(out, -1),
                                        bits=bits, group_size=group, symmetric=False)
        set_module(model, name, new)


def test_quantized_layers_train_on_their_own_grid(corpus, teacher, tmp_path):
    held = corpus["held"]
    student = copy.deepcopy(teacher)
    _quantize_linears(student, bits=2)
    down = student.model.layers[0].mlp.down_proj
    grid_mask = torch.rand(down.out_features, down.in_features, generator=torch.Generator().manual_seed(0)) > 0.5
    set_mask(down, grid_mask)  # a masked quantized layer: its pruned weights must stay exact zeros
    with torch.no_grad():  # the grid point of a zero weight: dequantizes to exactly zero
        q = down.storage.grid().long()
        q[~grid_mask] = down.storage.zeros.long()[:, down.storage.column_groups()][~grid_mask]
        down.storage.set_grid(q, down.storage.scales.clone(), down.storage.zeros.clone())
    frozen = copy.deepcopy(student)
    before = {n: (m.storage.qweight.clone(), m.storage.scales.clone(), m.storage.zeros.clone())
              for n, m in student.named_modules() if isinstance(m, QuantizedLinear)}
    kl_before = kl_to(teacher, student, held)
    distill(student, options(corpus, steps=12, lr=1e-2), context(corpus, teacher, tmp_path / "ste"))
    changed = 0
    for name, module in student.named_modules():
        if isinstance(module, QuantizedLinear):
            qweight, scales, zeros = before.pop(name)
            assert torch.equal(module.storage.scales, scales) and torch.equal(module.storage.zeros, zeros)
            changed += int(not torch.equal(module.storage.qweight, qweight))
    assert not before and changed >= 10  # every layer is still a grid on the same scales, most moved
    assert torch.equal(get_mask(down), grid_mask)
    assert torch.count_nonzero(down.dequantize()[~grid_mask]) == 0
    assert kl_to(teacher, student, held) < 0.9 * kl_before

    frozen_grids = {n: m.storage.qweight.clone() for n, m in frozen.named_modules() if isinstance(m, QuantizedLinear)}
    distill(frozen, options(corpus, steps=3, lr=1e-2, quantized="freeze"), context(corpus, teacher, tmp_path / "fz"))
    for name, module in frozen.named_modules():
        if isinstance(module, QuantizedLinear):
            assert torch.equal(module.storage.qweight, frozen_grids.pop(name))
    assert not frozen_grids


def test_hidden_state_loss_with_projection(corpus, teacher, tmp_path):
    """A narrower, shallower student: its layer 0 is mapped to the teacher's layer 1 through a
    learned projection, which trains but is not added to the model."""
    student = tiny_model("llama", vocab_size=len(corpus["tokenizer"]), seed=2, hidden=32, layers=1,
                         intermediate=64, heads=2, kv_heads=1)
    names = set(student.state_dict())
    opts = options(corpus, steps=15, hidden_weight=1.0, layer_map={"0": 1})
    distill(student, opts, context(corpus, teacher, tmp_path))
    rows = list(csv.DictReader(open(tmp_path / "stage" / "loss.csv")))
    assert float(rows[-1]["hidden"]) < 0.7 * float(rows[0]["hidden"])
    assert float(rows[-1]["kl"]) < float(rows[0]["kl"])
    assert set(student.state_dict()) == names


def test_multi_teacher_averages(corpus, teacher, tmp_path):
    second = copy.deepcopy(teacher)
    with torch.no_grad():
        second.lm_head.weight.mul_(-1.0)  # a very different second teacher
    sources = {"one": teacher, "two": second}
    student = tiny_model("llama", vocab_size=len(corpus["tokenizer"]), seed=1)
    ctx = context(corpus, None, tmp_path)
    ctx.model_loader = lambda source: LoadedModel(sources[source], None, source)
    distill(student, options(corpus, steps=12, teachers=["one", "two"]), ctx)
    held = corpus["held"]
    with torch.no_grad():
        p = (torch.softmax(teacher(input_ids=held).logits, -1) + torch.softmax(second(input_ids=held).logits, -1)) / 2
        q = torch.log_softmax(student(input_ids=held).logits, -1)
    to_mean = (p * (p.log() - q)).sum(-1).mean().item()
    # it learned the average, not either teacher alone
    assert to_mean < kl_to(teacher, student, held) and to_mean < kl_to(second, student, held)


# ------------------------------------------------------------------------------ teacher correction


def _accelerator():
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    return Accelerator(dataloader_config=DataLoaderConfiguration(split_batches=True))


@torch.no_grad()
def _ce(model, windows) -> float:
    return ce_loss(model(input_ids=windows, use_cache=False).logits, windows).item()


def test_correction_lowers_teacher_ce_on_the_student_batches(corpus, teacher):
    windows = corpus["train_windows"]
    opts = options(corpus, steps=10, teacher_correction_steps=8)
    teacher_hash = params_hash(teacher)
    accelerator = _accelerator()
    corrected, history = correct_teacher(teacher, windows, opts, seed=0, accelerator=accelerator)
    accelerator.free_memory()
    assert corrected is not teacher and len(history) == 8
    assert not corrected.training and all(not p.requires_grad for p in corrected.parameters())
    # the windows the student's first 8 steps see, in that order, are the ones corrected on
    seen = windows[sorted(set(sum(batch_order(windows.shape[0], 4, 8, seed=0), [])))]
    before, after = _ce(teacher, seen), _ce(corrected, seen)
    assert after < before - 0.05, (before, after)
    assert params_hash(teacher) == teacher_hash  # bit-identical
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training


def test_corrected_teacher_is_used_and_original_untouched(corpus, teacher, tmp_path):
    base = tiny_model("llama", vocab_size=len(corpus["tokenizer"]), seed=1)
    teacher_hash = params_hash(teacher)
    plain, corrected = copy.deepcopy(base), copy.deepcopy(base)
    distill(plain, options(corpus, steps=3), context(corpus, teacher, tmp_path / "a"))
    messages = []
    ctx = context(corpus, teacher, tmp_path / "b")
    ctx.logger = messages.append
    distill(corrected, options(corpus, steps=3, teacher_correction_steps=6, checkpoint_every=2), ctx)
    assert params_hash(teacher) == teacher_hash
    assert all(not p.requires_grad for p in teacher.parameters())
    assert any("teacher correction: 6 steps, CE" in m for m in messages), messages
    rows = list(csv.DictReader(open(tmp_path / "b" / "stage" / "teacher-correction.csv")))
    assert [int(r["step"]) for r in rows] == list(range(1, 7)) and float(rows[-1]["ce"]) < float(rows[0]["ce"])
    assert not (tmp_path / "b" / "stage" / TEACHER_FILE.format(0)).exists()  # dropped once done
    # a different teacher gave a different student
    name = "model.layers.0.mlp.up_proj.weight"
    assert (plain.state_dict()[name] - corrected.state_dict()[name]).abs().max() > 1e-5


def test_corrected_teacher_file_keeps_tied_weights(corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    from pocketlm.testing.models import tiny_config

    config = tiny_config("llama", vocab_size=len(corpus["tokenizer"]))
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    tied = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    accelerator = _accelerator()
    corrected, _ = correct_teacher(tied, corpus["train_windows"], options(corpus, steps=2, teacher_correction_steps=2),
                                   seed=0, accelerator=accelerator)
    accelerator.free_memory()
    path = tmp_path / "t.safetensors"
    save_corrected(corrected, path, "abc")
    assert load_corrected(tied, path, "other") is None  # written with other options
    loaded = load_corrected(tied, path, "abc")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    for (name, a), (_, b) in zip(corrected.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert not torch.equal(loaded.model.embed_tokens.weight, tied.model.embed_tokens.weight)


def test_resume_with_teacher_correction_equals_uninterrupted(corpus, teacher, tmp_path):
    base = tiny_model("llama", vocab_size=len(corpus["tokenizer"]), seed=1)
    opts = options(corpus, steps=8, checkpoint_every=3, grad_accum=2, batch_size=2, warmup_steps=2,
                   teacher_correction_steps=4)

    straight = copy.deepcopy(base)
    distill(straight, opts, context(corpus, teacher, tmp_path / "a"))

    killed = copy.deepcopy(base)
    ctx = context(corpus, teacher, tmp_path / "b")
    ctx.progress = _KillAfter(5)
    with pytest.raises(_Killed):
        distill(killed, opts, ctx)
    stage = tmp_path / "b" / "stage"
    assert torch.load(stage / STATE_FILE, weights_only=True)["step"] == 3
    assert (stage / TEACHER_FILE.format(0)).is_file()
    messages = []
    resumed = copy.deepcopy(base)
    ctx = context(corpus, teacher, tmp_path / "b")
    ctx.logger = messages.append
    distill(resumed, opts, ctx)
    assert any("resuming at step 3" in m for m in messages)
    assert any("teacher correction: loaded teacher 0" in m for m in messages)  # not retrained
    assert not any("teacher correction: 4 steps" in m for m in messages)
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name
    losses_a = [r["loss"] for r in csv.DictReader(open(tmp_path / "a" / "stage" / "loss.csv"))]
    losses_b = [r["loss"] for r in csv.DictReader(open(stage / "loss.csv"))]
    assert losses_a == losses_b and len(losses_a) == 8
    assert not (stage / STATE_FILE).exists() and not (stage / TEACHER_FILE.format(0)).exists()


# ------------------------------------------------------------------------------ text the teacher writes


@torch.no_grad()
def test_sampled_windows_follow_the_teachers_own_distribution(corpus, teacher):
    # sampling at temperature 1: a sampled token's expected surprise is the distribution's entropy,
    # where greedy decoding (or any sharpened sampling) would land far below it
    windows = sample_windows(teacher, 12, SEQ_LEN, vocabulary=len(corpus["tokenizer"]), seed=0, batch=5)
    assert windows.shape == (12, SEQ_LEN) and windows.dtype == torch.long
    assert torch.equal(windows, sample_windows(teacher, 12, SEQ_LEN, len(corpus["tokenizer"]), seed=0, batch=5))
    assert not torch.equal(windows, sample_windows(teacher, 12, SEQ_LEN, len(corpus["tokenizer"]), seed=1, batch=5))
    assert len(set(windows[:, 0].tolist())) > 8   # first tokens drawn from the whole vocabulary
    log_p = torch.log_softmax(teacher(input_ids=windows, use_cache=False).logits[:, :-1].double(), -1)
    surprise = -log_p.gather(-1, windows[:, 1:, None]).mean().item()
    entropy = -(log_p.exp() * log_p).sum(-1).mean().item()
    assert abs(surprise - entropy) < 0.1 * entropy, (surprise, entropy)
    greedy = log_p.argmax(-1) == windows[:, 1:]
    assert greedy.float().mean() < 0.9


def test_trains_on_generated_windows_and_a_resumed_run_reuses_them(corpus, teacher, tmp_path):
    held = corpus["held"]
    student = tiny_model("llama", vocab_size=len(corpus["tokenizer"]), seed=1)
    before = kl_to(teacher, student, held)
    messages = []
    ctx = context(corpus, teacher, tmp_path)
    ctx.logger = messages.append
    # data-free: no text at all, only windows the teacher wrote; the KL on real held-out text still falls
    distill(student, options(corpus, steps=12, generated_windows=8, generated_only=True), ctx)
    assert kl_to(teacher, student, held) < 0.7 * before
    assert any("the teacher wrote 8 windows of 64 tokens" in m for m in messages)
    saved = load_file(str(tmp_path / "stage" / GENERATED_FILE))["windows"]
    assert saved.shape == (8, SEQ_LEN)
    # the same settings again (a resumed or repeated stage): read back, not sampled
    messages.clear()
    again = tiny_model("llama", vocab_size=len(corpus["tokenizer"]), seed=1)
    distill(again, options(corpus, steps=12, generated_windows=8, generated_only=True), ctx)
    assert any("reusing the 8 generated windows" in m for m in messages)
    assert params_hash(again) == params_hash(student)
    # other settings (another seed): sampled anew
    messages.clear()
    distill(tiny_model("llama", vocab_size=len(corpus["tokenizer"]), seed=1),
            options(corpus, steps=2, generated_windows=8, generated_only=True, seed=5), ctx)
    assert any("the teacher wrote 8 windows" in m for m in messages)


def test_generated_windows_follow_the_texts_windows(corpus, teacher, tmp_path, monkeypatch):
    from pocketlm_distill.distill import Trainer

    seen = {}
    real = Trainer._setup_data

    def spy(self, model):
        real(self, model)
        seen["windows"] = self.windows

    monkeypatch.setattr(Trainer, "_setup_data", spy)
    student = tiny_model("llama", vocab_size=len(corpus["tokenizer"]), seed=1)
    distill(student, options(corpus, steps=1, generated_windows=3), context(corpus, teacher, tmp_path))
    text = corpus["train_windows"]
    assert torch.equal(seen["windows"][:len(text)], text)
    assert torch.equal(seen["windows"][len(text):], load_file(str(tmp_path / "stage" / GENERATED_FILE))["windows"])


def test_generated_windows_need_a_causal_teacher(corpus, tmp_path):
    from pocketlm import PocketError

    student = tiny_model("llama", vocab_size=len(corpus["tokenizer"]), seed=1)
    with pytest.raises(PocketError, match="uses no teacher"):
        distill(student, options(corpus, steps=2, kl_weight=0.0, ce_weight=1.0, generated_windows=2),
                context(corpus, None, tmp_path))


# ------------------------------------------------------------------------------ accelerate, 2 processes


def _rank(rank, port, student, teacher, windows, opts, out):
    """One of 2 forked processes: the environment ``torchrun``/``accelerate launch --cpu`` sets."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)  # forget the parent's 1-process state
    GradientState._reset_state()
    messages = []
    context = make_context(windows, teacher=teacher)
    context.logger = messages.append
    distill(student, opts, context)
    state = PartialState()
    if state.num_processes != 2 or torch.distributed.get_backend() != "gloo":
        raise SystemExit(3)
    if not any("on 2 process(es)" in m for m in messages):
        raise SystemExit(4)
    if opts.teacher_correction_steps and not any("teacher correction: 2 steps" in m for m in messages):
        raise SystemExit(5)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in student.state_dict().items()}, out)


@pytest.mark.parametrize("correction,generated", [(0, 0), (2, 0), (0, 6)])
def test_two_processes_match_one(corpus, teacher, tmp_path, correction, generated):
    """The same global batch on 2 gloo CPU processes (DDP through accelerate) and on 1.

    The processes are forked from this one (no second import of torch and transformers);
    each sets the environment a launcher sets and runs ``distill`` unchanged."""
    student = tiny_model("llama", vocab_size=len(corpus["tokenizer"]), seed=1)
    windows = corpus["train_windows"][:64].contiguous()
    opts = DistillOptions(steps=4, batch_size=4, grad_accum=2, lr=3e-3, ce_weight=0.3, checkpoint_every=0,
                          teacher_correction_steps=correction, generated_windows=generated)
    one = copy.deepcopy(student)   # with generated windows: the main process samples, the other receives them
    distill(one, opts, make_context(windows, teacher=teacher))

    out = tmp_path / "two.safetensors"
    port = free_port()
    fork = multiprocessing.get_context("fork")
    processes = [fork.Process(target=_rank, args=(rank, port, copy.deepcopy(student), teacher, windows, opts, out))
                 for rank in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
    assert [p.exitcode for p in processes] == [0, 0]
    two = load_file(str(out))
    moved = 0.0
    for name, a in one.state_dict().items():
        assert torch.allclose(a, two[name], atol=1e-5, rtol=1e-4), (name, (a - two[name]).abs().max())
        moved = max(moved, (a - student.state_dict()[name]).abs().max().item())
    assert moved > 1e-3  # the runs really trained


def test_plain_ce_runs_without_a_teacher(corpus, tmp_path):
    student = tiny_model("llama", vocab_size=len(corpus["tokenizer"]), seed=1)
    ctx = context(corpus, None, tmp_path)  # context.teacher() would raise: CE alone never asks
    before = perplexity(student, corpus["held"])
    distill(student, options(corpus, steps=8, kl_weight=0.0, ce_weight=1.0), ctx)
    rows = list(csv.DictReader(open(tmp_path / "stage" / "loss.csv")))
    assert all(float(r["kl"]) == 0 for r in rows) and float(rows[-1]["ce"]) < float(rows[0]["ce"])
    assert perplexity(student, corpus["held"]) < before


def test_a_model_streamed_from_disk_is_refused_before_any_work(tmp_path):
    from pocketlm import PocketError, streaming
    from pocketlm.testing import make_context
    from pocketlm.testing.models import save_tiny_model, tiny_windows
    from pocketlm_distill.distill import DistillOptions, distill

    model = streaming.load_streamed(save_tiny_model(tmp_path / "m", "llama"), torch.float32)
    with pytest.raises(PocketError) as error:
        distill(model, DistillOptions(steps=1), make_context(tiny_windows(4, 16)))
    message = str(error.value)
    assert message.startswith("model.offload: distill") and "needs the whole model in memory" in message
    assert 'offload = "none"' in message and "accelerate launch" in message
