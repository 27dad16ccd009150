"""AutoAWQ GEMM checkpoints as sources: the grids read back exactly (every grid value, scale and
zero point), they go on to the gptq and compressed-tensors formats unchanged, GGUF keeps the grid
(Q4_1, whose float16 offset rounds, and says so; a symmetric grid becomes Q4_0 bit for bit), and
every layout pocketlm cannot keep exactly is refused with the reason."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from pocketlm import PocketError
from pocketlm.plugins import get_plugins
from pocketlm.testing import make_context
from pocketlm.testing.models import tiny_model, tiny_tokenizer, tiny_windows
from pocketlm.weights import QuantizedLinear
from pocketlm_awq.awq import AWQOptions, compress
from pocketlm_awq.export_awq import AWQExportOptions, export_awq, pack_awq
from pocketlm_awq.import_awq import is_awq_folder, load_awq, unpack_awq

FAST = {"bits": 4, "group_size": 32, "n_grid": 4, "clip_grid": 4}


class _Options:
    dtype = "float32"
    trust_remote_code = False


def _grids(model) -> dict[str, tuple]:
    return {n: (m.storage.qweight.clone(), m.storage.scales.clone(), m.storage.zeros.clone(), m.storage.g_idx,
                m.bits, m.group_size, m.symmetric)
            for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def _assert_same_grids(expected, model):
    got = _grids(model)
    assert expected.keys() == got.keys() and len(expected) == 14  # 2 layers x 7 linears
    for name in expected:
        for a, b in zip(expected[name], got[name]):
            assert (a is None and b is None) or (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b), name


def _quantized(family: str, method: str, options: dict):
    tokenizer = tiny_tokenizer()
    model = tiny_model(family, vocab_size=len(tokenizer), outliers=True)
    context = make_context(tiny_windows(8, 32, vocab_size=len(tokenizer)), tokenizer=tokenizer)
    if method == "awq":
        compress(model, AWQOptions(**options), context)
    else:
        rtn = pytest.importorskip("pocketlm_gptq.rtn")
        rtn.compress_rtn(model, rtn.RTNOptions(**options), context)
    return model, context


def _awq_folder(path, family="llama", method="awq", options=FAST):
    """A tiny model quantized by ``method``, written by the awq exporter into ``path``."""
    model, context = _quantized(family, method, options)
    path.mkdir(parents=True)
    export_awq(model, path, AWQExportOptions(), context)
    return model, context


def test_unpack_awq_is_the_exact_inverse_of_pack_awq():
    values = torch.randint(0, 16, (6, 64), generator=torch.Generator().manual_seed(0))
    words = pack_awq(values)
    assert words.dtype == torch.int32 and words.shape == (6, 8)
    assert torch.equal(unpack_awq(words), values)
    assert torch.equal(pack_awq(unpack_awq(words)), words)
    # the interleaved order: the word 0x75316420 holds outputs 0..7 (nibble i is output AWQ_ORDER[i])
    assert unpack_awq(torch.tensor([[0x75316420]], dtype=torch.int32)).tolist() == [list(range(8))]
    assert unpack_awq(torch.tensor([[-1]], dtype=torch.int32)).tolist() == [[15] * 8]  # sign bit: a value of 15


@pytest.mark.parametrize("family,method,options,symmetric", [
    ("llama", "awq", FAST, False),
    ("qwen2", "awq", FAST, False),
    ("llama", "rtn", {"bits": 4, "group_size": 32, "symmetric": False}, False),
    ("qwen2", "rtn", {"bits": 4, "group_size": 64, "symmetric": True}, True),
])
def test_an_awq_checkpoint_loads_with_its_grids_exactly(family, method, options, symmetric, tmp_path):
    model, _ = _awq_folder(tmp_path / "awq", family, method, options)
    assert is_awq_folder(str(tmp_path / "awq")) and not is_awq_folder(str(tmp_path / "nothing"))
    loaded = load_awq(str(tmp_path / "awq"), _Options())
    _assert_same_grids(_grids(model), loaded.model)
    assert all(m.symmetric is symmetric for m in loaded.model.modules() if isinstance(m, QuantizedLinear))
    assert loaded.tokenizer("the grid").input_ids == tiny_tokenizer()("the grid").input_ids
    with torch.no_grad():  # the checkpoint holds the dense tensors (norms, embeddings, biases) in float16
        for parameter in model.parameters():
            parameter.copy_(parameter.half().float())
    ids = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded.model(input_ids=ids).logits)


def test_the_loader_is_registered_and_the_first_to_claim_an_awq_folder(tmp_path):
    loaders = get_plugins().loaders
    loader = next(l for l in loaders if l.name == "awq-checkpoint")
    assert loader.summary == "an AutoAWQ GEMM checkpoint folder (AutoAWQ, transformers), its grids kept exactly"
    _awq_folder(tmp_path / "awq")
    # the pipeline takes the first loader that matches (the built-in hf loader, tried last, takes any folder)
    claims = [l.name for l in loaders if l.matches(str(tmp_path / "awq"))]
    assert claims[0] == "awq-checkpoint" and "gptq-checkpoint" not in claims


def test_autoawqs_quantize_config_json_alone_marks_a_checkpoint(tmp_path):
    """AutoAWQ before transformers' integration kept the settings only in quantize_config.json."""
    model, _ = _awq_folder(tmp_path / "awq")
    config = json.loads((tmp_path / "awq" / "config.json").read_text())
    del config["quantization_config"]
    (tmp_path / "awq" / "config.json").write_text(json.dumps(config))
    assert json.loads((tmp_path / "awq" / "quantize_config.json").read_text()) == \
        {"zero_point": True, "q_group_size": 32, "w_bit": 4, "version": "GEMM"}
    assert is_awq_folder(str(tmp_path / "awq"))
    gptq = pytest.importorskip("pocketlm_gptq.import_gptq")
    assert not gptq.is_gptq_folder(str(tmp_path / "awq"))
    _assert_same_grids(_grids(model), load_awq(str(tmp_path / "awq"), _Options()).model)


@pytest.mark.parametrize("method,options", [
    ("awq", FAST),
    ("rtn", {"bits": 4, "group_size": 32, "symmetric": True}),
])
def test_a_loaded_checkpoint_goes_on_to_gptq_and_compressed_tensors_with_the_same_grids(method, options, tmp_path):
    gptq_export = pytest.importorskip("pocketlm_gptq.export_gptq")
    gptq_import = pytest.importorskip("pocketlm_gptq.import_gptq")
    _awq_folder(tmp_path / "awq", "llama", method, options)
    loaded = load_awq(str(tmp_path / "awq"), _Options())
    expected = _grids(loaded.model)
    context = make_context(tokenizer=loaded.tokenizer)

    for fmt in ("gptq", "gptq_v2"):
        export_options = gptq_export.GPTQExportOptions(checkpoint_format=fmt)
        assert gptq_export.check_gptq(loaded.model, export_options) == []
        export_gptq = tmp_path / fmt
        export_gptq.mkdir()
        gptq_export.export_gptq(loaded.model, export_gptq, export_options, context)
        _assert_same_grids(expected, gptq_import.load_gptq(str(export_gptq), _Options()).model)

    pytest.importorskip("compressed_tensors")
    from pocketlm_gptq.export_compressed_tensors import CTExportOptions, export_compressed_tensors
    from pocketlm_gptq.import_compressed_tensors import load_compressed_tensors

    (tmp_path / "ct").mkdir()
    export_compressed_tensors(loaded.model, tmp_path / "ct", CTExportOptions(), context)
    _assert_same_grids(expected, load_compressed_tensors(str(tmp_path / "ct"), _Options()).model)


def _gguf_export(source, run_dir):
    """Run a recipe that loads ``source`` and exports it as GGUF; the run's messages."""
    from pocketlm.pipeline import Run
    from pocketlm.recipe import parse_recipe

    plugins = get_plugins()
    if "gguf" not in plugins.exporters:
        pytest.skip("needs pocketlm-gguf")
    messages = []
    text = (f'[model]\nsource = "{source}"\n[evaluate]\nmetrics = []\nper_stage = []\n'
            '[export]\nformat = "gguf"\ntokenizer = false\n')
    Run(parse_recipe(text, plugins), run_dir, plugins, echo=messages.append).execute()
    return messages


def _block_fields(tensor, rows: int, cols: int, size: int):
    """A Q4_0 (18 bytes) or Q4_1 (20 bytes) tensor's ``d``, ``m`` (Q4_1 only) and 4-bit values."""
    raw = tensor.data.reshape(-1, size)
    halves = lambda a: torch.from_numpy(a.copy().view("float16").astype("float32")).flatten()  # noqa: E731
    d = halves(raw[:, :2])
    m = halves(raw[:, 2:4]) if size == 20 else None
    nibbles = raw[:, size - 16:]
    low, high = torch.from_numpy(nibbles & 0x0F).long(), torch.from_numpy(nibbles >> 4).long()
    return d, m, torch.cat([low, high], 1).reshape(rows, cols)


def test_gguf_keeps_an_awq_grid_as_q4_1_whose_float16_offset_rounds_and_says_so(tmp_path):
    """AWQ grids are asymmetric: w = (q - z) * s. GGUF's Q4_1 computes d * q + m, so the exporter
    writes d = s and m = -z * s. q and d are the checkpoint's bit for bit, but m is a float16,
    and z * s (up to 15 times an 11-bit significand) does not fit one in most blocks: the
    export is not bit-exact, and the run log says so instead of calling it exact."""
    gguf = pytest.importorskip("gguf")
    _awq_folder(tmp_path / "awq")
    messages = _gguf_export(tmp_path / "awq", tmp_path / "run")
    reader = gguf.GGUFReader(tmp_path / "run" / "export" / "model.gguf")
    matrices = {t.name: t for t in reader.tensors if t.name.startswith("blk.") and "norm" not in t.name}
    assert {t.tensor_type.name for t in matrices.values()} == {"Q4_1"} and len(matrices) == 14

    source = load_awq(str(tmp_path / "awq"), _Options()).model.model.layers[0].mlp.down_proj.storage
    d, m, q = _block_fields(matrices["blk.0.ffn_down.weight"], source.rows, source.cols, 20)
    assert torch.equal(q, source.grid().long())                        # the grid, exactly
    assert torch.equal(d.half(), source.scales.flatten())              # d = s, exactly
    offset = -source.zeros.float() * source.scales.float()              # m = -z * s, exact in float32
    assert torch.equal(m, offset.half().float().flatten())             # ... stored as a float16
    rounded = int((offset.half().float() != offset).sum())
    assert 0 < rounded < offset.numel()
    assert (m - offset.flatten()).abs().max() <= float(offset.abs().max()) * 2.0 ** -11  # half a float16 ulp

    notice = next(line for line in messages if "asymmetric grids as Q4_1" in line)
    assert notice.startswith("gguf: 14 layer(s): asymmetric grids as Q4_1 keep q and d = scale exactly, but the "
                             "offset m = -zero * scale is stored as a float16 and rounds in ")
    assert "the weights are not bit-exact (symmetric grids are, as Q4_0)" in notice
    assert any(line.endswith("14 Q4_1 m-rounded)") for line in messages)


def test_gguf_writes_a_symmetric_awq_checkpoint_as_q4_0_bit_for_bit(tmp_path):
    """An AWQ checkpoint whose zero points are all 8 (a symmetric grid) loads as symmetric, and
    Q4_0's d * (q - 8) is then exactly the checkpoint's (q - 8) * s."""
    gguf = pytest.importorskip("gguf")
    _awq_folder(tmp_path / "awq", method="rtn", options={"bits": 4, "group_size": 32, "symmetric": True})
    messages = _gguf_export(tmp_path / "awq", tmp_path / "run")
    reader = gguf.GGUFReader(tmp_path / "run" / "export" / "model.gguf")
    matrices = {t.name: t for t in reader.tensors if t.name.startswith("blk.") and "norm" not in t.name}
    assert {t.tensor_type.name for t in matrices.values()} == {"Q4_0"} and len(matrices) == 14
    source = load_awq(str(tmp_path / "awq"), _Options()).model.model.layers[0].mlp.down_proj.storage
    d, _, q = _block_fields(matrices["blk.0.ffn_down.weight"], source.rows, source.cols, 18)
    assert torch.equal(q, source.grid().long()) and torch.equal(d.half(), source.scales.flatten())
    assert any(line.endswith("14 Q4_0 exact)") for line in messages)
    assert not any("not bit-exact" in line for line in messages)


# ------------------------------------------------------------------------------------ refusals


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _refusal(folder) -> PocketError:
    with pytest.raises(PocketError) as error:
        load_awq(str(folder), _Options())
    assert str(folder) in str(error.value) and error.value.field == "model.source" and error.value.fix
    return error.value


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoint") / "awq"
    _awq_folder(folder)
    return folder


@pytest.fixture
def copy_of(checkpoint, tmp_path):
    shutil.copytree(checkpoint, tmp_path / "awq")
    return tmp_path / "awq"


@pytest.mark.parametrize("changes,message", [
    ({"version": "gemv"}, "AWQ version 'gemv' packs its grids differently; pocketlm reads the GEMM layout"),
    ({"version": "marlin"}, "AWQ version 'marlin' packs its grids differently"),
    ({"version": "exllama"}, "AWQ version 'exllama' packs its grids differently"),
    ({"bits": 8}, "8-bit AWQ grids; the GEMM layout is 4-bit"),
    ({"zero_point": False}, "an AWQ checkpoint without zero points (zero_point = false)"),
])
def test_a_layout_pocketlm_cannot_keep_exactly_is_refused(changes, message, copy_of):
    _edit_config(copy_of, **changes)
    error = _refusal(copy_of)
    assert message in str(error) and "GEMM checkpoint" in error.fix


def test_an_autoawq_gemv_quantize_config_is_refused_too(copy_of):
    config = json.loads((copy_of / "config.json").read_text())
    del config["quantization_config"]
    (copy_of / "config.json").write_text(json.dumps(config))
    (copy_of / "quantize_config.json").write_text(json.dumps(
        {"zero_point": True, "q_group_size": 32, "w_bit": 4, "version": "GEMV"}))
    assert "AWQ version 'GEMV' packs its grids differently" in str(_refusal(copy_of))


def test_tensors_that_do_not_match_the_config_are_refused(copy_of):
    _edit_config(copy_of, group_size=64)  # the scales hold groups of 32
    error = _refusal(copy_of)
    assert "cannot read the AWQ grid of model.layers.0.mlp.down_proj: scales are [4, 64], but qweight " \
           "[128, 8] and group_size 64 make them [2, 64]" in str(error)
    assert "config.json" in error.fix


def test_a_missing_qzeros_tensor_is_refused(copy_of):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(copy_of / "model.safetensors"))
    del tensors["model.layers.1.self_attn.o_proj.qzeros"]
    save_file(tensors, str(copy_of / "model.safetensors"), metadata={"format": "pt"})
    assert "cannot read the AWQ grid of model.layers.1.self_attn.o_proj: missing 'qzeros'" in str(_refusal(copy_of))


def test_float32_scales_float16_cannot_hold_are_refused(copy_of):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(copy_of / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.scales"
    tensors[key] = tensors[key].float() * (1 + 2**-20)
    save_file(tensors, str(copy_of / "model.safetensors"), metadata={"format": "pt"})
    assert "float32 scales are not all exact in float16" in str(_refusal(copy_of))


# ------------------------------------------------------------------------------ command line


def test_pocketlm_export_writes_an_awq_checkpoint_as_gptq(checkpoint, tmp_path, monkeypatch):
    gptq_import = pytest.importorskip("pocketlm_gptq.import_gptq")
    from click.testing import CliRunner

    from pocketlm.cli import main

    shutil.copytree(checkpoint, tmp_path / "awq-model")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["export", "awq-model", "--format", "gptq", "-o", "out/gptq"])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"exported awq-model as gptq to {tmp_path / 'out' / 'gptq'}\n"
    quant = json.loads((tmp_path / "out" / "gptq" / "config.json").read_text())["quantization_config"]
    assert (quant["quant_method"], quant["bits"], quant["group_size"], quant["sym"]) == ("gptq", 4, 32, False)
    expected = _grids(load_awq(str(tmp_path / "awq-model"), _Options()).model)
    _assert_same_grids(expected, gptq_import.load_gptq(str(tmp_path / "out" / "gptq"), _Options()).model)


def test_pocketlm_export_to_gguf_says_where_q4_1_rounds_the_offset(checkpoint, tmp_path, monkeypatch):
    pytest.importorskip("pocketlm_gguf")
    from click.testing import CliRunner

    from pocketlm.cli import main

    shutil.copytree(checkpoint, tmp_path / "awq-model")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["export", "awq-model", "--format", "gguf", "-o", "out/gguf"])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"exported awq-model as gguf to {tmp_path / 'out' / 'gguf'}\n"
    assert "asymmetric grids as Q4_1 keep q and d = scale" in result.stderr


def test_pocketlm_export_refuses_a_gemv_checkpoint_with_the_reason(checkpoint, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from pocketlm.cli import main

    shutil.copytree(checkpoint, tmp_path / "awq-model")
    _edit_config(tmp_path / "awq-model", version="gemv")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["export", "awq-model", "--format", "gptq", "-o", "out/gptq"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "awq-model: AWQ version 'gemv' packs its grids differently; pocketlm reads the GEMM layout" in result.output
    assert "model.source" in result.output and "fix: load a GEMM checkpoint of the model" in result.output
    assert not (tmp_path / "out" / "gptq").exists()
