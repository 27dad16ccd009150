"""Discovery, API checks, isolation of broken plugins, the clash rule and the allowlist."""

import json
import subprocess
import sys
import textwrap
import types

import pytest
from click.testing import CliRunner

from pocketlm import hookimpl
from pocketlm.plugins import Plugins

from .conftest import make_toy_plugin


def _module(name, api=">=1.0,<2", **hooks):
    module = types.ModuleType(name)
    if api is not None:
        module.POCKETLM_API = api
    for key, value in hooks.items():
        setattr(module, key, value)
    return module


class _Broken:
    """An entry point whose import fails."""

    def load(self):
        raise ImportError("No module named 'missing_dependency'")


def test_a_plugin_that_fails_to_import_is_reported_and_skipped(monkeypatch):
    from importlib import metadata

    from pocketlm import plugins as plugins_module

    broken = metadata.EntryPoint("broken", "broken_plugin", "pocketlm")
    monkeypatch.setattr(plugins_module, "_entry_points", lambda: [("broken-dist", "broken", broken)])
    loaded = Plugins()
    [problem] = loaded.problems
    assert problem.name == "broken" and "failed to import" in problem.reason
    assert "hf" in loaded.exporters  # the core carries on


def test_incompatible_api_and_missing_api_are_skipped():
    loaded = Plugins(entry_points=False, extra=[("old", _module("old", api=">=0.1,<1")),
                                                 ("none", _module("none", api=None))])
    reasons = {p.name: p.reason for p in loaded.problems}
    assert "supports pocketlm API >=0.1,<1" in reasons["old"]
    assert "declares no POCKETLM_API" in reasons["none"]


def test_a_registration_hook_that_raises_is_skipped_whole():
    def register_methods(register):
        raise RuntimeError("boom")

    loaded = Plugins(entry_points=False, extra=[("raiser", _module("raiser", register_methods=hookimpl(register_methods)))])
    assert "RuntimeError: boom" in loaded.problems[0].reason
    assert not loaded.pm.is_registered(loaded.problems[0])


def test_a_misspelt_hook_is_reported():
    loaded = Plugins(entry_points=False, extra=[("typo", _module("typo", register_method=hookimpl(lambda register: None)))])
    assert "unknown hook" in loaded.problems[0].reason


def test_name_clash_first_in_load_order_wins_and_the_later_is_skipped_whole():
    first, second = make_toy_plugin("aaa-toy"), make_toy_plugin("zzz-toy")
    loaded = Plugins(entry_points=False, extra=[("zzz-toy", second), ("aaa-toy", first)])
    assert loaded.owner[("methods", "toy-round")] == "aaa-toy"
    [problem] = loaded.problems
    assert problem.name == "zzz-toy" and "already provided by plugin 'aaa-toy'" in problem.reason
    # the same outcome whatever order the plugins are handed in
    again = Plugins(entry_points=False, extra=[("aaa-toy", make_toy_plugin("aaa-toy")), ("zzz-toy", make_toy_plugin("zzz-toy"))])
    assert again.owner[("methods", "toy-round")] == "aaa-toy"


def test_allowlist_limits_external_plugins(monkeypatch):
    loaded = Plugins(entry_points=False, extra=[("toy", make_toy_plugin())], allowlist="something-else")
    assert "toy-round" not in loaded.methods and "hf" in loaded.exporters
    loaded = Plugins(entry_points=False, extra=[("toy", make_toy_plugin())], allowlist="toy")
    assert "toy-round" in loaded.methods


THROWAWAY = {
    "pyproject.toml": """
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "pocketlm-throwaway"
        version = "0.0.1"
        [project.entry-points.pocketlm]
        throwaway = "pocketlm_throwaway"
        [tool.setuptools]
        py-modules = ["pocketlm_throwaway"]
    """,
    "pocketlm_throwaway.py": """
        import torch
        from pocketlm import Method, Options, SizeEffect, hookimpl, PHASE_TRANSFORM
        from pocketlm.modules import select_linears
        from pocketlm.weights import linear_weight, set_linear_weight
        POCKETLM_API = ">=1.0,<2"

        class ShrinkOptions(Options):
            factor: float = 0.5

        def shrink(model, options, context):
            for module in select_linears(model, ["*"], ["lm_head"]).values():
                set_linear_weight(module, linear_weight(module) * options.factor)
            return model

        @hookimpl
        def register_methods(register):
            register(Method("throwaway-shrink", "transform", ShrinkOptions, shrink, "scale every linear",
                            phase=PHASE_TRANSFORM))
    """,
}


@pytest.fixture(scope="module")
def throwaway_installed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("throwaway")
    for name, text in THROWAWAY.items():
        (folder / name).write_text(textwrap.dedent(text))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(folder)],
                   check=True, capture_output=True)
    yield folder
    subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", "pocketlm-throwaway"], capture_output=True)


def test_a_pip_installed_plugin_is_discovered_listed_and_used(throwaway_installed, tiny_folder, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[model]\nsource = "{tiny_folder}"\n[[stages]]\nmethod = "throwaway-shrink"\nfactor = 0.25\n'
                      '[evaluate]\nmetrics = ["parameters"]\nper_stage = []\n')
    code = textwrap.dedent(f"""
        import json
        from click.testing import CliRunner
        from pocketlm.cli import main
        listed = CliRunner().invoke(main, ["plugins", "--json"])
        print(json.dumps([p["distribution"] for p in json.loads(listed.output)["plugins"]]))
        result = CliRunner().invoke(main, ["run", {str(recipe)!r}, "--run-dir", {str(tmp_path / "run")!r}])
        print(result.output[-500:].replace(chr(10), " "))
        print(result.exit_code)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    lines = result.stdout.strip().splitlines()
    assert lines, result.stderr[-2000:]
    assert "pocketlm-throwaway" in json.loads(lines[0]), result.stderr
    assert lines[-1] == "0", result.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["stages"][0]["method"] == "throwaway-shrink"
