"""The ``onnx`` exporter on tiny random encoders: the graph runs in ONNX Runtime and gives the
in-memory model's sentence embeddings; quantized grids are stored as the model's own codes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import (INT8_EVERYWHERE, SENTENCES, compressed, cosines, embeddings, encoder, export, initializers,
                      ops)

import pocketlm_onnx
from pocketlm import PocketError
from pocketlm.modules import auto_class
from pocketlm.plugins import get_plugins
from pocketlm.testing.models import tiny_config, tiny_model
from pocketlm.weights import QuantizedEmbedding, QuantizedLinear
from pocketlm_onnx import OnnxOptions, check, runtime


def test_registered():
    plugins = get_plugins()
    exporter = plugins.exporters["onnx"]
    assert exporter.options is OnnxOptions and exporter.library == "onnx"
    assert exporter.represents == {"dense", "masked", "restructured", "quantized"}
    assert exporter.packs == {"quantized", "quantized-embedding"}
    assert any(i.distribution == "pocketlm-onnx" and i.version == pocketlm_onnx.__version__ for i in plugins.infos)


@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta", "bert-mlm"])
def test_dense_export_matches_the_model(tmp_path, tokenizer, family):
    model = encoder(family)
    folder, _ = export(model, tmp_path, tokenizer)
    ours, theirs = embeddings(model, folder, tokenizer)
    # float32 throughout; only summation order differs between torch and ONNX Runtime
    assert np.abs(ours - theirs).max() < 1e-5
    assert cosines(ours, theirs).min() > 0.9999
    described = json.loads((folder / "pocketlm-onnx.json").read_text())
    takes_types = family != "distilbert"
    assert described["inputs"] == ["input_ids", "attention_mask"] + (["token_type_ids"] if takes_types else [])
    assert [i.name for i in runtime.inference_session(folder).get_inputs()] == described["inputs"]
    assert {"config.json", "tokenizer.json", "model.onnx"} <= {p.name for p in folder.iterdir()}


def test_the_export_prints_no_tracer_warnings(tmp_path, tokenizer):
    import warnings

    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export(encoder("bert"), tmp_path, tokenizer)
    assert not [w for w in caught if issubclass(w.category, torch.jit.TracerWarning) or "aten::index" in str(w.message)]


@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta"])
def test_attention_is_traced_in_its_eager_form(tmp_path, tokenizer, family):
    # PyTorch's scaled_dot_product_attention traces into NaN guards and shape arithmetic: a
    # fixed cost on every batch-1 sentence, most of an integer model's time (docs/bench/encoders.md)
    model = encoder(family)
    before = model.config._attn_implementation
    folder, _ = export(model, tmp_path, tokenizer)
    found = ops(folder)
    assert found.count("Softmax") == 2 and "IsNaN" not in found   # one softmax per layer, no guards
    assert model.config._attn_implementation == before   # the user's model is left as it was
    ours, theirs = embeddings(model, folder, tokenizer)
    assert np.abs(ours - theirs).max() < 1e-5


def test_dynamic_axes_and_last_hidden_state(tmp_path, tokenizer):
    model = encoder("bert")
    folder, _ = export(model, tmp_path, tokenizer)
    ort_session = runtime.inference_session(folder, threads=1)
    for batch_size in (1, 5):
        batch = tokenizer(SENTENCES[:batch_size], padding=True, return_tensors="np")
        hidden, vectors = ort_session.run(None, runtime.feed(ort_session, batch))
        assert hidden.shape == (batch_size, batch["input_ids"].shape[1], 64) and vectors.shape == (batch_size, 64)
        import torch

        with torch.no_grad():
            expected = model(**{k: torch.from_numpy(v) for k, v in batch.items()}).last_hidden_state.numpy()
        keep = batch["attention_mask"].astype(bool)
        assert np.abs(hidden - expected)[keep].max() < 1e-5


@pytest.mark.parametrize("mode", ["cls", "max"])
def test_pooling_and_normalization_are_in_the_graph(tmp_path, tokenizer, mode):
    model = encoder("bert")
    model.config.sentence_pooling = {"mode": mode, "normalize": True, "max_seq_length": 64}
    folder, _ = export(model, tmp_path, tokenizer)
    ours, theirs = embeddings(model, folder, tokenizer)
    assert np.allclose(np.linalg.norm(theirs, axis=1), 1, atol=1e-6)
    assert np.abs(ours - theirs).max() < 1e-5
    assert json.loads((folder / "pocketlm-onnx.json").read_text())["pooling"]["mode"] == mode


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_int8_per_channel_runs_on_integer_kernels(tmp_path, tokenizer, family):
    model = compressed(encoder(family), INT8_EVERYWHERE)
    folder, log = export(model, tmp_path, tokenizer)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear) and "pooler" not in n}
    assert len(layers) == 12 and ops(folder).count("MatMulInteger") == 12
    assert ops(folder).count("DynamicQuantizeLinear") == 12
    assert "12 8-bit MatMulInteger" in log.text()
    stored = initializers(folder)
    for name, module in layers.items():
        codes = module.storage.grid().numpy().astype(np.int16)
        # symmetric grid: the uint8 codes with zero point 128 (never int8, which saturates on
        # AVX2 CPUs without VNNI), [in, out] as MatMulInteger reads it
        weight, zero = stored[f"{name}.weight_quantized"], stored[f"{name}.weight_zero_point"]
        assert weight.dtype == np.uint8 and np.array_equal(weight.T.astype(np.int16), codes)
        assert np.array_equal(stored[f"{name}.weight_scale"], module.storage.scales.float().numpy()[:, 0])
        assert zero.dtype == np.uint8 and np.all(zero == 128)
        # the stored grid dequantizes to exactly the in-memory weights
        dequantized = (weight.T.astype(np.float32) - 128) * stored[f"{name}.weight_scale"][:, None]
        assert np.array_equal(dequantized, module.dequantize().numpy())
    ours, theirs = embeddings(model, folder, tokenizer)
    # Activations are quantized per tensor to uint8 at run time (DynamicQuantizeLinear), one
    # rounding of at most scale/2 per input, about 0.2% of each tensor's range: measured 0.006
    # at most on these vectors of norm about 1.
    assert cosines(ours, theirs).min() > 0.9995
    assert np.abs(ours - theirs).max() < 0.03


def test_int8_asymmetric_keeps_uint8_codes_and_zero_points(tmp_path, tokenizer):
    model = compressed(encoder("bert"), {**INT8_EVERYWHERE, "symmetric": False, "ignore": ["embed"]})
    folder, _ = export(model, tmp_path, tokenizer)
    module = model.encoder.layer[1].output.dense
    stored = initializers(folder)
    weight, zero = stored["encoder.layer.1.output.dense.weight_quantized"], stored["encoder.layer.1.output.dense.weight_zero_point"]
    assert weight.dtype == np.uint8 and np.array_equal(weight.T, module.storage.grid().numpy())
    assert np.array_equal(zero, module.storage.zeros.numpy()[:, 0]) and len(set(zero.tolist())) > 1
    dequantized = (weight.T.astype(np.float32) - zero[:, None]) * stored["encoder.layer.1.output.dense.weight_scale"][:, None]
    assert np.array_equal(dequantized, module.dequantize().numpy())
    ours, theirs = embeddings(model, folder, tokenizer)
    assert cosines(ours, theirs).min() > 0.9995


@pytest.mark.parametrize("symmetric", [True, False])
def test_7bit_per_channel_is_stored_as_int8_within_64(tmp_path, tokenizer, symmetric):
    # 7-bit codes as int8 q - 64: the uint8 x int8 kernel, exact on AVX2 CPUs without VNNI
    # because every weight lies in [-64, 63] (a pair of products stays within int16)
    model = compressed(encoder("bert"), {**INT8_EVERYWHERE, "bits": 7, "symmetric": symmetric})
    folder, log = export(model, tmp_path, tokenizer)
    assert "12 7-bit MatMulInteger" in log.text() and ops(folder).count("MatMulInteger") == 12
    stored = initializers(folder)
    for name, module in model.named_modules():
        if not isinstance(module, QuantizedLinear) or "pooler" in name:
            continue
        weight, zero = stored[f"{name}.weight_quantized"], stored[f"{name}.weight_zero_point"]
        assert weight.dtype == np.int8 and zero.dtype == np.int8
        assert weight.min() >= -64 and weight.max() <= 63
        assert np.array_equal(weight.T.astype(np.int16) + 64, module.storage.grid().numpy().astype(np.int16))
        if symmetric:
            assert np.all(zero == 0)
        dequantized = (weight.T.astype(np.float32) - zero[:, None]) * stored[f"{name}.weight_scale"][:, None]
        assert np.array_equal(dequantized, module.dequantize().numpy())
    ours, theirs = embeddings(model, folder, tokenizer)
    # the same bound as the 8-bit uint8 export: only the activations' run-time rounding differs
    # (a saturating kernel measured cosine 0.9937 on such a model)
    assert cosines(ours, theirs).min() > 0.9995
    assert np.abs(ours - theirs).max() < 0.03


def test_quantized_embedding_is_one_byte_per_weight(tmp_path, tokenizer):
    model = compressed(encoder("bert"), {**INT8_EVERYWHERE, "targets": ["embed"]})
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, QuantizedEmbedding)
    folder, log = export(model, tmp_path, tokenizer)
    stored = initializers(folder)
    name = "embeddings.word_embeddings"
    table = stored[f"{name}.weight_quantized"]
    assert table.dtype == np.uint8 and table.nbytes == embedding.num_embeddings * embedding.embedding_dim
    assert np.array_equal(table, embedding.storage.grid().numpy())
    assert f"{name}.weight" not in stored   # no float copy left behind
    assert "token embedding as a 8-bit uint8 table" in log.text()
    ours, theirs = embeddings(model, folder, tokenizer)
    # the table dequantizes exactly; only float summation order differs
    assert np.abs(ours - theirs).max() < 1e-5


def _int8_ready_encoder():
    """A small BERT (2.1M weights) whose float position table and graph (about 60 KB of nodes)
    are as small a share of the file as in real models; in the 64-wide tiny models they are a
    third of it, whatever the weights are stored in."""
    config = tiny_config("bert", hidden=256, intermediate=1024, vocab_size=2048)
    config.max_position_embeddings = 64
    return auto_class(config).from_config(config).eval()


def test_int8_export_is_at_least_3_5x_smaller(tmp_path):
    model = _int8_ready_encoder()
    dense, _ = export(model, tmp_path / "dense")
    int8, _ = export(compressed(model, INT8_EVERYWHERE), tmp_path / "int8")
    ratio = (dense / "model.onnx").stat().st_size / (int8 / "model.onnx").stat().st_size
    assert ratio >= 3.5, ratio


def test_group_wise_4_bit_as_matmulnbits_is_exact(tmp_path, tokenizer):
    model = compressed(encoder("distilbert"), {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False})
    folder, log = export(model, tmp_path, tokenizer)
    assert ops(folder).count("MatMulNBits") == 12 and "MatMulInteger" not in ops(folder)
    packed = initializers(folder)["transformer.layer.0.ffn.lin1.weight_packed"]
    assert packed.dtype == np.uint8 and packed.size == 128 * 64 // 2   # two 4-bit codes a byte
    ours, theirs = embeddings(model, folder, tokenizer)
    assert np.abs(ours - theirs).max() < 1e-5   # MatMulNBits dequantizes exactly, computes in float


def test_without_contrib_ops_group_wise_grids_are_written_as_floats(tmp_path, tokenizer):
    model = compressed(encoder("bert"), {"method": "rtn", "bits": 4, "group_size": 32})
    folder, log = export(model, tmp_path, tokenizer, contrib_ops=False)
    assert "MatMulNBits" not in ops(folder)
    assert "12 4-bit float" in log.text() and "contrib_ops = false" in log.text()
    ours, theirs = embeddings(model, folder, tokenizer)
    assert np.abs(ours - theirs).max() < 1e-5


def test_float16_storage_halves_dense_matrices(tmp_path, tokenizer):
    model = encoder("bert")
    full, _ = export(model, tmp_path / "f32", tokenizer)
    half, _ = export(model, tmp_path / "f16", tokenizer, dtype="float16")
    ratio = (full / "model.onnx").stat().st_size / (half / "model.onnx").stat().st_size
    assert 1.7 < ratio < 2.0   # matrices halve; norms, biases and the graph itself do not
    matrices = [a for a in initializers(half).values() if a.ndim >= 2 and a.dtype.kind == "f"]
    assert matrices and all(a.dtype == np.float16 for a in matrices)
    ours, theirs = embeddings(model, half, tokenizer)
    assert cosines(ours, theirs).min() > 0.9999   # float16 rounding of weights only


def test_masked_weights_stay_zero(tmp_path, tokenizer):
    from pocketlm.weights import set_mask
    import torch

    model = encoder("bert")
    layer = model.encoder.layer[0].intermediate.dense
    set_mask(layer, torch.rand(layer.weight.shape, generator=torch.Generator().manual_seed(0)) > 0.5)
    folder, _ = export(model, tmp_path, tokenizer)
    weight = initializers(folder)["encoder.layer.0.intermediate.dense.weight"]
    assert np.array_equal(weight.T == 0, ~layer.weight_mask.numpy())


def test_check_refuses_a_causal_lm():
    from pocketlm.testing import make_context

    problems = check(tiny_model("llama"), OnnxOptions(), make_context())
    assert len(problems) == 1 and "not an encoder" in problems[0] and "'llama'" in problems[0]
    assert check(encoder("bert"), OnnxOptions(), make_context()) == []


def test_export_of_a_causal_lm_is_one_clear_error(tmp_path):
    with pytest.raises(PocketError, match="writes sentence encoders"):
        export(tiny_model("llama"), tmp_path)


def test_options_are_closed():
    with pytest.raises(Exception, match="extra"):
        OnnxOptions(dtpye="float16")


def test_registering_the_plugin_does_not_import_onnx():
    """`pocketlm validate` loads every plugin: onnx (0.6 s of start-up) loads only to export."""
    import subprocess
    import sys

    code = ("import sys; from pocketlm.plugins import get_plugins; plugins = get_plugins(); "
            "assert 'onnx' in plugins.exporters; print(sorted(m for m in ('onnx', 'onnxruntime') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
