"""backend = "llmcompressor": option validation and the clear refusals always; the real run
(llm-compressor's AWQModifier in its own venv, on a tiny llama) only where that venv exists."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from pocketlm import PocketError
from pocketlm import weights as W
from pocketlm.modules import get_module
from pocketlm.testing import make_context
from pocketlm.testing.models import tiny_model, tiny_windows
from pocketlm_awq import awq, backend_llmcompressor
from pocketlm_awq.awq import AWQOptions, compress

torch.set_num_threads(1)

PEER = AWQOptions(bits=4, group_size=32, clip=False, backend="llmcompressor")


def _context(n: int = 8):
    return make_context(tiny_windows(n, 32))


def test_backend_is_a_validated_literal():
    assert AWQOptions().backend == "pocketlm"
    assert AWQOptions(backend="llmcompressor").backend == "llmcompressor"
    with pytest.raises(ValidationError):
        AWQOptions(backend="autoawq")


def test_options_llmcompressor_cannot_honour_are_refused_before_running_it(monkeypatch):
    monkeypatch.setattr(backend_llmcompressor, "run_worker", lambda *a, **k: pytest.fail("the peer must not run"))
    context = _context()  # 8 x 32 = 256 calibration tokens
    cases = [(AWQOptions(group_size=32, backend="llmcompressor"), "clip"),  # clip defaults to true
             (PEER.model_copy(update={"search_tokens": 64}), "search_tokens"),
             (PEER.model_copy(update={"n_grid": 2}), "n_grid")]
    for options, field in cases:
        with pytest.raises(PocketError) as error:
            compress(tiny_model("llama"), options, context)
        assert error.value.field == field and "backend" in error.value.fix
    # search_tokens covering every calibration token is what llm-compressor does: accepted
    backend_llmcompressor.check_options(PEER.model_copy(update={"search_tokens": 256}), 256)


def test_masks_and_conv1d_are_refused(monkeypatch):
    monkeypatch.setattr(backend_llmcompressor, "run_worker", lambda *a, **k: pytest.fail("the peer must not run"))
    model = tiny_model("llama")
    layer = model.model.layers[0].mlp.up_proj
    W.set_mask(layer, torch.rand(W.linear_weight(layer).shape, generator=torch.Generator().manual_seed(0)) > 0.5)
    with pytest.raises(PocketError, match="masks") as error:
        compress(model, PEER, _context())
    assert error.value.field == "backend" and "pocketlm" in error.value.fix
    with pytest.raises(PocketError, match="Conv1D"):
        compress(tiny_model("gpt2"), PEER, _context())


def test_missing_peer_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("POCKETLM_LLMCOMPRESSOR_PYTHON", raising=False)
    with pytest.raises(PocketError) as error:
        compress(tiny_model("llama"), PEER, _context())
    assert error.value.field == "backend"
    assert error.value.message == ('awq backend = "llmcompressor" runs in a separate Python environment with '
                                   "llmcompressor, named by $POCKETLM_LLMCOMPRESSOR_PYTHON, which is not set")
    assert error.value.fix == ("make its own environment (`python -m venv VENV && VENV/bin/pip install "
                               "llmcompressor==0.14.*`) and set POCKETLM_LLMCOMPRESSOR_PYTHON=VENV/bin/python")


def test_the_worker_is_started_through_the_bridge_with_a_json_request(monkeypatch, tmp_path):
    sent = {}

    def fake_run_worker(python, script, request, **kwargs):
        sent.update(python=python, script=script, request=request)
        raise PocketError("stop here")

    monkeypatch.setattr(backend_llmcompressor, "find_peer_python", lambda: "peer-venv/bin/python")
    monkeypatch.setattr(backend_llmcompressor.external, "run_worker", fake_run_worker)
    with pytest.raises(PocketError, match="stop here"):
        backend_llmcompressor.run_worker(tiny_model("llama"), PEER, _context(), ["model.layers.0.mlp.up_proj"], tmp_path)
    assert sent["python"] == "peer-venv/bin/python" and sent["script"].name == "llmc_awq_worker.py"
    request = sent["request"]
    assert request["targets"] == [r"re:^model\.layers\.0\.mlp\.up_proj$"]
    assert (request["bits"], request["group_size"], request["symmetric"], request["n_grid"]) == (4, 32, False, 20)
    assert (tmp_path / "model" / "config.json").is_file() and (tmp_path / "windows.safetensors").is_file()


def test_compress_dispatches_to_the_backend_with_awq_targets(monkeypatch):
    calls = []
    monkeypatch.setattr(backend_llmcompressor, "compress_with_llmcompressor",
                        lambda model, options, context, targets: calls.append(sorted(targets)) or model)
    compress(tiny_model("llama"), PEER.model_copy(update={"ignore": ["lm_head", "*.down_proj"]}), _context())
    assert len(calls) == 1 and len(calls[0]) == 12 and not any(n.endswith("down_proj") for n in calls[0])


# ---------------------------------------------------------------- the real run (peer venv)


@pytest.fixture(scope="module")
def peer_run(tmp_path_factory):
    try:
        backend_llmcompressor.find_peer_python()
    except PocketError:
        pytest.skip("llm-compressor's environment is absent (set POCKETLM_LLMCOMPRESSOR_PYTHON to its Python)")
    original = tiny_model("llama", outliers=True)
    model = copy.deepcopy(original)
    context, logs = _context(), []
    context.logger = logs.append
    targets = awq.check_model(model, context.architecture(model), PEER)
    work = tmp_path_factory.mktemp("llmc-awq")
    backend_llmcompressor.compress_with_llmcompressor(model, PEER, context, targets, work_dir=work)
    tensors = {}
    for file in sorted((work / "out").glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return original, model, tensors, work, logs


def test_grids_are_what_llmcompressor_wrote(peer_run):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    original, model, tensors, _, _ = peer_run
    names = [n for n, m in original.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert len(names) == 14
    for name in names:
        module = get_module(model, name)
        assert isinstance(module, W.QuantizedLinear) and (module.bits, module.group_size) == (4, 32)
        shape = torch.Size(tensors[name + ".weight_shape"].tolist())
        scale = tensors[name + ".weight_scale"].float()
        q = unpack_from_int32(tensors[name + ".weight_packed"], 4, shape).float()  # signed, offset 8
        zp = unpack_from_int32(tensors[name + ".weight_zero_point"], 4, torch.Size((shape[0], scale.shape[1])),
                               packed_dim=0).float()
        assert torch.equal(module.storage.grid().float(), q + 8)
        assert torch.equal(module.storage.zeros.float(), zp + 8)
        assert len(torch.unique(zp)) > 1  # asymmetric: fitted zero points, not a constant
        expected = (q - zp.repeat_interleave(32, dim=1)) * scale.repeat_interleave(32, dim=1)
        error = (module.dequantize() - expected).abs().max() / expected.abs().max()
        assert error < 1e-3  # float16 scales only


def test_changed_norms_were_taken_over(peer_run):
    original, model, tensors, _, logs = peer_run
    norms = [n for n, _ in original.named_parameters() if "layernorm" in n]
    changed = [n for n in norms if not torch.equal(tensors[n], original.state_dict()[n])]
    assert changed  # AWQ folded scales into at least one norm
    for name in norms:
        assert torch.equal(model.state_dict()[name], tensors[name])
    assert any("took over" in line and changed[0] in line for line in logs)


def _load_compressed(folder):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    return AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, quantization_config=CompressedTensorsConfig(run_compressed=False)).eval()


def test_logits_match_transformers_loading_the_compressed_folder(peer_run, tmp_path):
    original, model, _, work, _ = peer_run
    # The same folder with its float32 scales rounded to float16 (pocketlm's stored scale dtype):
    # everything else (grids, zero points, folded norms) must then agree to float rounding.
    rounded = tmp_path / "rounded"
    shutil.copytree(work / "out", rounded)
    for file in rounded.glob("*.safetensors"):
        tensors = load_file(str(file))
        save_file({k: W.to_scale_dtype(v) if k.endswith(".weight_scale") else v for k, v in tensors.items()},
                  str(file), metadata={"format": "pt"})
    ids = tiny_windows(2, 32, seed=1)
    with torch.no_grad():
        got = model(ids).logits
        exact = _load_compressed(rounded)(ids).logits
        expected = _load_compressed(work / "out")(ids).logits
        before = original(ids).logits
    assert ((got - exact).norm() / exact.norm()).item() < 1e-4
    relative = ((got - expected).norm() / expected.norm()).item()
    assert relative < 5e-3  # float16 instead of float32 scales (measured 2.2e-3 on this model)
    assert ((before - expected).norm() / expected.norm()).item() > 10 * relative  # the comparison can fail
