"""activation-sparsity on tiny models: dense at zero, the requested sparsity on calibration text,
the decode path equal to the thresholded forward, bad input refused, composition with GPTQ."""

import copy

import pytest
import torch

from pocketlm import PocketError
from pocketlm.plugins import get_plugins
from pocketlm.testing import make_context
from pocketlm.modules import decoder_layers
from pocketlm.testing.models import tiny_model, tiny_windows
from pocketlm.weights import QuantizedLinear, is_linear, linear_shape
from pocketlm_dynamic import decode, sparsity
from pocketlm_dynamic.sparsity import INPUT, OUTPUT, Thresholded, set_threshold, thresholds

WINDOWS = tiny_windows(8, 32)


def run(model, **options):
    plugins = get_plugins()
    method = plugins.methods["activation-sparsity"]
    result = plugins.hook.compress(model=model, method=method, options=method.options(**options),
                                   context=make_context(WINDOWS, plugins=plugins))
    return result if result is not None else model


def architecture_of(model):
    return make_context(WINDOWS, plugins=get_plugins()).architecture(model)


@torch.no_grad()
def logits(model, ids=WINDOWS):
    return model(input_ids=ids, use_cache=False).logits


def measured(model, ids=WINDOWS) -> dict[str, float]:
    """Fraction of each thresholded input (or activation output) the rule zeroes on ``ids``."""
    counts, handles = {}, []
    for name, (where, _) in thresholds(model).items():
        module = model.get_submodule(name)

        def count(x, t, name=name):
            zeroed, total = counts.get(name, (0, 0))
            counts[name] = (zeroed + int((x.abs() <= t).sum()), total + x.numel())

        if where == INPUT:
            handles.append(module.register_forward_pre_hook(lambda m, a, count=count: count(a[0], m.input_threshold)))
        else:
            handles.append(module.register_forward_hook(lambda m, a, y, count=count: count(y, m.output_threshold)))
    logits(model, ids)
    for handle in handles:
        handle.remove()
    return {name: zeroed / total for name, (zeroed, total) in counts.items()}


def test_threshold_zero_is_exactly_the_dense_model(tiny_family):
    model = tiny_model(tiny_family)
    dense = logits(model)
    assert torch.equal(logits(run(model, sparsity=0.0)), dense) and not thresholds(model)
    for name, module in list(model.named_modules()):
        if is_linear(module) and "lm_head" not in name:
            set_threshold(module, INPUT, 0.0)
    assert thresholds(model) and torch.equal(logits(model), dense)


@pytest.mark.parametrize("target", [0.25, 0.4, 0.5])
def test_uniform_reaches_the_target_on_calibration_text(tiny_family, target):
    model = run(tiny_model(tiny_family), sparsity=target)
    fractions = measured(model)
    assert len(fractions) == sum(1 for n, m in model.named_modules() if is_linear(m) and "lm_head" not in n)
    table = thresholds(model)
    # An input already sparser than the target (OPT's fc2 reads a ReLU: about half zeros) keeps
    # threshold 0 and skips just its zeros; every other input lands on the target.
    assert all(abs(f - target) <= 0.02 or (table[n][1] == 0 and f > target) for n, f in fractions.items()), fractions


def _weighted(model, fractions):
    sizes = {n: linear_shape(model.get_submodule(n)) for n in fractions}
    return sum(fractions[n] * o * i for n, (o, i) in sizes.items()) / sum(o * i for o, i in sizes.values())


@pytest.mark.parametrize("family,allocation", [("llama", "greedy"), ("gpt2", "greedy"), ("llama", "greedy-proxy")])
def test_greedy_reaches_the_target_weighted_by_weight_bytes(family, allocation):
    model = run(tiny_model(family), sparsity=0.4, allocation=allocation)
    fractions = measured(model)
    assert abs(_weighted(model, fractions) - 0.4) <= 0.02, fractions
    assert max(fractions.values()) - min(fractions.values()) > 0.05  # it did allocate unevenly


def test_greedy_loses_less_than_uniform_at_the_same_sparsity():
    model = tiny_model("llama", outliers=True)
    dense = logits(model)
    errors = {}
    for allocation in ("uniform", "greedy"):
        sparse = logits(run(copy.deepcopy(model), sparsity=0.5, allocation=allocation))
        errors[allocation] = float((sparse - dense).pow(2).mean())
    assert errors["greedy"] < errors["uniform"], errors


def _layer_calls(model) -> list[tuple[torch.Tensor, dict]]:
    """What each decoder layer of ``model`` receives on the calibration windows."""
    calls, handles = [], []
    for layer in decoder_layers(model, architecture_of(model)):
        def keep(module, args, kwargs):
            calls.append((args[0] if args else kwargs["hidden_states"], {k: v for k, v in kwargs.items()
                                                                         if k != "hidden_states"}))
        handles.append(layer.register_forward_pre_hook(keep, with_kwargs=True))
    logits(model)
    for handle in handles:
        handle.remove()
    return calls


@torch.no_grad()
def _layer_errors(model, dense_model) -> list[float]:
    """Per decoder layer: squared error of its output against the dense layer's, both on the
    dense model's inputs to that layer (the calibration windows)."""
    arch = architecture_of(model)
    errors = []
    for layer, dense, (hidden, kwargs) in zip(decoder_layers(model, arch), decoder_layers(dense_model, arch),
                                              _layer_calls(dense_model)):
        out, ref = layer(hidden, **kwargs), dense(hidden, **kwargs)
        out, ref = (o[0] if isinstance(o, tuple) else o for o in (out, ref))
        errors.append(float((out - ref).pow(2).sum()))
    return errors


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_greedy_layer_output_error_is_below_uniform_at_the_same_sparsity(family):
    dense = tiny_model(family, outliers=True)
    models = {a: run(copy.deepcopy(dense), sparsity=0.4, allocation=a) for a in ("uniform", "greedy-proxy", "greedy")}
    weighted = {a: _weighted(m, measured(m)) for a, m in models.items()}
    assert all(abs(w - 0.4) <= 0.02 for w in weighted.values()), weighted
    errors = {a: _layer_errors(m, dense) for a, m in models.items()}
    # llama at the time of writing: uniform [108830, 8154], proxy [15444, 4288], greedy [9417, 4040]
    assert all(g <= u for g, u in zip(errors["greedy"], errors["uniform"])), errors
    assert sum(errors["greedy"]) < 0.8 * sum(errors["uniform"]), errors
    assert sum(errors["greedy"]) < sum(errors["greedy-proxy"]), errors  # the block error is what it minimizes


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_with_low_rank_searches_with_the_corrections_in_place(family):
    dense = tiny_model(family, outliers=True)
    aware = run(copy.deepcopy(dense), sparsity=0.5, allocation="greedy", low_rank=8)
    # the allocation made without the corrections, then corrected: what the search improves on
    unaware = run(copy.deepcopy(dense), sparsity=0.5, allocation="greedy")
    for name in thresholds(unaware):
        sparsity.add_low_rank(unaware.get_submodule(name), 8)
    assert thresholds(aware) != thresholds(unaware)  # the corrections moved the allocation
    errors = {"aware": _layer_errors(aware, dense), "unaware": _layer_errors(unaware, dense)}
    assert sum(errors["aware"]) < sum(errors["unaware"]), errors
    assert abs(_weighted(aware, measured(aware)) - 0.5) <= 0.02


def test_greedy_gives_linears_that_read_one_tensor_one_threshold():
    table = thresholds(run(tiny_model("llama", outliers=True), sparsity=0.4, allocation="greedy"))
    for i in range(2):
        prefix = f"model.layers.{i}."
        assert len({table[prefix + f"self_attn.{p}_proj"][1] for p in "qkv"}) == 1
        assert table[prefix + "mlp.gate_proj"][1] == table[prefix + "mlp.up_proj"][1]
        assert table[prefix + "mlp.gate_proj"][1] != table[prefix + "mlp.down_proj"][1]


def test_cats_thresholds_the_gate_activation_only():
    model = run(tiny_model("llama"), sparsity=0.5, mode="cats")
    table = thresholds(model)
    assert set(table) == {f"model.layers.{i}.mlp.act_fn" for i in range(2)}
    assert all(where == OUTPUT for where, _ in table.values())
    assert all(abs(f - 0.5) <= 0.02 for f in measured(model).values())


@pytest.mark.parametrize("family,options", [("llama", {}), ("llama", {"allocation": "greedy"}),
                                            ("llama", {"mode": "cats"}), ("gpt2", {}), ("qwen2", {}), ("opt", {}),
                                            ("llama", {"low_rank": 8}), ("gpt2", {"low_rank": 8})])
@pytest.mark.parametrize("compiled", [True, False])
def test_decode_path_gives_the_thresholded_logits(family, options, compiled):
    model = run(tiny_model(family), sparsity=0.5, **options)
    # Text the thresholds were not calibrated on: a threshold is one of the calibration
    # activations, which would sit exactly on it and flip with the last bit of rounding.
    ids = tiny_windows(1, 12, seed=1)
    expected = logits(model, ids)
    fast = decode.to_decode(copy.deepcopy(model), compiled=compiled)
    assert any(isinstance(m, decode.SparseDecodeLinear) for m in fast.modules())
    with torch.no_grad():
        out = fast(input_ids=ids[:, :4], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for i in range(4, ids.shape[1]):  # one token at a time: the gather path
            out = fast(input_ids=ids[:, i:i + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
            cache = out.past_key_values
    assert torch.allclose(torch.cat(steps, dim=1), expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(expected, logits(decode.to_dense(copy.deepcopy(model)), ids), atol=1e-3)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_low_rank_correction_brings_the_model_back_towards_dense(family):
    dense_model = tiny_model(family)
    dense = logits(dense_model)
    errors = {}
    for rank in (0, 4, 16, 10_000):  # 10,000: above every weight's rank, so the full weight
        model = run(copy.deepcopy(dense_model), sparsity=0.5, low_rank=rank)
        errors[rank] = float((logits(model) - dense).norm() / dense.norm())
        factors = sparsity.low_ranks(model)
        assert len(factors) == (len(thresholds(model)) if rank else 0)
        for name, (a, b) in factors.items():
            out_features, in_features = linear_shape(model.get_submodule(name))
            assert a.shape == (out_features, min(rank, out_features, in_features)) and b.shape[1] == in_features
        # the thresholds still skip what they were set to skip
        assert all(abs(f - 0.5) <= 0.02 for f in measured(model).values())
    assert errors[0] > errors[4] > errors[16] and errors[10_000] < 1e-4


def test_low_rank_correction_survives_a_checkpoint_bit_for_bit(tmp_path):
    from pocketlm import checkpoint

    model = run(tiny_model("llama"), sparsity=0.4, low_rank=8)
    checkpoint.save_checkpoint(model, None, tmp_path / "ckpt")
    reloaded = checkpoint.load_checkpoint(tmp_path / "ckpt").model
    assert thresholds(reloaded) == thresholds(model)
    before, after = sparsity.low_ranks(model), sparsity.low_ranks(reloaded)
    assert before.keys() == after.keys() and all(torch.equal(before[n][i], after[n][i]) for n in before for i in (0, 1))
    assert torch.equal(logits(reloaded), logits(model))


def test_low_rank_with_cats_is_refused():
    with pytest.raises(Exception, match="low_rank corrects the skipped inputs of thresholded linears"):
        get_plugins().methods["activation-sparsity"].options(mode="cats", low_rank=8)


def test_low_rank_factors_that_do_not_fit_are_refused():
    model = tiny_model("llama")
    name = "model.layers.0.mlp.down_proj"
    out_features, in_features = linear_shape(model.get_submodule(name))
    with pytest.raises(PocketError, match=f"{name}: low-rank factors .* do not fit its {out_features} x {in_features}"):
        sparsity.install(model, {name: (INPUT, 0.1)},
                         factors={name: (torch.zeros(out_features, 4), torch.zeros(4, in_features + 1))})
    with pytest.raises(PocketError, match="a low-rank correction without an input threshold"):
        sparsity.install(model, {}, factors={name: (torch.zeros(out_features, 4), torch.zeros(4, in_features))})
    assert not thresholds(model)  # nothing half-applied


@pytest.mark.parametrize("value", [-0.1, 0.96, 1.0])
def test_sparsity_outside_the_range_is_refused(value):
    method = get_plugins().methods["activation-sparsity"]
    with pytest.raises(ValueError, match=r"sparsity must lie in \[0, 0.95\]"):
        method.options(sparsity=value)


def test_cats_on_an_unknown_mlp_names_the_family():
    for family in ("gpt2", "opt"):
        with pytest.raises(PocketError, match=f"the '{family}' family's MLP is not one that it knows") as info:
            run(tiny_model(family), sparsity=0.4, mode="cats")
        assert "mode = \"teal\"" in info.value.fix


def test_cats_with_greedy_is_refused():
    with pytest.raises(ValueError, match="use allocation='uniform'"):
        get_plugins().methods["activation-sparsity"].options(mode="cats", allocation="greedy")


def test_thresholds_that_do_not_fit_the_model_are_refused():
    model = tiny_model("llama")
    with pytest.raises(PocketError, match="do not match the model: model.layers.9.mlp.down_proj: no such module"):
        sparsity.install(model, {"model.layers.9.mlp.down_proj": (INPUT, 0.1)})
    with pytest.raises(PocketError, match="not a linear"):
        sparsity.install(model, {"model.layers.0.mlp": (INPUT, 0.1)})
    assert not thresholds(model)  # nothing half-applied


def test_checkpoint_without_the_plugin_is_refused(tmp_path, monkeypatch):
    from pocketlm import checkpoint

    model = run(tiny_model("llama"), sparsity=0.4)
    checkpoint.save_checkpoint(model, None, tmp_path / "ckpt")
    reloaded = checkpoint.load_checkpoint(tmp_path / "ckpt").model
    assert thresholds(reloaded) == thresholds(model) and torch.equal(logits(reloaded), logits(model))
    monkeypatch.delitem(checkpoint.MODULE_TYPES, "thresholded")
    with pytest.raises(PocketError, match="holds thresholded modules, which no installed plugin provides") as info:
        checkpoint.load_checkpoint(tmp_path / "ckpt")
    assert info.value.fix == "pip install pocketlm-dynamic"


needs_gptq = pytest.mark.skipif("gptq" not in get_plugins().methods, reason="pocketlm-gptq is not installed")


@needs_gptq
def test_gptq_then_activation_sparsity_calibrates_on_the_quantized_model():
    plugins = get_plugins()
    gptq = plugins.methods["gptq"]
    model = tiny_model("llama")
    plugins.hook.compress(model=model, method=gptq, options=gptq.options(bits=4, group_size=32),
                          context=make_context(WINDOWS, plugins=plugins))
    run(model, sparsity=0.4)
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert quantized and all(isinstance(m, Thresholded) for m in quantized if m.in_features != 256)
    assert all(abs(f - 0.4) <= 0.02 for f in measured(model).values())


@needs_gptq
def test_activation_sparsity_then_gptq_keeps_the_thresholds():
    plugins = get_plugins()
    gptq = plugins.methods["gptq"]
    model = run(tiny_model("llama"), sparsity=0.4)
    before = thresholds(model)
    plugins.hook.compress(model=model, method=gptq, options=gptq.options(bits=4, group_size=32),
                          context=make_context(WINDOWS, plugins=plugins))
    assert thresholds(model) == before
    assert all(isinstance(model.get_submodule(n), QuantizedLinear) for n in before)


@needs_gptq
def test_activation_sparsity_then_gptq_keeps_the_low_rank_correction():
    plugins = get_plugins()
    gptq = plugins.methods["gptq"]
    model = run(tiny_model("llama"), sparsity=0.4, low_rank=8)
    before = {n: (a.clone(), b.clone()) for n, (a, b) in sparsity.low_ranks(model).items()}
    plugins.hook.compress(model=model, method=gptq, options=gptq.options(bits=4, group_size=32),
                          context=make_context(WINDOWS, plugins=plugins))
    after = sparsity.low_ranks(model)
    assert after.keys() == before.keys() and all(isinstance(model.get_submodule(n), QuantizedLinear) for n in after)
    assert all(torch.equal(after[n][0], before[n][0]) and torch.equal(after[n][1], before[n][1]) for n in before)


@needs_gptq
@pytest.mark.parametrize("order", [("gptq", "activation-sparsity"), ("activation-sparsity", "gptq")])
def test_both_orders_validate_with_gptq(order):
    from pocketlm.recipe import combination_problems

    plugins = get_plugins()
    stages = [(plugins.methods[name], plugins.methods[name].options()) for name in order]
    assert combination_problems(stages, plugins.exporters["dynamic"]) == []
    problems = combination_problems(stages, plugins.exporters["hf"])
    assert problems and "cannot represent thresholds" in problems[0][1]


needs_distill = pytest.mark.skipif("distill" not in get_plugins().methods,
                                   reason="pocketlm-distill is not installed")


def _kl_to(reference, model) -> float:
    """Mean KL(reference || model) of the next-token distributions on WINDOWS."""
    from pocketlm.builtins.evaluators import token_kl

    return float(token_kl(logits(reference), logits(model)).mean())


@needs_distill
def test_distill_after_activation_sparsity_trains_the_weights_under_the_thresholds():
    from pocketlm.recipe import combination_problems

    plugins = get_plugins()
    distill = plugins.methods["distill"]
    options = distill.options(steps=40, batch_size=2, lr=1e-3, checkpoint_every=0)
    stages = [(plugins.methods["activation-sparsity"], plugins.methods["activation-sparsity"].options()),
              (distill, options)]
    assert combination_problems(stages, plugins.exporters["dynamic"]) == []
    torch.manual_seed(0)
    dense = tiny_model("llama")
    model = run(copy.deepcopy(dense), sparsity=0.4)
    before, lost = thresholds(model), _kl_to(dense, model)
    plugins.hook.compress(model=model, method=distill, options=options,
                          context=make_context(WINDOWS, teacher=copy.deepcopy(dense), plugins=plugins))
    assert thresholds(model) == before      # the rule stays; the weights learn to do without the skipped inputs
    assert _kl_to(dense, model) < 0.6 * lost
    fractions = measured(model).values()
    assert abs(sum(fractions) / len(fractions) - 0.4) <= 0.03
