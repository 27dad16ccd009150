"""rtn and gptq as stages on tiny random models of every family the walker covers."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError

import pocketlm
from pocketlm.plugins import get_plugins
from pocketlm.testing.models import tiny_model
from pocketlm.weights import QuantizedEmbedding, QuantizedLinear, get_mask, is_linear, linear_weight, set_mask
from pocketlm_gptq.common import effect
from pocketlm_gptq.gptq import GPTQOptions, compress_gptq, plan as gptq_plan
from pocketlm_gptq.rtn import RTNOptions, compress_rtn, plan as rtn_plan

from conftest import capture_linear_inputs, reconstruction_error


def test_plugin_registers_methods_and_exporters():
    plugins = get_plugins()
    assert not [p for p in plugins.problems if "gptq" in (p.name + str(p.distribution))]
    assert {"rtn", "gptq"} <= set(plugins.methods)
    assert {"gptq", "compressed-tensors"} <= set(plugins.exporters)
    method = plugins.methods["gptq"]
    assert method.needs_calibration and method.exclusive and method.phase == pocketlm.PHASE_QUANTIZE
    assert plugins.methods["rtn"].kind == "quantize"


@pytest.mark.parametrize("family,bits", [("llama", 4), ("llama", 3), ("qwen2", 4), ("gpt2", 4), ("opt", 4)])
def test_gptq_reconstructs_layers_better_than_rtn(family, bits, windows, context):
    original = tiny_model(family, outliers=True)
    inputs = capture_linear_inputs(original, windows)
    options = dict(bits=bits, group_size=32)
    rtn_model = compress_rtn(copy.deepcopy(original), RTNOptions(**options), context)
    gptq_model = compress_gptq(copy.deepcopy(original), GPTQOptions(**options), context)
    quantized = [n for n, m in gptq_model.named_modules() if isinstance(m, QuantizedLinear)]
    expected = [n for n, m in original.named_modules() if is_linear(m) and n != "lm_head"]
    assert sorted(quantized) == sorted(expected)
    assert isinstance(gptq_model.get_submodule("lm_head"), torch.nn.Linear)  # ignored by default
    rtn_error = reconstruction_error(original, rtn_model, inputs)
    gptq_error = reconstruction_error(original, gptq_model, inputs)
    assert gptq_error < 0.9 * rtn_error, (gptq_error, rtn_error)


def test_act_order_and_per_channel_run_and_keep_plain_groups(windows, context):
    original = tiny_model("llama", outliers=True)
    inputs = capture_linear_inputs(original, windows)
    rtn_error = reconstruction_error(original, compress_rtn(copy.deepcopy(original), RTNOptions(bits=4, group_size=-1), context), inputs)
    for options in (GPTQOptions(bits=4, group_size=32, act_order=True),
                    GPTQOptions(bits=4, group_size=-1, act_order=True, true_sequential=False)):
        model = compress_gptq(copy.deepcopy(original), options, context)
        layer = model.model.layers[0].self_attn.q_proj
        assert layer.storage.g_idx is None and layer.group_size == options.group_size
        assert reconstruction_error(original, model, inputs) < rtn_error


def test_gptq_keeps_pruning_masks(windows, context):
    model = tiny_model("llama")
    generator = torch.Generator().manual_seed(0)
    for name, module in list(model.named_modules()):
        if is_linear(module) and name != "lm_head":
            set_mask(module, torch.rand(linear_weight(module).shape, generator=generator) > 0.5)
    compress_gptq(model, GPTQOptions(bits=4, group_size=32, symmetric=False, act_order=True), context)
    checked = 0
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            mask = get_mask(module)
            assert mask is not None, name
            weight = module.dequantize()
            assert int((weight[~mask] != 0).sum()) == 0, name
            checked += 1
    assert checked == 14


def test_rtn_keeps_pruning_masks(context):
    model = tiny_model("opt")
    module = model.model.decoder.layers[0].fc1
    mask = torch.rand(linear_weight(module).shape, generator=torch.Generator().manual_seed(0)) > 0.3
    set_mask(module, mask)
    compress_rtn(model, RTNOptions(bits=3, group_size=32), context)
    quantized = model.model.decoder.layers[0].fc1
    assert isinstance(quantized, QuantizedLinear) and torch.equal(get_mask(quantized), mask)
    assert int((quantized.dequantize()[~mask] != 0).sum()) == 0


def test_targets_and_ignore(context):
    model = compress_rtn(tiny_model("llama"), RTNOptions(targets=["*.q_proj", "*.k_proj"], ignore=["*.layers.1.*"]), context)
    quantized = sorted(n for n, m in model.named_modules() if isinstance(m, QuantizedLinear))
    assert quantized == ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.q_proj"]


@pytest.mark.parametrize("options,field", [
    ({"bits": 9}, "bits"), ({"group_size": 48}, "group_size"), ({"damp": 0.0}, "damp"),
    ({"block_size": 0}, "block_size"), ({"targets": []}, "targets"), ({"bogus": 1}, "bogus"),
    ({"backend": "autogptq"}, "backend"),
])
def test_bad_options_are_rejected(options, field):
    with pytest.raises(ValidationError, match=field):
        GPTQOptions(**options)


def test_group_size_that_does_not_divide_is_refused_up_front(context):
    model = tiny_model("llama")  # hidden 64: 128 does not divide it
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(pocketlm.PocketError) as error:
        compress_gptq(model, GPTQOptions(group_size=128), context)
    assert error.value.field == "group_size"
    assert "q_proj" in str(error.value) and "-1, 16, 32, 64" in error.value.fix
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())  # nothing changed
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_partial_group_allowed_when_asked(context):
    model = compress_rtn(tiny_model("llama"), RTNOptions(group_size=128, allow_partial_group=True), context)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.storage.scales.shape == (64, 1)  # one short group of 64 columns
    down = model.model.layers[0].mlp.down_proj  # in = 128: one whole group
    assert down.storage.scales.shape == (64, 1)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_tied_embedding_is_quantized_once_for_both_uses(method, windows, context):
    model = tiny_model("llama")
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    with torch.no_grad():
        reference = model(input_ids=windows).logits
    options = dict(bits=8, group_size=-1, targets=["embed"])
    if method == "rtn":
        compress_rtn(model, RTNOptions(**options), context)
    else:
        compress_gptq(model, GPTQOptions(**{**options, "targets": ["*"], "ignore": []}), context)
    embed, head = model.model.embed_tokens, model.lm_head
    assert isinstance(embed, QuantizedEmbedding) and isinstance(head, QuantizedLinear)
    assert head.storage is embed.storage
    with torch.no_grad():
        logits = model(input_ids=windows).logits
    if method == "rtn":  # 8-bit per row: close to the float model
        assert (logits - reference).abs().max() < 0.05 * reference.abs().max()
        assert not any(isinstance(m, QuantizedLinear) for n, m in model.named_modules() if "layers" in n)


def _head_inputs(model, windows):
    """What the head reads (the final norm's output) on ``windows``: ``[tokens, hidden]``."""
    reads = []
    hook = model.lm_head.register_forward_hook(lambda module, args, output: reads.append(args[0]))
    with torch.no_grad():
        model(input_ids=windows)
    hook.remove()
    return reads[0].reshape(-1, reads[0].shape[-1])


def _head_error(original, quantized, X) -> float:
    """||W X - Q X|| / ||W X|| of the head on its inputs ``X``."""
    W, Q = linear_weight(original.lm_head), linear_weight(quantized.lm_head)
    return ((W - Q) @ X.t()).norm().item() / (W @ X.t()).norm().item()


def _tied_llama(outliers=True, **sizes):
    model = tiny_model("llama", outliers=outliers, **sizes)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_a_solved_head_reconstructs_its_outputs_better_than_a_rounded_one(tied, windows, context):
    original = _tied_llama() if tied else tiny_model("llama", outliers=True)
    X = _head_inputs(original, windows)
    options = dict(bits=4, group_size=32, targets=["*", "embed"] if tied else ["*"],
                   ignore=[] if tied else ["embed"])
    errors = {}
    for head in ("solve", "round"):
        model = compress_gptq(copy.deepcopy(original), GPTQOptions(**options, head=head), context)
        assert isinstance(model.lm_head, QuantizedLinear)
        if tied:   # still one grid for both uses
            assert isinstance(model.model.embed_tokens, QuantizedEmbedding)
            assert model.lm_head.storage is model.model.embed_tokens.storage
        else:
            assert not isinstance(model.model.embed_tokens, QuantizedEmbedding)
        errors[head] = _head_error(original, model, X)
    assert errors["solve"] < 0.7 * errors["round"], errors


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_a_solved_untied_head_keeps_the_logits_closer_to_the_float_model(family, windows, context):
    # untied: the head's error is all that changes (a tied head's grid is also the embedding's
    # lookup table, whose own error a tiny random model feeds almost straight to the head)
    original = tiny_model(family, outliers=True)
    with torch.no_grad():
        reference = torch.log_softmax(original(input_ids=windows).logits, -1)
    kl = {}
    for head in ("solve", "round"):
        model = compress_gptq(copy.deepcopy(original), GPTQOptions(bits=4, group_size=32, targets=["lm_head"],
                                                                   ignore=[], head=head), context)
        with torch.no_grad():
            ours = torch.log_softmax(model(input_ids=windows).logits, -1)
        kl[head] = (reference.exp() * (reference - ours)).sum(-1).mean().item()
    assert kl["solve"] < 0.5 * kl["round"], kl


def test_an_encoder_head_is_rounded_even_when_solve_is_asked(context):
    from pocketlm_gptq.gptq import solved_head
    from pocketlm.quant import select_targets

    model = tiny_model("bert-mlm")
    architecture = context.architecture(model)
    options = GPTQOptions(bits=8, group_size=-1, targets=["*"], ignore=[])
    assert solved_head(select_targets(model, options, architecture, "gptq"), architecture, options) is None


def test_untied_head_can_be_targeted(context):
    model = compress_rtn(tiny_model("gpt2"), RTNOptions(bits=8, group_size=-1, targets=["lm_head"]), context)
    assert isinstance(model.lm_head, QuantizedLinear)
    assert not isinstance(model.transformer.wte, QuantizedEmbedding)  # gpt2's tiny model is untied


def test_effect_and_plan():
    e = effect(GPTQOptions(bits=4, group_size=64))   # a float16 scale per 64 weights
    assert e.bits == pytest.approx(4.25) and e.covers == "decoder" and e.features == frozenset({"quantized"})
    # + a 4-bit zero point per group, as the gptq and awq formats pack it
    assert effect(GPTQOptions(bits=4, group_size=64, symmetric=False)).bits == pytest.approx(4 + 20 / 64)
    assert effect(RTNOptions(bits=8, group_size=-1)).bits == 8
    embedding = effect(RTNOptions(bits=8, targets=["embed"]))
    assert embedding.covers == "embedding" and "quantized-embedding" in embedding.features
    assert effect(RTNOptions(bits=8, targets=["*"], ignore=[])).covers == "all"
    for plan, options in ((rtn_plan, RTNOptions), (gptq_plan, GPTQOptions)):
        sets = plan(None)
        assert len(sets) >= 3
        for option_set in sets:  # every proposed set validates ("default" marks the default hybrid)
            options(**{k: v for k, v in option_set.items() if k != "default"})
        assert sum(bool(option_set.get("default")) for option_set in sets) == 1


def test_a_recipe_that_quantizes_the_tied_embedding_says_it_solved_it_as_the_head(tmp_path):
    from click.testing import CliRunner
    from transformers import AutoModelForCausalLM

    from pocketlm.cli import main
    from pocketlm.testing.models import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = _tied_llama(outliers=False, vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path / "tiny-tied")
    tokenizer.save_pretrained(tmp_path / "tiny-tied")
    (tmp_path / "recipe.toml").write_text(
        '[model]\nsource = "tiny-tied"\n[calibration]\nsamples = 8\nseq_len = 32\n'
        '[[stages]]\nmethod = "gptq"\nbits = 4\ngroup_size = 32\n'
        '[[stages]]\nmethod = "gptq"\nbits = 4\ngroup_size = 32\ngrid = "weighted-mse"\ntargets = ["embed"]\n'
        'ignore = []\n[evaluate]\nmetrics = ["size"]\n[export]\nformat = "hf"\npath = "out"\n')
    result = CliRunner().invoke(main, ["run", str(tmp_path / "recipe.toml"), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "gptq: 14 linears to 4 bits, group 32, act-order" in result.output
    assert ("gptq: model.embed_tokens and its tied lm_head solved as the head, with the Hessian of its inputs "
            "(one shared 4-bit grid)") in result.output
    assert "0 linears" not in result.output
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "out")
    assert exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()   # still tied
