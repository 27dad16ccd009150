"""Plugin authoring: the scaffold, the conformance kit, the example plugin, and the first-party
methods against the kit.

(a) ``pocketlm new-plugin`` → pip install → the generated tests (conformance kit) pass →
    the method runs in a recipe → pip uninstall, in one test;
(b) the example plugin in docs/examples is pip-installed, its own tests (the kit) pass and it runs
    in a recipe;
(c) the core's built-in exporter, evaluators and loader pass the kit (each first-party plugin
    runs the kit on its own components in its own tests).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pocketlm.cli import main
from pocketlm.plugins import get_plugins
from pocketlm.testing import conformance as kit

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "pocketlm-example-mseround"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONDONTWRITEBYTECODE": "1"}


def _pip(*args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"pip {' '.join(args)} failed:\n{result.stdout[-1500:]}\n{result.stderr[-3000:]}"


def _installed(distribution: str):
    importlib.invalidate_caches()
    return get_plugins(refresh=True)


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".pytest_cache"))
    return target


def _run_recipe(tmp_path: Path, model_folder: Path, stages: str, *, per_stage='["size", "sparsity"]') -> dict:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        f'[model]\nsource = {json.dumps(str(model_folder))}\n'
        '[calibration]\nsamples = 4\nseq_len = 16\n'
        f'{stages}\n'
        f'[evaluate]\nmetrics = ["sparsity", "parameters"]\nper_stage = {per_stage}\n'
        '[export]\nformat = "hf"\npath = "export"\n')
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "pocketlm.cli", "run", str(recipe), "--run-dir", str(run_dir)],
                            capture_output=True, text=True, timeout=600, env=ENV, cwd=tmp_path)
    assert result.returncode == 0, f"pocketlm run failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    report = json.loads((run_dir / "report.json").read_text())
    assert (run_dir / "export" / "config.json").is_file()
    return report


# ----------------------------------------------------------------- (a) the scaffold cycle


def test_new_plugin_refuses_bad_names_and_existing_folders(tmp_path):
    runner = CliRunner()
    for bad in ("Bad_Name", "pocketlm-", "9lives", "class", "two--hyphens"):
        result = runner.invoke(main, ["new-plugin", bad, "-d", str(tmp_path)])
        assert result.exit_code == 2, (bad, result.output)
        assert "fix:" in result.output
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "pocketlm-taken").mkdir()
    (tmp_path / "pocketlm-taken" / "mine.txt").write_text("keep me")
    result = runner.invoke(main, ["new-plugin", "taken", "-d", str(tmp_path)])
    assert result.exit_code == 2 and "already exists" in result.output and "fix:" in result.output
    assert [p.name for p in (tmp_path / "pocketlm-taken").iterdir()] == ["mine.txt"]


def test_scaffold_names_and_templates_are_complete(tmp_path):
    from pocketlm.scaffold import create_plugin, plugin_names

    names = plugin_names("pocketlm-my-quant")
    assert (names.distribution, names.package, names.method, names.module, names.options_class) == (
        "pocketlm-my-quant", "pocketlm_my_quant", "my-quant", "my_quant", "MyQuantOptions")
    assert plugin_names("my-quant") == names
    folder = create_plugin("my-quant", tmp_path)
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == ["CHANGELOG.md", "README.md", "pyproject.toml", "src/pocketlm_my_quant/__init__.py",
                     "src/pocketlm_my_quant/my_quant.py", "src/pocketlm_my_quant/options.py", "tests/test_conformance.py", "tests/test_my_quant.py"]
    for path in folder.rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert "{{" not in text, path
            if path.suffix == ".py":
                compile(text, str(path), "exec")
    pyproject = (folder / "pyproject.toml").read_text()
    assert '[project.entry-points.pocketlm]\nmy-quant = "pocketlm_my_quant"' in pyproject
    assert '"pocketlm>=0.2.6,<0.3"' in pyproject
    assert 'POCKETLM_API = ">=1.8,<2"' in (folder / "src/pocketlm_my_quant/__init__.py").read_text()


def test_scaffold_install_conformance_and_recipe_cycle(tmp_path, tiny_folder):
    result = CliRunner().invoke(main, ["new-plugin", "pocketlm-authoring-probe", "-d", str(tmp_path)])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "pocketlm-authoring-probe"
    assert (folder / "tests" / "test_conformance.py").is_file()
    _pip("install", "-q", "--no-deps", "--no-build-isolation", str(folder))
    try:
        plugins = _installed("pocketlm-authoring-probe")
        assert "authoring-probe" in plugins.methods, [p.reason for p in plugins.problems]
        assert plugins.owner[("methods", "authoring-probe")] == "authoring-probe"
        # The generated tests, run the way the author runs them (the kit passes out of the box),
        # and, at the same time, a recipe that uses the new method.
        tests = subprocess.Popen([sys.executable, "-m", "pytest", "-v", "-x", "-p", "no:randomly"], cwd=folder,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
        try:
            report = _run_recipe(tmp_path, tiny_folder,
                                 '[[stages]]\nmethod = "authoring-probe"\nbits = 4\ngroup_size = 32\n')
            output, _ = tests.communicate(timeout=600)
        finally:
            if tests.poll() is None:
                tests.kill()
                tests.wait()
        assert tests.returncode == 0, output[-4000:]
        assert "test_conformance.py::TestConformance::test_respects_masks[gpt2] PASSED" in output, output[-4000:]
        assert "test_conformance.py::TestConformance::test_runs_and_exports[opt] PASSED" in output
        assert "test_conformance.py::test_registration_is_light PASSED" in output
        summary = output.strip().splitlines()[-1]
        assert re.search(r"\b(1[5-9]|[2-9]\d) passed\b", summary) and "failed" not in summary, summary
        assert report["stages"][0]["method"] == "authoring-probe"
        assert report["stages"][0]["metrics"]["bits_per_weight"] < 10   # 4-bit linears, float16 rest
        from transformers import AutoModelForCausalLM

        exported = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "export")
        down = exported.model.layers[0].mlp.down_proj.weight
        for start in range(0, down.shape[1], 32):   # a 4-bit grid: at most 16 values per group of a row
            assert max(len(torch.unique(row)) for row in down[:, start:start + 32]) <= 16
    finally:
        _pip("uninstall", "-q", "-y", "pocketlm-authoring-probe")
        _installed("pocketlm-authoring-probe")
    assert "authoring-probe" not in get_plugins().methods


# ------------------------------------------------------------------- (b) the example plugin


@pytest.fixture(scope="module")
def example_installed(tmp_path_factory):
    folder = _copy(EXAMPLE, tmp_path_factory.mktemp("example") / EXAMPLE.name)
    _pip("install", "-q", "--no-deps", "--no-build-isolation", str(folder))
    try:
        yield folder, _installed("pocketlm-example-mseround")
    finally:
        _pip("uninstall", "-q", "-y", "pocketlm-example-mseround")
        _installed("pocketlm-example-mseround")


def test_example_plugin_own_tests_pass_with_the_kit(example_installed):
    """The example's own tests, run the way its author runs them: the grid-rule kit on ``mse`` at
    every setting it supports, the method kit on rtn and gptq with it, and its error below
    min-max's on heavy-tailed weights."""
    folder, plugins = example_installed
    assert "mse" in plugins.grid_rules, [p.reason for p in plugins.problems]
    run = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:randomly", "-p", "no:cacheprovider"],
                         cwd=folder, capture_output=True, text=True, timeout=900, env=ENV)
    output = run.stdout
    assert run.returncode == 0, output[-4000:]
    assert "test_conformance.py::TestMSEGridRule::test_fit_contract[2bit-g16-sym] PASSED" in output, output[-4000:]
    assert "test_conformance.py::TestMSEGridRule::test_allocates_on_the_weight_device[8bit-g-1-sym] PASSED" in output
    assert "asym" not in output                      # a symmetric-only rule is checked where it applies
    assert "test_mseround.py::test_error_is_clearly_below_min_max_on_heavy_tailed_weights[3-0.85] PASSED" in output
    if "rtn" in plugins.methods:
        assert "TestGPTQWithMSEGrid::test_runs_and_exports[opt] PASSED" in output
        assert "TestRTNWithMSEGrid::test_respects_masks[gpt2] PASSED" in output


def test_example_plugin_is_used_in_a_recipe(example_installed, tiny_folder, tmp_path):
    _, plugins = example_installed
    if "rtn" not in plugins.methods:
        pytest.skip("pocketlm-gptq is not installed")
    prune = "magnitude" in plugins.methods
    stages = ('[[stages]]\nmethod = "magnitude"\nsparsity = 0.5\n' if prune else "") + \
        '[[stages]]\nmethod = "rtn"\nbits = 4\ngroup_size = 32\ngrid = "mse"\n'
    report = _run_recipe(tmp_path, tiny_folder, stages)
    quantized = report["stages"][-1]["metrics"]
    assert report["stages"][-1]["method"] == "rtn"
    assert quantized["bits_per_weight"] < 10  # 4-bit decoder linears, float16 embedding and head
    if prune:  # rtn kept the masks of the pruning stage
        assert report["stages"][0]["metrics"]["sparsity"] == pytest.approx(0.5, abs=0.01)
        assert report["after"]["sparsity"] >= report["stages"][0]["metrics"]["sparsity"]


# ------------------------------------------------------------- (c) the core's own components
# Each first-party plugin runs the kit on its own components in its tests/test_conformance.py;
# here the core's built-ins: the hf exporter, evaluators and loader (classes at the end), the
# grid rules (tests/test_grids.py).


@pytest.mark.parametrize("evaluator,options", [("size", {}), ("parameters", {}),
                                               ("perplexity", {"windows": 2, "seq_len": 16})])
def test_builtin_evaluators(evaluator, options):
    result = kit.check_evaluator(evaluator, options)
    assert result and all(isinstance(v, (int, float)) for v in result.values())


def test_builtin_folder_loader(tiny_folder):
    loaded = kit.check_loader("hf", str(tiny_folder))
    assert loaded.tokenizer is not None


# ------------------------------------------------------------ the kit catches broken plugins


def test_pytest_plugin_fixtures(tiny_model_factory, calibration_windows, pocketlm_context):
    import pickle

    model = tiny_model_factory("gpt2")
    assert model.config.model_type == "gpt2" and not model.training
    assert tuple(calibration_windows.shape) == (kit.WINDOWS, kit.SEQ_LEN)
    assert pocketlm_context.calibration_windows() is calibration_windows
    assert pocketlm_context.architecture(model).name
    error = pickle.loads(pickle.dumps(kit.ConformanceError("method 'x'", ["one", "two"])))
    assert error.problems == ["one", "two"] and "  - two" in str(error)


def _broken_plugins(compress, options_cls=None):
    import types

    from pocketlm import Method, Options, hookimpl
    from pocketlm.plugins import Plugins

    class BrokenOptions(Options):
        factor: float = 0.5
        ignore: list[str] = ["lm_head"]

    module = types.ModuleType("broken_for_kit")
    module.POCKETLM_API = ">=1.0,<2"

    @hookimpl
    def register_methods(register):
        register(Method("broken", "transform", options_cls or BrokenOptions, compress))

    module.register_methods = register_methods
    return Plugins(entry_points=False, extra=[("broken_for_kit", module)])


def test_the_kit_catches_a_method_that_touches_the_teacher_windows_masks_and_ignore():
    from pocketlm.modules import select_linears
    from pocketlm.weights import linear_weight, set_linear_weight

    def careless(model, options, context):
        context.calibration_windows()[0, 0] = 7             # writes into the calibration tensor
        with torch.no_grad():
            next(context.teacher().parameters()).add_(1.0)  # trains the teacher by accident
        for module in select_linears(model, ["*"], []).values():  # ignores `ignore` and masks
            set_linear_weight(module, linear_weight(module) + 0.01)
        return model

    plugins = _broken_plugins(careless)
    with pytest.raises(kit.ConformanceError) as caught:
        kit.check_runs("broken", {}, "llama", plugins=plugins)
    assert "calibration windows" in str(caught.value) and "teacher" in str(caught.value)
    with pytest.raises(kit.ConformanceError, match="masked weights are no longer zero"):
        kit.check_masks("broken", {}, "llama", plugins=plugins)
    with pytest.raises(kit.ConformanceError, match="ignored"):
        kit.check_ignore("broken", {}, "llama", plugins=plugins)


def test_the_kit_catches_nondeterminism_nan_and_open_options():
    from pocketlm import Options
    from pocketlm.modules import select_linears
    from pocketlm.weights import linear_weight, set_linear_weight

    def noisy(model, options, context):
        generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
        for module in select_linears(model, ["*"], options.ignore).values():
            weight = linear_weight(module)
            set_linear_weight(module, weight + 0.01 * torch.randn(weight.shape, generator=generator))
        return model

    with pytest.raises(kit.ConformanceError, match="not deterministic"):
        kit.check_deterministic("broken", {}, "llama", plugins=_broken_plugins(noisy))

    def poison(model, options, context):
        module = next(iter(select_linears(model, ["*"], options.ignore).values()))
        weight = linear_weight(module).clone()
        weight[0, 0] = float("nan")
        set_linear_weight(module, weight)
        return model

    with pytest.raises(kit.ConformanceError, match="NaN or inf"):
        kit.check_runs("broken", {}, "llama", plugins=_broken_plugins(poison))

    class OpenOptions(Options):
        model_config = {"extra": "allow", "frozen": False}
        factor: float = 0.5

    with pytest.raises(kit.ConformanceError, match="accepts unknown keys"):
        kit.check_options("broken", {}, plugins=_broken_plugins(noisy, OpenOptions))


def test_the_kit_catches_an_exporter_that_writes_outside_its_folder(tmp_path):
    import types

    from pocketlm import Exporter, NoOptions, hookimpl
    from pocketlm.plugins import Plugins

    def sloppy(model, path, options, context):
        (Path(path) / "weights.bin").write_bytes(b"\x00" * 8)
        Path(context.export_path).mkdir(parents=True, exist_ok=True)   # writes the final path directly
        (Path(context.export_path) / "partial").write_text("half")

    module = types.ModuleType("sloppy_exporter")
    module.POCKETLM_API = ">=1.0,<2"
    module.register_exporters = hookimpl(lambda register: register(Exporter("sloppy", NoOptions, sloppy)))
    plugins = Plugins(entry_points=False, extra=[("sloppy_exporter", module)])
    with pytest.raises(kit.ConformanceError, match="after a failed export these are visible"):
        kit.check_exporter("sloppy", plugins=plugins, folder=tmp_path)


# ------------------------------------------------- the pytest classes, as a plugin uses them


class TestHfExporterConformance(kit.ExporterConformance):
    exporter = "hf"
    options = {"dtype": "float32"}


class TestSparsityEvaluatorConformance(kit.EvaluatorConformance):
    evaluator = "sparsity"


class TestFolderLoaderConformance(kit.LoaderConformance):
    loader = "hf"

    def source(self, tmp_path):
        from pocketlm.testing.models import save_tiny_model

        return str(save_tiny_model(tmp_path / "tiny-qwen2", "qwen2"))
