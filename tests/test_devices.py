"""[model] device and offload: validation, a CUDA device that is not there, the memory check
before work, the walker with offload = "cpu", and the single-process data-parallel service."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pocketlm import PocketError, devices, distributed
from pocketlm.calibration import walk_layers
from pocketlm.modules import find_architecture
from pocketlm.pipeline import Run
from pocketlm.recipe import parse_recipe
from pocketlm.testing import free_port, make_context
from pocketlm.testing.models import tiny_model, tiny_windows

RECIPE = """[model]
source = "{model}"
{model_extra}
[calibration]
samples = 4
seq_len = 32
[[stages]]
method = "toy-round"
bits = 4
[evaluate]
metrics = ["perplexity"]
[evaluate.perplexity]
windows = 2
seq_len = 32
[export]
format = "hf"
"""

NO_CUDA_7 = pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() > 7,
                               reason="this machine has a cuda:7")


def _recipe(plugins, model, extra=""):
    return parse_recipe(RECIPE.format(model=model, model_extra=extra), plugins, file="recipe.toml")


def test_device_and_offload_default_to_auto_and_none(toy_plugins, tiny_folder):
    model = _recipe(toy_plugins, tiny_folder).file.model
    assert (model.device, model.offload) == ("auto", "none")
    model = _recipe(toy_plugins, tiny_folder, 'device = "cuda:3"\noffload = "cpu"').file.model
    assert (model.device, model.offload) == ("cuda:3", "cpu")


@pytest.mark.parametrize("line, field", [('device = "gpu"', "model.device"), ('device = "cuda:x"', "model.device"),
                                         ('offload = "tape"', "model.offload")])
def test_bad_device_or_offload_names_the_field(toy_plugins, tiny_folder, line, field):
    with pytest.raises(PocketError) as error:
        _recipe(toy_plugins, tiny_folder, line)
    assert error.value.field == field
    assert "recipe.toml:3" in str(error.value)


@NO_CUDA_7
def test_a_cuda_device_that_is_not_there_lists_the_devices_found():
    with pytest.raises(PocketError) as error:
        devices.resolve_device("cuda:7")
    message = str(error.value)
    assert "'cuda:7'" in message and "devices found: cpu" in message
    assert error.value.field == "model.device"


def test_auto_is_the_first_gpu_or_the_cpu():
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert devices.resolve_device("auto") == expected
    assert devices.resolve_device("cpu") == torch.device("cpu")


@NO_CUDA_7
def test_the_cli_refuses_a_missing_device_before_any_work(tiny_folder, tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE.format(model=tiny_folder, model_extra='device = "cuda:7"')
                      .replace('method = "toy-round"\nbits = 4', 'method = "rtn"'))
    result = subprocess.run([sys.executable, "-m", "pocketlm.cli", "run", str(recipe), "--run-dir",
                             str(tmp_path / "run")], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "model.device" in result.stderr and "devices found: cpu" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "eval-before.json").exists()


def test_not_enough_memory_for_one_layer_is_refused_with_its_size():
    model = tiny_model("llama")
    layers = model.model.layers
    need = 2 * devices.module_bytes(layers[0])
    devices.check_fits(model, layers, torch.device("cpu"), "cpu", free=need)    # just enough
    with pytest.raises(PocketError) as error:
        devices.check_fits(model, layers, torch.device("cpu"), "cpu", free=need - 1)
    message = str(error.value)
    assert f"decoder layer 0 needs {need / 1e9:.2f} GB" in message
    assert 'dtype = "bfloat16"' in error.value.fix


def test_offload_cpu_walks_the_same_as_none(toy_plugins):
    """The walker given a device (here the CPU: the only one a CPU machine has) moves each layer
    there and back and keeps activations on the CPU; the result is the walk without a device."""
    from tests.conftest import _ToyRoundHandler, ToyRoundOptions

    windows = tiny_windows(4, 16)
    plain, placed = tiny_model("llama"), tiny_model("llama")
    architecture = find_architecture(plain, toy_plugins.architectures)
    walk_layers(plain, architecture, windows, _ToyRoundHandler(ToyRoundOptions(bits=4)))
    seen = []

    class Recording(_ToyRoundHandler):
        def observe(self, name, module, args, kwargs, output):
            seen.append(args[0].device)
            super().observe(name, module, args, kwargs, output)

    walk_layers(placed, architecture, windows, Recording(ToyRoundOptions(bits=4)), device=torch.device("cpu"))
    assert seen and all(d.type == "cpu" for d in seen)
    for (name, a), (_, b) in zip(plain.state_dict().items(), placed.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_run_with_offload_cpu_exports_the_same_bytes(toy_plugins, tiny_folder, tmp_path):
    exports = []
    for offload in ("none", "cpu"):
        recipe = _recipe(toy_plugins, tiny_folder, f'device = "cpu"\noffload = "{offload}"')
        Run(recipe, tmp_path / offload, toy_plugins, echo=lambda m: None).execute()
        exports.append({p.name: p.read_bytes() for p in (tmp_path / offload / "export").iterdir()
                        if p.suffix == ".safetensors"})
    assert exports[0] and exports[0] == exports[1]


def test_one_process_data_parallel_service_is_the_identity():
    context = make_context(tiny_windows(4, 16))
    tensor = torch.arange(6.0)
    assert context.processes == 1
    assert context.all_reduce(tensor) is tensor and torch.equal(tensor, torch.arange(6.0))
    assert context.all_reduce_count(7) == 7
    windows = tiny_windows(4, 16)
    assert distributed.shard(windows) is windows
    assert distributed.is_writer()


def test_torchrun_gives_each_process_a_shard_and_one_writer(tmp_path):
    """2 gloo processes: the walker's windows are split between them, statistics summed."""
    script = Path(__file__).with_name("data_parallel_worker.py")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(free_port()), str(script), str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = sorted((tmp_path / f"rank{r}.txt").read_text() for r in (0, 1))
    assert lines == ["rank 0 of 2: windows [0, 2, 4], summed 6.0, writer True\n",
                     "rank 1 of 2: windows [1, 3, 5], summed 6.0, writer False\n"]
