"""Exports of tiny models, read back through transformers' GGUF loader and gguf.GGUFReader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import (export, grid_of, model_of, quantize_linears, relative_logit_error, reload,
                      tensor_types)
from gguf import GGUFReader, quants
from gguf import GGMLQuantizationType as Q

from pocketlm import weights as W
from pocketlm.plugins import get_plugins
import pocketlm
import pocketlm_gguf
from pocketlm_gguf import GGUFOptions, check


def _linear_types(path) -> set[str]:
    return {kind for name, kind in tensor_types(path).items()
            if name.startswith("blk.") and name.endswith(".weight") and "norm" not in name}


def test_registered():
    plugins = get_plugins()
    exporter = plugins.exporters["gguf"]
    assert exporter.options is GGUFOptions and "quantized" in exporter.represents
    assert any(info.distribution == "pocketlm-gguf" and info.version == pocketlm_gguf.__version__ for info in plugins.infos)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_q4_0_symmetric_g32_is_exact(tmp_path, family):
    model = quantize_linears(model_of(family), bits=4, group_size=32, symmetric=True)
    path, log = export(model, tmp_path, dtype="f32")
    assert _linear_types(path) == {"Q4_0"}
    assert "14 Q4_0 exact" in log.text()
    back = reload(path)
    assert relative_logit_error(model, back) < 1e-4


def test_q4_1_asymmetric_g32_is_exact_up_to_fp16_min(tmp_path):
    model = quantize_linears(model_of("llama"), bits=4, group_size=32, symmetric=False)
    path, log = export(model, tmp_path, dtype="f32")
    assert _linear_types(path) == {"Q4_1"}
    # the log says so: the grid is kept, the weights are not bit for bit
    assert "14 Q4_1 m-rounded" in log.text() and "Q4_1 exact" not in log.text()
    assert "gguf: 14 layer(s): asymmetric grids as Q4_1 keep q and d = scale exactly, but the offset m = -zero * " \
           "scale is stored as a float16 and rounds in " in log.text() and "not bit-exact" in log.text()
    back = reload(path)
    # weights: only m = fp16(-zero * scale) rounds (half an ulp); the un-permuted v projection
    # read back by transformers matches the grid to that bound
    module = model.model.layers[0].self_attn.v_proj
    storage = module.storage
    bound = float((storage.zeros.float() * storage.scales.float()).max()) * 2.0 ** -11
    difference = (back.model.layers[0].self_attn.v_proj.weight - module.dequantize()).abs().max()
    assert 0 < difference <= bound
    assert relative_logit_error(model, back) < 5e-3


def test_q8_0_and_group_64_and_tied_quantized_embedding(tmp_path):
    model = model_of("llama", hidden=64)
    model.config.tie_word_embeddings = True
    quantize_linears(model, bits=8, group_size=64, symmetric=True)
    embed = model.model.embed_tokens
    q, scales, zeros = grid_of(embed.weight.data, 4, 32, True)
    quantized = W.QuantizedEmbedding.from_grid(q, scales, zeros, bits=4, group_size=32, symmetric=True)
    model.model.embed_tokens = quantized
    model.lm_head = quantized.tied_head()
    path, _ = export(model, tmp_path)
    types = tensor_types(path)
    assert "output.weight" not in types and types["token_embd.weight"] == "Q4_0"
    assert _linear_types(path) == {"Q8_0"}
    back = reload(path)
    assert back.config.tie_word_embeddings
    assert relative_logit_error(model, back) < 1e-4


def test_dense_f32_exact_and_f16_close(tmp_path):
    model = model_of("mistral")
    path, _ = export(model, tmp_path / "a", dtype="f32")
    assert set(tensor_types(path).values()) == {"F32"}
    assert relative_logit_error(model, reload(path)) < 1e-5
    path, _ = export(model, tmp_path / "b", dtype="f16")
    types = tensor_types(path)
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.0.attn_q.weight"] == "F16"
    assert types["output.weight"] == "F16" and types["token_embd.weight"] == "F16"
    assert 0 < relative_logit_error(model, reload(path)) < 5e-3


def test_quantize_option_is_llama_cpp_rtn(tmp_path):
    model = model_of("llama")
    path, _ = export(model, tmp_path, quantize="q4_0", dtype="f32")
    reader = GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    assert _linear_types(path) == {"Q4_0"} and tensors["output.weight"].tensor_type == Q.F32
    v = model.model.layers[1].self_attn.v_proj.weight.detach().numpy()
    assert np.array_equal(np.asarray(tensors["blk.1.attn_v.weight"].data), quants.quantize(v, Q.Q4_0))
    # the reloaded model is the dense model with llama.cpp's RTN weights, nothing else
    back = reload(path)
    expected = model_of("llama")
    for name, module in expected.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            module.weight.data = torch.from_numpy(quants.dequantize(quants.quantize(module.weight.detach().numpy(), Q.Q4_0), Q.Q4_0).copy())
    assert relative_logit_error(expected, back) < 1e-4
    assert relative_logit_error(model, back) > 1e-3


def test_act_order_falls_back_with_a_notice(tmp_path):
    model = quantize_linears(model_of("llama"), bits=4, group_size=32, symmetric=False, act_order=True)
    path, log = export(model, tmp_path / "auto", dtype="f32")
    assert _linear_types(path) == {"Q4_1"}
    notice = log.text()
    assert "14 layer(s)" in notice and "act-order" in notice and "Q4_1" in notice and "is lost" in notice
    auto_error = relative_logit_error(model, reload(path))
    path, log = export(model, tmp_path / "q8", dtype="f32", fallback="q8_0")
    assert _linear_types(path) == {"Q8_0"} and "to Q8_0" in log.text()
    q8_error = relative_logit_error(model, reload(path))
    assert q8_error < auto_error / 4 and auto_error < 0.2


def test_metadata_and_tokenizer(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    model = quantize_linears(model_of("llama"), bits=4, group_size=32, symmetric=True)
    recipe = {"model": {"source": "tiny"}, "stages": [{"method": "gptq", "bits": 4}]}
    path, log = export(model, tmp_path, tok=tokenizer, recipe=recipe, filename="tiny.gguf", name="tiny-llama")
    reader = GGUFReader(path)
    value = lambda key: reader.fields[key].contents()  # noqa: E731
    assert value("general.architecture") == "llama" and value("general.name") == "tiny-llama"
    assert json.loads(value("pocketlm.recipe")) == recipe
    versions = json.loads(value("pocketlm.versions"))
    assert versions["pocketlm"] == pocketlm.__version__ and versions["pocketlm-gguf"] == pocketlm_gguf.__version__
    assert json.loads(value("pocketlm.tensors")) == {"F16 dense": 2, "Q4_0 exact": 14}
    config = model.config
    assert value("llama.block_count") == config.num_hidden_layers
    assert value("llama.embedding_length") == 64 and value("llama.feed_forward_length") == 128
    assert value("llama.attention.head_count") == 4 and value("llama.attention.head_count_kv") == 2
    assert value("llama.context_length") == 1024 and value("llama.vocab_size") == len(tokenizer)
    assert value("llama.rope.freq_base") == pytest.approx(10000.0)
    assert value("llama.attention.layer_norm_rms_epsilon") == pytest.approx(config.rms_norm_eps)
    assert value("general.file_type") == 2  # MOSTLY_Q4_0
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "gpt-2"
    assert len(value("tokenizer.ggml.merges")) > 50
    assert value("tokenizer.ggml.token_type")[:3] == [3, 3, 3]  # <unk>, <s>, </s> are control tokens
    assert value("tokenizer.ggml.bos_token_id") == 1 and value("tokenizer.ggml.eos_token_id") == 2

    loaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    text = "The quick brown fox, 1234 times; </s> and <s>!"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.decode(tokenizer(text)["input_ids"]) == text
    assert (loaded.bos_token, loaded.eos_token) == ("<s>", "</s>")
    back = reload(path)
    assert relative_logit_error(model, back) < 2e-3  # token_embd and output in F16 (the default dtype)


def test_check_refuses_other_families():
    from pocketlm.testing.models import tiny_model

    for family in ("gpt2", "opt", "phi3"):
        problems = check(tiny_model(family), GGUFOptions())
        assert len(problems) == 1 and "Llama-family" in problems[0] and repr(family) in problems[0]
    assert check(tiny_model("llama"), GGUFOptions()) == []
    with pytest.raises(ValueError):
        GGUFOptions(filename="../x.gguf")
    with pytest.raises(ValueError):
        GGUFOptions(quantize="q7_k")


def test_check_finds_the_layers_where_the_run_context_registers_them():
    import dataclasses

    from pocketlm.testing import make_context
    from pocketlm.testing.models import tiny_model

    model = tiny_model("llama")
    context = make_context()
    assert check(model, GGUFOptions(), context) == []
    # a run whose llama architecture puts the layers elsewhere: the check follows the run, not a table of its own
    moved = dataclasses.replace(context.architecture(model), layers="model.blocks")
    problems = check(model, GGUFOptions(), pocketlm.Context(architectures=(moved,)))
    assert len(problems) == 1 and "not where its registered architecture says" in problems[0]
    # and it goes through Exporter.problems, which hands the context to a check that takes one
    exporter = get_plugins().exporters["gguf"]
    assert exporter.problems(model, GGUFOptions(), pocketlm.Context(architectures=(moved,))) == problems
    unknown = pocketlm.Context(architectures=(dataclasses.replace(moved, model_types=("other",)),))
    assert "no architecture is registered for model type 'llama'" in check(model, GGUFOptions(), unknown)[0]


_LLAMA_CPP_SCRIPT = """
import json, sys
import numpy as np
from llama_cpp import Llama
path, ids = sys.argv[1], json.loads(sys.argv[2])
llm = Llama(model_path=path, n_ctx=64, logits_all=True, verbose=False, n_threads=1)
llm.eval(ids)
print(json.dumps({"scores": np.array(llm.scores[:len(ids)]).tolist(),
                  "tokens": llm.tokenize(sys.argv[3].encode(), add_bos=False)}))
"""


@pytest.mark.parametrize("family,bits,symmetric", [("llama", 4, True), ("llama", 4, False), ("qwen2", 8, True)])
def test_llama_cpp_runs_the_file(tmp_path, tokenizer, family, bits, symmetric):
    """llama.cpp loads the file, tokenizes like the tokenizer and computes the same logits (up to
    its Q8 rounding of activations in quantized matmuls). Needs llama-cpp-python: importable here,
    or in the environment whose python POCKETLM_LLAMA_PYTHON names."""
    import os
    import subprocess
    import sys

    python = os.environ.get("POCKETLM_LLAMA_PYTHON")
    if not python:
        pytest.importorskip("llama_cpp")
        python = sys.executable
    model = quantize_linears(model_of(family), bits=bits, group_size=32, symmetric=symmetric)
    path, _ = export(model, tmp_path, tok=tokenizer, dtype="f32")
    ids = list(range(3, 27))
    text = "The quick brown fox, 1234 times."
    done = subprocess.run([python, "-c", _LLAMA_CPP_SCRIPT, str(path), json.dumps(ids), text],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["tokens"] == tokenizer(text)["input_ids"]
    ours = model(input_ids=torch.tensor([ids])).logits[0].detach()
    theirs = torch.tensor(result["scores"])
    assert float((ours - theirs).abs().max() / ours.abs().max()) < 0.05
    assert float((ours.argmax(-1) == theirs.argmax(-1)).float().mean()) >= 0.9


def test_widths_without_32_column_blocks(tmp_path):
    """hidden 48: no block format fits the layers that read the hidden state; they stay dense
    (round-to-nearest) or fall back to F16 (grids), each with a notice."""
    model = model_of("llama", hidden=48, heads=4, kv_heads=2)
    path, log = export(model, tmp_path / "rtn", quantize="q4_0")
    types = tensor_types(path)
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.ffn_down.weight"] == "Q4_0"
    assert "12 layer(s) not quantized: input width 48 is not a multiple of 32" in log.text()
    quantize_linears(model, bits=4, group_size=16, symmetric=True)
    path, log = export(model, tmp_path / "grid", dtype="f32")
    types = tensor_types(path)
    assert types["blk.0.attn_q.weight"] == "F32" and types["blk.0.ffn_down.weight"] == "Q4_0"
    assert "input width 48 is not a multiple of 32" in log.text() and "group size 16" in log.text()
    assert relative_logit_error(model, reload(path)) < 0.1


def test_unsupported_tokenizer_is_a_clear_error(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from pocketlm import PocketError

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{i:02X}>": 3 + i for i in range(256)}}
    spm_like = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True)),
                                       unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    model = model_of("llama")
    with pytest.raises(PocketError, match="byte fallback"):
        export(model, tmp_path / "a", tok=spm_like)
    path, log = export(model, tmp_path / "b", tok=spm_like, tokenizer=False)
    assert "no tokenizer written" in log.text()
    assert not any(key.startswith("tokenizer.") for key in GGUFReader(path).fields)


def test_recipe_run_exports_gguf_with_provenance(tmp_path):
    """Through the pipeline: [export] format = "gguf" with exporter options in the recipe."""
    from pocketlm.pipeline import Run
    from pocketlm.recipe import parse_recipe
    from pocketlm.testing.models import save_tiny_model

    folder = save_tiny_model(tmp_path / "tiny", "llama")
    recipe = parse_recipe(f"""[model]
source = "{folder}"
[evaluate]
metrics = []
before = false
per_stage = []
[export]
format = "gguf"
quantize = "q8_0"
filename = "tiny.gguf"
""", get_plugins(), file="recipe.toml")
    Run(recipe, tmp_path / "run", get_plugins(), echo=lambda message: None).execute()
    path = tmp_path / "run" / "export" / "tiny.gguf"
    assert _linear_types(path) == {"Q8_0"}
    reader = GGUFReader(path)
    assert json.loads(reader.fields["pocketlm.recipe"].contents())["export"]["quantize"] == "q8_0"
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert 0 < relative_logit_error(dense, reload(path)) < 2e-2  # Q8_0 round-to-nearest, F16 embeddings


def test_model_card_facts_go_into_general_metadata(tmp_path):
    model = quantize_linears(model_of("llama"), bits=4, group_size=32, symmetric=True)
    recipe = {"model": {"source": "HuggingFaceTB/SmolLM2-135M-Instruct"}, "stages": [{"method": "gptq", "bits": 4}],
              "export": {"format": "gguf"}}
    path, _ = export(model, tmp_path, recipe=recipe, tokenizer=False)
    reader = GGUFReader(path)
    value = lambda key: reader.fields[key].contents()  # noqa: E731
    assert value("general.base_model.count") == 1
    assert value("general.base_model.0.name") == "SmolLM2-135M-Instruct"
    assert value("general.base_model.0.organization") == "HuggingFaceTB"
    assert value("general.base_model.0.repo_url") == "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct"
    assert value("general.tags") == ["pocketlm", "gptq", "gguf"]
    assert value("general.quantized_by") == "pocketlm"
    # a local folder names no base model
    path, _ = export(model, tmp_path / "local", recipe={"model": {"source": "./my-model"}}, tokenizer=False)
    assert "general.base_model.count" not in GGUFReader(path).fields
