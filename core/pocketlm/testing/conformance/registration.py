"""Registration stays light: importing a plugin and running its registration hooks imports no
tensor library.

Every command that reads recipes (``validate``, ``methods``, ``plugins``, ``schema``,
``import-recipe``) loads every installed plugin, so a plugin whose registration imports torch
makes each of them pay torch's start-up (about two seconds). What registration and validation
read must be light: the options models, ``effect`` and translators' inputs; the callables that
do the work are given as ``pocketlm.lazy("package.module:function")`` (see
:mod:`pocketlm.lazy`). The check runs in a fresh interpreter, since the test process has
imported torch long before.
"""

from __future__ import annotations

import json
import subprocess
import sys

from ._shared import _raise

#: Libraries that registration must not import (each costs from a tenth of a second to seconds).
HEAVY_MODULES = ("torch", "transformers", "safetensors", "numpy", "accelerate", "onnx", "onnxruntime", "gguf",
                 "lm_eval", "datasets", "scipy", "huggingface_hub")

# Run in a fresh interpreter: import the plugin module, call each of its registration hooks with
# a collecting callback, validate each option model's defaults and read each method's size
# effect (what `pocketlm validate` does with them), then report what got imported.
_PROBE = r"""
import json, sys, importlib
plugin = importlib.import_module(sys.argv[1])
registered = []
for name in sorted(dir(plugin)):
    hook = getattr(plugin, name)
    if name.startswith("register_") and hasattr(hook, "pocketlm_impl"):
        hook(registered.append)
for item in registered:
    options = getattr(item, "options", None)
    if options is None:
        continue
    options.model_json_schema()
    try:
        defaults = options()
    except Exception:
        continue
    effect = getattr(item, "effect", None)
    if effect is not None:
        effect(defaults)
print(json.dumps({"registered": len(registered), "modules": sorted({m.split(".")[0] for m in sys.modules})}))
"""


def heavy_imports(plugin_module: str) -> list[str]:
    """The :data:`HEAVY_MODULES` that importing ``plugin_module`` and running its registration
    hooks imports, in a fresh interpreter."""
    done = subprocess.run([sys.executable, "-c", _PROBE, plugin_module], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise AssertionError(f"registering {plugin_module} failed:\n{done.stderr[-2000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return sorted(set(report["modules"]) & set(HEAVY_MODULES))


def check_light_registration(plugin_module: str) -> None:
    """Raise :class:`ConformanceError` if registering ``plugin_module`` (the module of the
    plugin's ``pocketlm`` entry point) imports a tensor library."""
    imported = heavy_imports(plugin_module)
    _raise(f"registering {plugin_module} imports heavy libraries",
           [f"{name} is imported: keep it out of the module's top level and of the options' module; "
            "give the component's callables as pocketlm.lazy('package.module:function')" for name in imported])
