"""Tests of ``qat`` (quantization-aware recovery of the scales) on tiny llamas: the pure scale
functions on random matrices, block recovery after rtn, the grid and masks kept, exact GGUF and
compressed-tensors exports, resume, the end-to-end phase and bad options."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import SEQ_LEN, frozen_copy, kl_to, train_ce
from pydantic import ValidationError

from pocketlm import PocketError
from pocketlm.plugins import get_plugins
from pocketlm.testing import make_context
from pocketlm.testing.models import tiny_model
from pocketlm.weights import QuantizedEmbedding, QuantizedLinear, get_mask, linear_weight, set_mask
from pocketlm_distill import QATOptions, qat
from pocketlm_distill import recovery as qat_module
from pocketlm_distill.recovery import (STATE_FILE, ScaleEmbedding, ScaleLinear, repeat_run, round_steps,
                                      scale_structure, spread_columns, two_level)


def quantize(model, windows, **options):
    """Run the ``rtn`` method of pocketlm-gptq (through the plugin registry, its public face)."""
    method = get_plugins().methods["rtn"]
    method.compress(model, method.options(**options), make_context(windows))
    return model


def grids(model):
    return {n: (m.storage.qweight.clone(), m.storage.scales.clone(), m.storage.zeros.clone())
            for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def run_qat(model, teacher, windows, stage, **options):
    context = make_context(windows, teacher=teacher, stage_dir=stage)
    return qat(model, QATOptions(**{"lr": 2e-3, "batch_size": 4, **options}), context)


@pytest.fixture
def calibration(corpus):
    return corpus["train_windows"][:16]


# ------------------------------------------------------------------------------ pure functions


def test_registered():
    method = get_plugins().methods["qat"]
    assert method.kind == "distill" and method.needs_calibration and method.phase == 45
    assert method.effect(QATOptions()).bits is None
    # the planner's proposal is the end-to-end phase alone, and it validates
    (proposal,) = method.plan(None)
    options = method.options.model_validate(proposal)
    assert options.epochs == 0 and options.e2e_steps == 64 and options.e2e_lr == 1e-4
    assert method.effect(options).recovers == 0.32


def test_bad_options_are_clear():
    with pytest.raises(ValidationError, match="train nothing"):
        QATOptions(epochs=0)
    with pytest.raises(ValidationError, match="must be positive"):
        QATOptions(lr=0)
    with pytest.raises(ValidationError, match="at least 1"):
        QATOptions(batch_size=0)
    with pytest.raises(ValidationError, match="Extra inputs"):
        QATOptions(zero_points=True)
    with pytest.raises(ValidationError, match="give e2e_steps too"):
        QATOptions(e2e_generated_windows=8)
    with pytest.raises(ValidationError, match="give e2e_generated_windows too"):
        QATOptions(e2e_steps=8, e2e_generated_only=True)
    with pytest.raises(ValidationError, match="'no', 'bf16' or 'auto'"):
        QATOptions(e2e_steps=8, e2e_mixed_precision="float16")
    for name, field in QATOptions.model_fields.items():
        assert field.description, name


def test_round_steps_keep_every_product_a_float16():
    generator = torch.Generator().manual_seed(0)
    step = torch.rand(200, 4, generator=generator) * 1e-2 + 1e-7    # subnormal steps included
    top = torch.randint(1, 128, (200, 4), generator=generator).float()
    rounded = round_steps(step, top)
    for multiplier in (1, 3, 17):
        product = rounded * torch.minimum(top, torch.full_like(top, multiplier))
        assert torch.equal(product.half().float(), product)
    product = rounded * top
    assert torch.equal(product.half().float(), product)
    bits = torch.where(top == 1, 11, 11 - (torch.floor(torch.log2(top)) + 1))
    normal = step > 2**-14
    assert bool(((rounded - step).abs() <= step * 2.0 ** -bits)[normal].all())   # rounding, not truncation
    assert torch.equal(round_steps(step, torch.ones_like(step)), step.half().float())  # plain groups: float16


def test_scale_structure_finds_k_quant_super_blocks_pairs_and_free_groups():
    generator = torch.Generator().manual_seed(0)
    rows, subs = 6, 8
    d = (torch.randint(16, 32, (rows, 2, 1), generator=generator) * 2.0**-14)        # 5 significant bits
    sc = torch.randint(1, 64, (rows, 2, subs), generator=generator).float()
    kquant = (d * sc).reshape(rows, 2 * subs)
    assert torch.equal(kquant.half().float(), kquant)
    structure = scale_structure(kquant, 32, 512)
    assert structure.kind == "two-level" and torch.equal(structure.scales(), kquant)
    assert structure.step.shape == (rows, 2) and int(structure.multiplier.max()) <= 63

    free = (torch.rand(rows, 16, generator=generator) * 0.05 + 1e-3).half().float()
    assert scale_structure(free, 32, 512).kind == "groups"
    assert two_level(free.reshape(-1, 8)) is None
    pairs = free[:, :9].repeat_interleave(2, 1)                       # 576 columns in 36 groups of 16
    structure = scale_structure(pairs, 16, 576)
    assert structure.kind == "pairs" and torch.equal(structure.scales(), pairs)


@pytest.mark.parametrize("index", ["runs", "identity", "act-order"])
def test_spread_columns_equals_indexing_in_value_and_gradient(index):
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(64, 4, generator=generator)
    columns = {"runs": torch.arange(64) // 16, "identity": torch.arange(4),
               "act-order": torch.randperm(64, generator=generator) // 16}[index]
    run = repeat_run(columns, 4)
    assert run == {"runs": 16, "identity": 1, "act-order": 0}[index]
    weight = torch.randn(64, columns.numel(), generator=generator)
    fast, plain = values.clone().requires_grad_(), values.clone().requires_grad_()
    spread = spread_columns(fast, columns, run)
    assert torch.equal(spread, plain[:, columns])
    (spread * weight).sum().backward()
    (plain[:, columns] * weight).sum().backward()
    assert torch.allclose(fast.grad, plain.grad, atol=1e-5)
    assert repeat_run(torch.arange(10) // 3, 4) == 0                       # runs of unequal length


def test_scale_linear_trains_only_scales_and_rounds_onto_the_structure():
    generator = torch.Generator().manual_seed(0)
    W = torch.randn(8, 256, generator=generator)
    d = torch.full((8, 1, 1), 2.0**-9)
    sc = torch.randint(1, 64, (8, 1, 8), generator=generator).float()
    scales = (d * sc).reshape(8, 8)
    q = torch.randint(0, 16, (8, 256), generator=generator)
    layer = QuantizedLinear.from_grid(q, scales, torch.full_like(scales, 8), bits=4, group_size=32, symmetric=True)
    before = layer.dequantize()
    opened = ScaleLinear(layer)
    x = torch.randn(5, 256, generator=generator)
    assert torch.equal(opened(x), layer(x))                              # the same function before training
    assert [n for n, _ in opened.named_parameters()] == ["step"]
    with torch.no_grad():
        opened.step.mul_(1.0137)
    opened.close()
    after = layer.dequantize()
    ratio = (after / before)[before != 0]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio)) and abs(float(ratio[0]) - 1.0137) < 0.04
    assert torch.equal(layer.storage.grid(), q.to(torch.uint8))
    assert two_level(layer.storage.scales.float().reshape(-1, 8)) is not None


# ------------------------------------------------------------------------------ the method


def test_block_recovery_lowers_every_layers_error_and_keeps_the_grid(teacher, corpus, calibration, tmp_path):
    student = quantize(copy.deepcopy(teacher), calibration, bits=3, group_size=16)
    before = grids(student)
    kl_before = kl_to(teacher, student, corpus["held"])
    run_qat(student, teacher, calibration, tmp_path / "stage", epochs=4)
    summary = json.loads((tmp_path / "stage" / "qat.json").read_text())
    assert len(summary["layers"]) == 2 and summary["block_tokens"] == 4 * 16 * SEQ_LEN * 2
    for layer in summary["layers"]:
        assert layer["kept"] and layer["after"] < 0.8 * layer["before"], layer   # a real margin
    moved = 0
    for name, module in student.named_modules():
        if isinstance(module, QuantizedLinear):
            qweight, scales, zeros = before.pop(name)
            assert torch.equal(module.storage.qweight, qweight) and torch.equal(module.storage.zeros, zeros)
            assert module.storage.scales.dtype == torch.float16
            moved += int(not torch.equal(module.storage.scales, scales))
    assert not before and moved >= 10
    assert kl_to(teacher, student, corpus["held"]) < 0.9 * kl_before
    assert not (tmp_path / "stage" / STATE_FILE).exists()


def test_masks_stay_zero(teacher, calibration, tmp_path):
    student = copy.deepcopy(teacher)
    down = student.model.layers[0].mlp.down_proj
    weight = linear_weight(down)
    mask = weight.abs() > weight.abs().median()
    set_mask(down, mask)
    quantize(student, calibration, bits=4, group_size=16)
    run_qat(student, teacher, calibration, tmp_path / "stage", epochs=2)
    down = student.model.layers[0].mlp.down_proj
    assert torch.equal(get_mask(down), mask)
    assert torch.count_nonzero(down.dequantize()[~mask]) == 0


def test_resume_after_a_kill_equals_an_uninterrupted_run(teacher, calibration, tmp_path, monkeypatch):
    quantized = quantize(copy.deepcopy(teacher), calibration, bits=3, group_size=16)
    whole = run_qat(copy.deepcopy(quantized), teacher, calibration, tmp_path / "whole", epochs=2)

    train_block, calls = qat_module.train_block, []

    def dies_on_the_second_layer(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return train_block(*args, **kwargs)

    monkeypatch.setattr(qat_module, "train_block", dies_on_the_second_layer)
    killed = copy.deepcopy(quantized)
    with pytest.raises(KeyboardInterrupt):
        run_qat(killed, teacher, calibration, tmp_path / "resumed", epochs=2)
    assert (tmp_path / "resumed" / STATE_FILE).is_file()
    monkeypatch.setattr(qat_module, "train_block", train_block)
    resumed = run_qat(copy.deepcopy(quantized), teacher, calibration, tmp_path / "resumed", epochs=2)
    assert len(calls) == 2                           # the first layer was restored, not trained again
    expected = grids(whole)
    for name, (qweight, scales, zeros) in grids(resumed).items():
        assert torch.equal(scales, expected[name][1]) and torch.equal(qweight, expected[name][0]), name
    # other options: the saved state is not used
    other = run_qat(copy.deepcopy(quantized), teacher, calibration, tmp_path / "whole", epochs=1)
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(grids(other).values(), expected.values()))


def test_end_to_end_phase_trains_only_the_scales(teacher, corpus, calibration, tmp_path):
    # the embedding and the (untied) head quantized too: both train their scales, the head has no .weight
    student = quantize(copy.deepcopy(teacher), calibration, bits=3, group_size=16, ignore=[])
    assert isinstance(student.lm_head, QuantizedLinear)
    before = grids(student)
    others = {n: p.clone() for n, p in student.named_parameters()}
    kl_before = kl_to(teacher, student, corpus["held"])
    run_qat(student, teacher, calibration, tmp_path / "stage", epochs=0, e2e_steps=8, e2e_lr=2e-3,
            e2e_batch_size=4, checkpoint_every=0)
    for name, parameter in student.named_parameters():
        assert torch.equal(parameter, others[name]), name
    for name, module in student.named_modules():
        if isinstance(module, QuantizedLinear):
            assert torch.equal(module.storage.qweight, before[name][0])
            assert torch.equal(module.storage.zeros, before[name][2])
    assert kl_to(teacher, student, corpus["held"]) < kl_before
    assert (tmp_path / "stage" / "loss.csv").is_file()
    assert json.loads((tmp_path / "stage" / "qat.json").read_text())["e2e_tokens"] == 8 * 4 * SEQ_LEN


def test_refuses_a_model_with_nothing_quantized_or_reshaped(teacher, calibration, tmp_path):
    with pytest.raises(PocketError, match="after a quantize stage"):
        run_qat(copy.deepcopy(teacher), teacher, calibration, tmp_path / "a")
    student = quantize(copy.deepcopy(teacher), calibration, bits=4, group_size=16)
    narrower = tiny_model("llama", vocab_size=teacher.config.vocab_size, intermediate=64)
    with pytest.raises(PocketError, match="no counterpart of the same shape"):
        run_qat(student, narrower, calibration, tmp_path / "b")


def test_end_to_end_phase_alone_recovers_a_model_narrower_than_its_teacher(teacher, corpus, calibration, tmp_path):
    # pruned MLP channels (prune-width) then quantized: the block phase has no layer to pair with,
    # the end-to-end phase only needs the logits
    narrower = tiny_model("llama", vocab_size=teacher.config.vocab_size, intermediate=64, seed=3)
    student = quantize(narrower, calibration, bits=3, group_size=16)
    before = grids(student)
    kl_before = kl_to(teacher, student, corpus["held"])
    run_qat(student, teacher, calibration, tmp_path / "stage", epochs=0, e2e_steps=8, e2e_lr=2e-3,
            e2e_batch_size=4, checkpoint_every=0)
    for name, module in student.named_modules():
        if isinstance(module, QuantizedLinear):
            assert torch.equal(module.storage.qweight, before[name][0])
    assert kl_to(teacher, student, corpus["held"]) < 0.9 * kl_before


def test_end_to_end_phase_on_text_the_original_wrote(teacher, corpus, calibration, tmp_path):
    # data-free (LLM-QAT): the scales train on windows the original model sampled, none of the
    # calibration text, and the KL on real held-out text still falls; the grid is untouched
    student = quantize(copy.deepcopy(teacher), calibration, bits=3, group_size=16)
    before = grids(student)
    kl_before = kl_to(teacher, student, corpus["held"])
    run_qat(student, teacher, calibration, tmp_path / "stage", epochs=0, e2e_steps=8, e2e_lr=2e-3,
            e2e_batch_size=4, e2e_generated_windows=8, e2e_generated_only=True, checkpoint_every=0)
    for name, module in student.named_modules():
        if isinstance(module, QuantizedLinear):
            assert torch.equal(module.storage.qweight, before[name][0])
    assert kl_to(teacher, student, corpus["held"]) < 0.9 * kl_before
    assert (tmp_path / "stage" / "distill-generated.safetensors").is_file()


# ------------------------------------------------------------------------------ exact exports


def _wide_llama(vocab):
    """Hidden 256: q/k/v/gate/up read 256 columns, so k-quant grids are real super-blocks."""
    return tiny_model("llama", vocab_size=vocab, hidden=256, intermediate=512, heads=4, kv_heads=2, seed=1)


@pytest.mark.parametrize("grid,types", [("q4_k", {"Q4_K"}), ("minmax", {"Q4_0"})])
def test_gguf_export_equals_the_trained_model_bit_for_bit(corpus, calibration, tmp_path, grid, types):
    pytest.importorskip("pocketlm_gguf")
    pytest.importorskip("pocketlm_gptq")
    from gguf import GGUFReader, quants

    from pocketlm_gguf import GGUFOptions, export_gguf

    teacher = _wide_llama(len(corpus["tokenizer"]))
    student = quantize(copy.deepcopy(teacher), calibration[:8], bits=4, group_size=32, grid=grid)
    before = grids(student)
    run_qat(student, teacher, calibration[:8], tmp_path / "stage", epochs=2, lr=1e-3)
    assert any(not torch.equal(s, before[n][1]) for n, (_, s, _) in grids(student).items())
    export_gguf(student, tmp_path / "out", GGUFOptions(dtype="f32", tokenizer=False), make_context())
    tensors = {t.name: t for t in GGUFReader(tmp_path / "out" / "model.gguf").tensors}
    checked = 0
    for index, layer in enumerate(student.model.layers):
        for module_name, gguf_name in [("mlp.down_proj", "ffn_down"), ("mlp.up_proj", "ffn_up"),
                                       ("mlp.gate_proj", "ffn_gate"), ("self_attn.v_proj", "attn_v"),
                                       ("self_attn.o_proj", "attn_output")]:   # (q/k: rope-permuted rows)
            tensor = tensors[f"blk.{index}.{gguf_name}.weight"]
            assert tensor.tensor_type.name in types, (gguf_name, tensor.tensor_type.name)
            ours = layer.get_submodule(module_name).dequantize()
            back = torch.from_numpy(quants.dequantize(tensor.data, tensor.tensor_type).reshape(ours.shape).copy())
            assert torch.equal(back, ours), gguf_name
            checked += 1
    assert checked == 10


class _ModelSection:   # the recipe's [model] section, as much as a loader reads
    dtype = "float32"
    trust_remote_code = False


@pytest.mark.parametrize("symmetric", [True, False])
def test_compressed_tensors_export_reloads_with_the_trained_grid_bit_for_bit(corpus, calibration, tmp_path, symmetric):
    pytest.importorskip("pocketlm_gptq")
    pytest.importorskip("compressed_tensors")
    plugins = get_plugins()
    teacher = tiny_model("llama", vocab_size=len(corpus["tokenizer"]))
    student = quantize(copy.deepcopy(teacher), calibration[:8], bits=4, group_size=32, symmetric=symmetric)
    before = grids(student)
    run_qat(student, teacher, calibration[:8], tmp_path / "stage", epochs=2, lr=1e-3)
    assert any(not torch.equal(s, before[n][1]) for n, (_, s, _) in grids(student).items())
    exporter = plugins.exporters["compressed-tensors"]
    exporter.export(student, tmp_path / "out", exporter.options(), make_context(tokenizer=corpus["tokenizer"]))
    loader = next(l for l in plugins.loaders if l.name == "compressed-tensors-checkpoint")
    assert loader.matches(str(tmp_path / "out"))
    loaded = loader.load(str(tmp_path / "out"), _ModelSection()).model
    ours = {n: m.dequantize() for n, m in student.named_modules() if isinstance(m, QuantizedLinear)}
    theirs = {n: m.dequantize() for n, m in loaded.named_modules() if isinstance(m, QuantizedLinear)}
    assert ours.keys() == theirs.keys() and len(ours) == 14
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


# ------------------------------------------------------------------------------ a tied quantized embedding


def test_scale_embedding_and_tied_head_read_one_step_and_match_the_quantized_pair(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (300, 64), generator=generator)
    scales = (torch.rand(300, 2, generator=generator) * 0.05 + 1e-3).half().float()
    zeros = torch.randint(0, 16, (300, 2), generator=generator).float()
    embedding = QuantizedEmbedding.from_grid(q, scales, zeros, bits=4, group_size=32, symmetric=False)
    head = embedding.tied_head()
    opened = ScaleEmbedding(embedding)
    opened_head = opened.tied_head(head)
    assert [n for n, _ in opened.named_parameters()] == ["step"] and not list(opened_head.parameters())
    assert opened.centered.dtype == torch.int8
    ids = torch.randint(0, 300, (3, 7), generator=generator)
    x = torch.randn(3, 7, 64, generator=generator, requires_grad=True)
    assert torch.equal(opened(ids), embedding(ids))
    assert torch.allclose(opened_head(x), head(x), rtol=0, atol=1e-5)
    # the head's blockwise gradient (5 blocks of 70 rows) equals autograd's on the whole weight
    monkeypatch.setattr(qat_module, "ROW_BLOCK", 64 * 70)
    (opened_head(x).sin().sum() + opened(ids).square().sum()).backward()
    ours = opened.step.grad.clone(), x.grad.clone()
    opened.step.grad, x.grad = None, None
    weight = opened.centered.float() * opened.scales()[:, opened.groups]
    (F.linear(x, weight).sin().sum() + weight[ids].square().sum()).backward()
    assert ours[0].abs().max() > 1 and torch.allclose(ours[0], opened.step.grad, rtol=1e-5, atol=1e-4)
    assert torch.allclose(ours[1], x.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        opened.step.mul_(1.01)
    assert opened_head.close() is head and opened.close() is embedding
    assert head.storage is embedding.storage and torch.equal(embedding.storage.grid(), q.to(torch.uint8))
    assert not torch.equal(embedding.storage.scales.float(), scales)


def test_tied_head_backward_runs_in_the_forward_passs_autocast():
    generator = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (300, 64), generator=generator)
    scales = (torch.rand(300, 2, generator=generator) * 0.05 + 1e-3).half().float()
    embedding = QuantizedEmbedding.from_grid(q, scales, torch.full((300, 2), 8.0), bits=4, group_size=32,
                                             symmetric=True)
    opened = ScaleEmbedding(embedding)
    head = opened.tied_head(embedding.tied_head())
    x = torch.randn(3, 7, 64, generator=generator)
    upstream = torch.randn(3, 7, 300, generator=generator)
    grads = {}
    for enabled in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            logits = head(x)
        assert logits.dtype == torch.float32   # the head's output buffer keeps the input's dtype
        (logits * upstream).sum().backward()
        grads[enabled], opened.step.grad = opened.step.grad.clone(), None
    # the gradient of the scales built from products of bfloat16 operands, as the forward pass took them
    weight_grad = (upstream.reshape(-1, 300).T.bfloat16() @ x.reshape(-1, 64).bfloat16()).float()
    per_group = (weight_grad * opened.centered.float()).view(300, 2, 32).sum(-1)
    direct = torch.autograd.grad((opened.scales() * per_group).sum(), opened.step)[0]
    assert torch.allclose(grads[True], direct, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(grads[False], direct, rtol=1e-5, atol=1e-6)   # float32 products differ
    assert qat_module.autocast_state("cpu") is None and qat_module.autocast_state("meta") is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert qat_module.autocast_state("cpu") == torch.bfloat16
    assert (grads[True] - grads[False]).norm() < 0.02 * grads[False].norm()   # bfloat16's rounding, no more


def _tied_llama(vocab, seed=0, **sizes):
    from transformers import AutoModelForCausalLM

    from pocketlm.testing.models import tiny_config

    config = tiny_config("llama", vocab_size=vocab, **sizes)
    config.tie_word_embeddings = True
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0, 0.08)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model.eval()


@pytest.fixture(scope="module")
def tied_trained(corpus):
    """A tiny tied llama trained for 50 CE steps (seconds)."""
    return train_ce(_tied_llama(len(corpus["tokenizer"])), corpus["train_windows"], 50)


@pytest.fixture
def tied_teacher(tied_trained):
    return frozen_copy(tied_trained)


def _quantized_with_embedding(teacher, windows, **options):
    options = {"targets": ["*", "embed"], "ignore": ["lm_head"], **options}
    student = quantize(copy.deepcopy(teacher), windows, **options)
    embedding, head = student.model.embed_tokens, student.lm_head
    assert isinstance(embedding, QuantizedEmbedding) and head.storage is embedding.storage
    return student


def _embedding_grid(model):
    storage = model.model.embed_tokens.storage
    return storage.qweight.clone(), storage.scales.clone(), storage.zeros.clone()


def test_end_to_end_phase_trains_the_tied_embeddings_scales_and_lowers_the_kl(tied_teacher, corpus, calibration,
                                                                              tmp_path):
    quantized = _quantized_with_embedding(tied_teacher, calibration, bits=3, group_size=16)
    qweight, scales, zeros = _embedding_grid(quantized)
    e2e = dict(epochs=0, e2e_steps=8, e2e_lr=2e-3, e2e_batch_size=4, checkpoint_every=0)
    trained = run_qat(copy.deepcopy(quantized), tied_teacher, calibration, tmp_path / "a", **e2e)
    frozen = run_qat(copy.deepcopy(quantized), tied_teacher, calibration, tmp_path / "b", ignore=["embed"], **e2e)
    bf16 = run_qat(copy.deepcopy(quantized), tied_teacher, calibration, tmp_path / "c", e2e_mixed_precision="bf16",
                   **e2e)
    embedding = trained.model.embed_tokens
    assert isinstance(embedding, QuantizedEmbedding) and isinstance(trained.lm_head, QuantizedLinear)
    assert trained.lm_head.storage is embedding.storage                  # still one grid for both uses
    assert torch.equal(embedding.storage.qweight, qweight) and torch.equal(embedding.storage.zeros, zeros)
    assert embedding.storage.scales.dtype == torch.float16
    changed = (embedding.storage.scales != scales).float().mean().item()
    assert changed > 0.5, changed
    assert torch.equal(frozen.model.embed_tokens.storage.scales, scales)   # ignore = ["embed"]: as it was
    # the same steps, the embedding's scales trained too: closer to the teacher
    kl = {name: kl_to(tied_teacher, model, corpus["held"]) for name, model in
          [("quantized", quantized), ("frozen", frozen), ("trained", trained), ("bf16", bf16)]}
    assert kl["trained"] < 0.8 * kl["frozen"] < kl["quantized"], kl
    # in bfloat16 mixed precision: other scales (its products rounded otherwise), as close to the teacher
    assert not torch.equal(bf16.model.embed_tokens.storage.scales, embedding.storage.scales)
    assert kl["bf16"] < 0.8 * kl["frozen"] and abs(kl["bf16"] - kl["trained"]) < 0.1 * kl["trained"], kl


def test_distill_scales_mode_freezes_the_embedding_it_is_told_to(tied_teacher, calibration, tmp_path):
    from pocketlm_distill import DistillOptions, distill

    student = _quantized_with_embedding(tied_teacher, calibration, bits=4, group_size=32)
    _, scales, _ = _embedding_grid(student)
    options = dict(steps=2, lr=2e-3, batch_size=4, quantized="scales", checkpoint_every=0, seed=0)
    context = make_context(calibration, teacher=tied_teacher, stage_dir=tmp_path / "a")
    distill(student, DistillOptions(freeze=["model.embed_tokens"], **options), context)
    assert torch.equal(student.model.embed_tokens.storage.scales, scales)
    distill(student, DistillOptions(**options), make_context(calibration, teacher=tied_teacher,
                                                             stage_dir=tmp_path / "b"))
    assert not torch.equal(student.model.embed_tokens.storage.scales, scales)
    assert student.lm_head.storage is student.model.embed_tokens.storage


@pytest.mark.parametrize("average_last,killed_after,precision", [(0.0, 3, "no"), (0.5, 5, "no"),  # 0.5: the last
                                                                   (0.0, 3, "bf16")])            # checkpoint in the tail
def test_end_to_end_resume_with_the_embedding_equals_an_uninterrupted_run(tied_teacher, calibration, tmp_path,
                                                                         average_last, killed_after, precision):
    quantized = _quantized_with_embedding(tied_teacher, calibration, bits=4, group_size=32)
    e2e = dict(epochs=0, e2e_steps=6, e2e_lr=2e-3, e2e_batch_size=4, checkpoint_every=2,
               e2e_average_last=average_last, e2e_mixed_precision=precision)
    whole = run_qat(copy.deepcopy(quantized), tied_teacher, calibration, tmp_path / "whole", **e2e)

    from test_distill import _Killed, _KillAfter

    context = make_context(calibration, teacher=tied_teacher, stage_dir=tmp_path / "resumed")
    context.progress = _KillAfter(killed_after)
    with pytest.raises(_Killed):
        qat(copy.deepcopy(quantized), QATOptions(lr=2e-3, batch_size=4, **e2e), context)
    resumed = run_qat(copy.deepcopy(quantized), tied_teacher, calibration, tmp_path / "resumed", **e2e)
    assert not torch.equal(_embedding_grid(whole)[1], _embedding_grid(quantized)[1])
    for ours, theirs in zip(_embedding_grid(resumed), _embedding_grid(whole)):
        assert torch.equal(ours, theirs)
    for name, (qweight, scales, zeros) in grids(resumed).items():
        assert torch.equal(scales, grids(whole)[name][1]), name


@pytest.mark.parametrize("grid,symmetric,kind", [("minmax", True, "Q4_0"), ("minmax", False, "Q4_1"), ("q4_k", True, "Q4_K")])
def test_gguf_export_of_a_trained_tied_embedding_equals_it_bit_for_bit(corpus, calibration, tmp_path, grid,
                                                                        symmetric, kind):
    pytest.importorskip("pocketlm_gguf", reason="pocketlm-gguf is not installed")
    from gguf import GGUFReader, quants

    from pocketlm_gguf import GGUFOptions, export_gguf

    teacher = _tied_llama(len(corpus["tokenizer"]), seed=1, hidden=256, intermediate=512, heads=4, kv_heads=2)
    student = _quantized_with_embedding(teacher, calibration[:8], bits=4, group_size=32, grid=grid,
                                        symmetric=symmetric)
    _, scales, _ = _embedding_grid(student)
    run_qat(student, teacher, calibration[:8], tmp_path / "stage", epochs=0, e2e_steps=3, e2e_lr=2e-3,
            e2e_batch_size=2, checkpoint_every=0)
    trained = student.model.embed_tokens.storage.scales
    assert not torch.equal(trained, scales)
    if grid == "q4_k":   # k-quant super-blocks before and after: only their float16 steps trained
        assert scale_structure(scales, 32, 256).kind == scale_structure(trained, 32, 256).kind == "two-level"
    export_gguf(student, tmp_path / "out", GGUFOptions(dtype="f32", tokenizer=False), make_context())
    tensors = {t.name: t for t in GGUFReader(tmp_path / "out" / "model.gguf").tensors}
    assert "output.weight" not in tensors                                 # the head reads token_embd
    tensor = tensors["token_embd.weight"]
    assert tensor.tensor_type.name == kind
    ours = student.model.embed_tokens.dequantize()
    back = torch.from_numpy(quants.dequantize(tensor.data, tensor.tensor_type).reshape(ours.shape).copy())
    if symmetric:
        assert torch.equal(back, ours)
    else:   # Q4_1 stores the offset -zero * scale as a float16: the grid is exact, the weights close
        assert (back - ours).abs().max() <= ours.abs().max() * 2.0**-9
