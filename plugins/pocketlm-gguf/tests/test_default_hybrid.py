"""With the first-party quantizer installed, the planner's default hybrid quantizes the token
embedding too, and ``format = "auto"`` picks this exporter because it is the one that packs a
quantized embedding: the whole default run ends in one .gguf file that transformers loads."""

from __future__ import annotations

import pytest
from conftest import bpe_tokenizer, model_of, relative_logit_error, reload, tensor_types

from pocketlm.checkpoint import load_checkpoint
from pocketlm.pipeline import Run
from pocketlm.planner import default_candidate, to_toml
from pocketlm.plugins import get_plugins
from pocketlm.recipe import parse_recipe


def test_the_default_hybrid_runs_to_an_exact_q8_0_gguf(tmp_path):
    plugins = get_plugins()
    if "gptq" not in plugins.methods:
        pytest.skip("pocketlm-gptq is not installed")
    folder = tmp_path / "model"
    model = model_of("llama", hidden=64)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(folder)
    bpe_tokenizer().save_pretrained(folder)

    candidate = default_candidate(plugins)
    data = candidate.recipe(str(folder), "auto")
    data["calibration"] = {"samples": 4, "seq_len": 32}
    text = to_toml(data) + "\n[evaluate.perplexity]\nwindows = 2\nseq_len = 32\n"
    recipe = parse_recipe(text, plugins, file="default.toml")
    run_dir = tmp_path / "run"
    Run(recipe, run_dir, plugins, echo=lambda m: None).execute()

    assert "export format auto: chose 'gguf'" in (run_dir / "run.log").read_text()
    path = run_dir / "export" / "model.gguf"
    types = tensor_types(path)
    assert types["token_embd.weight"] == "Q8_0"
    assert {t for n, t in types.items() if n.startswith("blk.") and "norm" not in n} == {"Q8_0"}
    assert "output.weight" not in types          # the tied head is the embedding, written once
    last_stage = sorted(p for p in (run_dir / "stages").iterdir() if not p.name.endswith(".work"))[-1]
    compressed = load_checkpoint(last_stage).model.float().eval()
    assert relative_logit_error(compressed, reload(path)) < 1e-4   # exact blocks: the same weights
