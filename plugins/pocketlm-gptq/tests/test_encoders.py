"""rtn and gptq on encoders (BERT, RoBERTa, DistilBERT, bare and masked-LM), through the same
methods and options as decoders: the walker runs the bidirectional layers, and the sentence
embeddings stay close to the original's."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from pocketlm import sentence
from pocketlm.testing.models import tiny_model, tiny_tokenizer
from pocketlm.weights import QuantizedEmbedding, QuantizedLinear, is_linear
from pocketlm_gptq.gptq import GPTQOptions, compress_gptq
from pocketlm_gptq.rtn import RTNOptions, compress_rtn

from conftest import capture_linear_inputs, reconstruction_error

SENTENCES = ["the cat sat on the mat", "a storm closed the northern pass for three days",
             "prices rose sharply in the second quarter", "she wrote the letter in french",
             "the river floods every spring", "he scored twice in the final minutes"]


def embedding_cosine(original, compressed) -> float:
    tokenizer = tiny_tokenizer(encoder=True)
    return F.cosine_similarity(sentence.embed(original, tokenizer, SENTENCES),
                               sentence.embed(compressed, tokenizer, SENTENCES)).mean().item()


def layer_linears(model) -> list[str]:
    return [n for n, m in model.named_modules() if is_linear(m) and ".layer." in n]


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "bert-mlm"])
def test_gptq_reconstructs_encoder_layers_better_than_rtn(family, windows, context):
    original = tiny_model(family, outliers=True)
    inputs = capture_linear_inputs(original, windows)
    options = dict(bits=4, group_size=32)
    rtn_model = compress_rtn(copy.deepcopy(original), RTNOptions(**options), context)
    gptq_model = compress_gptq(copy.deepcopy(original), GPTQOptions(**options), context)
    quantized = {n for n, m in gptq_model.named_modules() if isinstance(m, QuantizedLinear)}
    assert set(layer_linears(original)) <= quantized
    rtn_error = reconstruction_error(original, rtn_model, inputs)
    gptq_error = reconstruction_error(original, gptq_model, inputs)
    assert gptq_error < 0.9 * rtn_error, (gptq_error, rtn_error)


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_int8_keeps_sentence_embeddings_and_int4_stays_close(family, context):
    original = tiny_model(family)
    int8 = compress_gptq(copy.deepcopy(original), GPTQOptions(bits=8, group_size=-1), context)
    int4 = compress_gptq(copy.deepcopy(original), GPTQOptions(bits=4, group_size=32), context)
    assert embedding_cosine(original, int8) > 0.999
    assert 0.9 < embedding_cosine(original, int4) < embedding_cosine(original, int8)


def test_rtn_quantizes_an_encoders_embedding_to_int8(context):
    original = tiny_model("bert")
    model = compress_rtn(copy.deepcopy(original), RTNOptions(bits=8, group_size=-1, targets=["*", "embed"], ignore=[]),
                         context)
    assert isinstance(model.embeddings.word_embeddings, QuantizedEmbedding)
    error = (model.embeddings.word_embeddings.dequantize() - original.embeddings.word_embeddings.weight).abs().max()
    step = original.embeddings.word_embeddings.weight.abs().amax(1).max() / 127
    assert error <= step  # within one int8 step of the largest row
    assert embedding_cosine(original, model) > 0.999


def test_gptq_on_an_encoder_runs_from_a_recipe(tmp_path):
    from click.testing import CliRunner

    from pocketlm.cli import main
    from pocketlm.testing.models import save_tiny_model

    save_tiny_model(tmp_path / "tiny-bert", "bert")
    (tmp_path / "recipe.toml").write_text(
        '[model]\nsource = "tiny-bert"\n[calibration]\nsamples = 8\nseq_len = 32\n'
        '[[stages]]\nmethod = "gptq"\nbits = 8\ngroup_size = -1\n'
        '[evaluate]\nmetrics = ["size"]\n[export]\nformat = "hf"\npath = "out"\n')
    result = CliRunner().invoke(main, ["run", str(tmp_path / "recipe.toml"), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "gptq: 12 linears to 8 bits" in result.output
    assert "pooler.dense is outside the decoder layers; rounded to nearest" in result.output
    from transformers import AutoModel

    exported = AutoModel.from_pretrained(tmp_path / "run" / "out")
    assert type(exported).__name__ == "BertModel"
