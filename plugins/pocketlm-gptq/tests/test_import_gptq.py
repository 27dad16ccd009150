"""GPTQ checkpoints as sources: the grids read back exactly (bits, scales, zero points, act-order
g_idx), the model computes what the exported one did, and a symmetric 4-bit group-32 checkpoint
becomes a Q4_0 GGUF bit for bit."""

from __future__ import annotations

import pytest
import torch

from pocketlm.testing.models import tiny_model, tiny_tokenizer
from pocketlm.weights import QuantizedLinear
from pocketlm_gptq.export_gptq import GPTQExportOptions, export_gptq
from pocketlm_gptq.gptq import GPTQOptions, compress_gptq
from pocketlm_gptq.import_gptq import is_gptq_folder, load_gptq
from pocketlm_gptq.rtn import RTNOptions, compress_rtn


class _Options:
    dtype = "float32"
    trust_remote_code = False


def _grids(model) -> dict[str, tuple]:
    return {n: (m.storage.qweight.clone(), m.storage.scales.clone(), m.storage.zeros.clone(),
                None if m.storage.g_idx is None else m.storage.g_idx.clone(), m.bits, m.group_size, m.symmetric)
            for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def _same(a, b) -> bool:
    return all((x is None and y is None) or (isinstance(x, torch.Tensor) and torch.equal(x, y)) or x == y
               for x, y in zip(a, b))


@pytest.mark.parametrize("family,method,options,fmt", [
    ("llama", "rtn", {"bits": 4, "group_size": 32, "symmetric": True}, "gptq"),
    ("llama", "gptq", {"bits": 4, "group_size": 32, "act_order": True}, "gptq"),
    ("qwen2", "rtn", {"bits": 3, "group_size": 64, "symmetric": False}, "gptq_v2"),
    ("llama", "rtn", {"bits": 8, "group_size": -1, "symmetric": True}, "gptq"),
    ("gpt2", "rtn", {"bits": 4, "group_size": 32, "symmetric": True}, "gptq"),
])
def test_a_gptq_checkpoint_loads_with_its_grids_exactly(family, method, options, fmt, context, tmp_path):
    tokenizer = tiny_tokenizer()
    model = tiny_model(family, vocab_size=len(tokenizer))
    if method == "rtn":
        compress_rtn(model, RTNOptions(**options), context)
    else:
        compress_gptq(model, GPTQOptions(**options), context)
    context.tokenizer = tokenizer
    export_gptq(model, tmp_path, GPTQExportOptions(checkpoint_format=fmt), context)
    assert is_gptq_folder(str(tmp_path)) and not is_gptq_folder(str(tmp_path / "nothing"))

    loaded = load_gptq(str(tmp_path), _Options()).model
    before, after = _grids(model), _grids(loaded)
    assert before.keys() == after.keys() and before
    for name in before:
        assert _same(before[name], after[name]), name
    ids = torch.randint(3, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # non-quantized tensors went through float16 in the checkpoint, so not bit-identical
        reference, got = model(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert (reference - got).abs().max() / reference.abs().max() < 2e-3


def test_a_symmetric_4bit_g32_checkpoint_becomes_q4_0_gguf_bit_for_bit(context, tmp_path):
    gguf = pytest.importorskip("gguf")
    from pocketlm.pipeline import Run
    from pocketlm.plugins import get_plugins
    from pocketlm.recipe import parse_recipe

    plugins = get_plugins()
    if "gguf" not in plugins.exporters:
        pytest.skip("needs pocketlm-gguf")
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tokenizer))
    compress_rtn(model, RTNOptions(bits=4, group_size=32, symmetric=True), context)
    context.tokenizer = tokenizer
    (tmp_path / "gptq").mkdir()
    export_gptq(model, tmp_path / "gptq", GPTQExportOptions(), context)

    text = (f'[model]\nsource = "{tmp_path / "gptq"}"\n[evaluate]\nmetrics = []\nper_stage = []\n'
            '[export]\nformat = "gguf"\ntokenizer = false\n')
    Run(parse_recipe(text, plugins), tmp_path / "run", plugins, echo=lambda m: None).execute()
    reader = gguf.GGUFReader(tmp_path / "run" / "export" / "model.gguf")
    matrices = {t.name: t for t in reader.tensors if t.name.startswith("blk.")}
    q4 = {n: t for n, t in matrices.items() if t.tensor_type.name == "Q4_0"}
    assert len(q4) == 14  # 2 layers x 7 linears, every one exact
    # each block: the fp16 scale and 32 4-bit values, exactly the checkpoint's (q - 8) * d
    name, source = "blk.0.ffn_down.weight", model.model.layers[0].mlp.down_proj
    raw = q4[name].data.reshape(-1, 18)
    d = torch.from_numpy(raw[:, :2].copy().view("float16").astype("float32")).flatten()
    assert torch.equal(d.half(), source.storage.scales.flatten())
    low, high = torch.from_numpy(raw[:, 2:] & 0x0F).long(), torch.from_numpy(raw[:, 2:] >> 4).long()
    q = torch.cat([low, high], 1).reshape(source.out_features, source.in_features)
    assert torch.equal(q, source.storage.grid().long())


# ------------------------------------------------------------ compressed-tensors (llm-compressor)


@pytest.mark.parametrize("family,options", [
    ("llama", {"bits": 4, "group_size": 32, "symmetric": True}),
    ("qwen2", {"bits": 4, "group_size": 64, "symmetric": False}),
    ("llama", {"bits": 8, "group_size": -1, "symmetric": True}),
])
def test_a_compressed_tensors_checkpoint_loads_with_its_grids_exactly(family, options, context, tmp_path):
    pytest.importorskip("compressed_tensors")
    from pocketlm_gptq.export_compressed_tensors import CTExportOptions, export_compressed_tensors
    from pocketlm_gptq.import_compressed_tensors import is_compressed_tensors_folder, load_compressed_tensors

    tokenizer = tiny_tokenizer()
    model = tiny_model(family, vocab_size=len(tokenizer))
    compress_rtn(model, RTNOptions(**options), context)
    context.tokenizer = tokenizer
    export_compressed_tensors(model, tmp_path, CTExportOptions(), context)
    assert is_compressed_tensors_folder(str(tmp_path)) and not is_gptq_folder(str(tmp_path))
    loaded = load_compressed_tensors(str(tmp_path), _Options()).model
    before, after = _grids(model), _grids(loaded)
    assert before.keys() == after.keys() and before
    for name in before:
        assert _same(before[name], after[name]), name


def test_a_grid_that_cannot_be_kept_exactly_is_refused_with_the_reason(context, tmp_path):
    pytest.importorskip("compressed_tensors")
    import json

    from safetensors.torch import load_file, save_file

    from pocketlm import PocketError
    from pocketlm_gptq.export_compressed_tensors import CTExportOptions, export_compressed_tensors
    from pocketlm_gptq.import_compressed_tensors import load_compressed_tensors

    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tokenizer))
    compress_rtn(model, RTNOptions(bits=4, group_size=32, symmetric=True), context)
    export_compressed_tensors(model, tmp_path, CTExportOptions(), context)
    tokenizer.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in tensors if k.endswith("weight_scale"))
    original = tensors[key].clone()
    tensors[key] = original.float() * (1 + 2**-20)  # float32 scales float16 cannot hold
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(PocketError, match="float32 scales are not all exact in float16"):
        load_compressed_tensors(str(tmp_path), _Options())
    tensors[key] = original
    save_file(tensors, str(weights), metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    for group in config["quantization_config"]["config_groups"].values():
        group["weights"]["strategy"] = "tensor"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(PocketError, match="strategy 'tensor' has no pocketlm grid"):
        load_compressed_tensors(str(tmp_path), _Options())


def test_a_checkpoint_without_its_tokenizer_is_refused_before_the_weights_load(context, tmp_path):
    from pocketlm import PocketError

    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tokenizer))
    compress_rtn(model, RTNOptions(bits=4, group_size=32, symmetric=True), context)
    context.tokenizer = None  # an export written without a tokenizer beside it
    export_gptq(model, tmp_path, GPTQExportOptions(), context)
    assert is_gptq_folder(str(tmp_path))
    with pytest.raises(PocketError) as error:
        load_gptq(str(tmp_path), _Options())
    assert f"{tmp_path} has no tokenizer" in str(error.value)
    assert error.value.field == "model.source" and "save_pretrained" in error.value.fix
