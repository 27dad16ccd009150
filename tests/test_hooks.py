"""Every hook, called through the plugin manager."""

import types

import pytest
import torch

import pocketlm
from pocketlm import hookimpl, hookspecs
from pocketlm.components import Architecture, Evaluator, Exporter, Loader, NoOptions
from pocketlm.plugins import Plugins
from pocketlm.testing import make_context
from pocketlm.testing.models import tiny_model, tiny_windows

from .conftest import make_toy_plugin

HOOKS = sorted(n for n in dir(hookspecs) if not n.startswith("_") and callable(getattr(hookspecs, n))
               and n not in ("hookspec", "annotations") and getattr(getattr(hookspecs, n), "pocketlm_spec", None) is not None)


def test_the_hook_list_is_what_the_docs_and_this_file_cover():
    assert HOOKS == ["compress", "evaluate", "export", "load_model", "register_architectures",
                     "register_evaluators", "register_exporters", "register_grid_rules", "register_loaders",
                     "register_methods", "register_translators"]


def test_register_methods(toy_plugins):
    assert {"toy-mask", "toy-round"} <= set(toy_plugins.methods)
    assert toy_plugins.owner[("methods", "toy-round")] == "toy"


def test_register_loaders_evaluators_exporters_architectures_from_a_plugin():
    plugin = types.ModuleType("extra")
    plugin.POCKETLM_API = ">=1.0"
    plugin.register_loaders = hookimpl(lambda register: register(Loader("mem", lambda s: s == "mem:x",
                                                                        lambda s, o: pocketlm.LoadedModel(tiny_model(), None, s))))
    plugin.register_evaluators = hookimpl(lambda register: register(Evaluator("count", NoOptions,
                                                                              lambda m, o, c: {"count": 1.0})))
    plugin.register_exporters = hookimpl(lambda register: register(Exporter("nothing", NoOptions,
                                                                            lambda m, p, o, c: (p / "x").write_text("x"))))
    arch = Architecture("mine", ("mine",), "model.layers", "model.embed_tokens", "lm_head", "model.norm", ((),))
    plugin.register_architectures = hookimpl(lambda register: register(arch))
    plugins = Plugins(entry_points=False, extra=[("extra", plugin)])
    assert plugins.loaders[0].name == "mem"  # plugins' loaders are tried before the built-ins
    assert "count" in plugins.evaluators and "nothing" in plugins.exporters
    assert plugins.architectures[0] is arch
    # and through the working hooks
    loaded = plugins.hook.load_model(source="mem:x", options=None, context=make_context(plugins=plugins))
    assert loaded.model.config.model_type == "llama"


def test_load_model_hook_dispatches_to_the_first_matching_loader(tiny_folder, toy_plugins):
    loaded = toy_plugins.hook.load_model(source=str(tiny_folder), options=None, context=make_context(plugins=toy_plugins))
    assert loaded.tokenizer is not None and loaded.model.config.model_type == "llama"


def test_compress_hook_runs_the_registered_method(toy_plugins):
    model = tiny_model("llama")
    method = toy_plugins.methods["toy-mask"]
    result = toy_plugins.hook.compress(model=model, method=method, options=method.options(),
                                       context=make_context(plugins=toy_plugins))
    weight = result.model.layers[0].mlp.up_proj.weight
    assert abs((weight == 0).float().mean().item() - 0.5) < 0.01


def test_evaluate_hook(toy_plugins):
    from pocketlm.testing.models import tiny_tokenizer

    model = tiny_model("llama", vocab_size=len(tiny_tokenizer()))
    evaluator = toy_plugins.evaluators["parameters"]
    result = toy_plugins.hook.evaluate(model=model, evaluator=evaluator, options=NoOptions(),
                                       context=make_context(plugins=toy_plugins))
    assert result["parameters"] == sum(p.numel() for p in model.parameters())


def test_export_hook_writes_a_folder_transformers_loads(tmp_path, toy_plugins):
    from transformers import AutoModelForCausalLM

    model = tiny_model("gpt2")
    exporter = toy_plugins.exporters["hf"]
    path = toy_plugins.hook.export(model=model, exporter=exporter, options=exporter.options(), path=tmp_path,
                                   context=make_context(plugins=toy_plugins))
    reloaded = AutoModelForCausalLM.from_pretrained(path)
    windows = tiny_windows(2, 8)
    assert torch.allclose(reloaded(windows).logits, model(windows).logits, atol=1e-5)


def test_a_wrapper_sees_every_compress_call(toy_plugins):
    calls = []
    spy = types.ModuleType("spy")

    @hookimpl(wrapper=True)
    def compress(model, method, options, context):
        calls.append(method.name)
        result = yield                  # what the method returned
        calls.append(result is model)
        return result

    spy.compress = compress
    toy_plugins.pm.register(spy)
    method = toy_plugins.methods["toy-mask"]
    model = tiny_model("llama")
    returned = toy_plugins.hook.compress(model=model, method=method, options=method.options(),
                                         context=make_context(plugins=toy_plugins))
    assert calls == ["toy-mask", True]
    assert returned is model
