"""Stage checkpoints: a model with quantized modules and masks, saved so it reloads exactly.

A checkpoint folder holds ``config.json`` (updated by structural changes), the tokenizer,
``model.safetensors`` (shared tensors stored once), ``masks.safetensors`` and
``pocketlm-modules.json``, which records the modules that replaced dense ones so the loader can
rebuild them before loading the weights. Nothing is pickled.

A plugin whose method replaces modules with a type of its own registers that type with
:func:`register_module_type`: the manifest then records the module under the type's name with
what :func:`describe` returns, and loading asks the registered ``rebuild`` for it, after the
core has rebuilt whatever quantized module it wraps. A checkpoint that names a type no
installed plugin registered is refused with the plugin to install, never loaded without it.

A stage of a model streamed from disk leaves a streamed checkpoint: one shard per decoder layer
(written by :mod:`pocketlm.streaming` as the layers finish) and the rest of the model as a
regular checkpoint (:func:`save_rest`); :func:`load_checkpoint` reads either. A regular
checkpoint can be read as a streamed model too (``load_checkpoint(folder, stream=True)``): its
decoder layers are read from ``model.safetensors`` one at a time, when they are reached.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model
from torch import nn

from . import atomic, streaming
from .components import LoadedModel
from .errors import PocketError
from .module_types import (MANIFEST, MODULE_TYPES, ModuleType, describe_modules, register_module_type,  # noqa: F401
                           rebuild_module)
from .modules import auto_class, find_layers_path, get_module, set_module
from .tensorfiles import SafetensorsFolder, save_tensors
from .weights import MASK_BUFFER, masks


def save_checkpoint(model: nn.Module, tokenizer, folder: Path) -> None:
    """Write ``model`` (and ``tokenizer``) into ``folder``, which must not hold another model."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(folder / "config.json")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    (folder / MANIFEST).write_text(json.dumps(describe_modules(model), indent=1, sort_keys=True))
    save_tensors(model.state_dict(), folder / "model.safetensors")   # one tensor in memory at a time
    save_tensors(masks(model), folder / "masks.safetensors")


def is_checkpoint(folder: Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def load_checkpoint(folder: Path, *, stream: bool = False) -> LoadedModel:
    """Rebuild the model saved by :func:`save_checkpoint`. ``stream``: as a streamed model whose
    decoder layers stay in the files until reached (:func:`load_checkpoint_streamed`), where
    the checkpoint allows it; the model is the same either way."""
    from transformers import AutoConfig, AutoTokenizer

    folder = Path(folder)
    if is_streamed_checkpoint(folder):
        return load_streamed_checkpoint(folder)
    if stream and not _extensions(folder):
        return load_checkpoint_streamed(folder)
    try:
        config = AutoConfig.from_pretrained(folder)
        config.tie_word_embeddings = getattr(config, "tie_word_embeddings", False)
        model = auto_class(config).from_config(config, dtype=torch.float32)
        manifest = json.loads((folder / MANIFEST).read_text())
        for name in sorted(manifest, key=lambda n: manifest[n]["type"] != "QuantizedEmbedding"):
            rebuilt = rebuild_module(manifest[name], model)
            if rebuilt is not None:
                set_module(model, name, rebuilt)
        for name, spec in manifest.items():
            if "extension" in spec:
                set_module(model, name, _extension(spec["extension"], folder).rebuild(
                    spec["extension"], get_module(model, name)))
        missing, unexpected = load_model(model, str(folder / "model.safetensors"), strict=False)
        missing = [k for k in missing if not _tied_alias(model, k)]
        if missing or unexpected:
            raise ValueError(f"missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}")
        for name, mask in load_file(str(folder / "masks.safetensors")).items():
            get_module(model, name).register_buffer(MASK_BUFFER, mask, persistent=False)
        tokenizer = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").exists() else None
    except PocketError:
        raise
    except Exception as exc:  # noqa: BLE001 - any damage is reported the same way
        raise PocketError(f"the checkpoint in {folder} cannot be loaded: {type(exc).__name__}: {exc}",
                          fix="delete this stage folder and rerun with --resume to recompute it",
                          exit_code=1) from None
    return LoadedModel(model.eval(), tokenizer, str(folder))


def _extension(spec: dict, folder: Path) -> ModuleType:
    known = MODULE_TYPES.get(spec["type"])
    if known is None:
        raise PocketError(f"the checkpoint in {folder} holds {spec['type']} modules, which no installed plugin "
                          "provides", fix=f"pip install {spec.get('provider', 'the plugin that wrote it')}")
    return known


def _tied_alias(model: nn.Module, key: str) -> bool:
    # A tied head's weight is the embedding's tensor; safetensors stores it once.
    return key.endswith("weight") and bool(getattr(model.config, "tie_word_embeddings", False))


# ------------------------------------------------------------------- streamed stage checkpoints


def is_streamed_checkpoint(folder: Path) -> bool:
    folder = Path(folder)
    return (folder / "layers").is_dir() and (folder / "rest").is_dir()


def save_rest(model: nn.Module, tokenizer, folder: Path) -> None:
    """Write everything but the decoder layers as a regular checkpoint in ``folder/rest``."""
    stream = streaming.stream_of(model)
    with atomic.folder(Path(folder) / "rest") as tmp, streaming.without_layers(model, stream.layers_path):
        save_checkpoint(model, tokenizer, tmp)
    streaming.page_out(model)


def load_streamed_checkpoint(folder: Path, layers_path_of=find_layers_path):
    """Rebuild a streamed model from a streamed stage checkpoint."""
    from transformers import AutoConfig, AutoTokenizer

    folder = Path(folder)
    rest = folder / "rest"
    config = AutoConfig.from_pretrained(rest)
    config.tie_word_embeddings = getattr(config, "tie_word_embeddings", False)
    dtype = config.dtype if isinstance(getattr(config, "dtype", None), torch.dtype) else torch.float32
    shell = streaming.build_shell(config, dtype)
    layers_path = layers_path_of(shell)
    for index, layer in enumerate(get_module(shell, layers_path)):
        streaming.rebuild_layer_modules(layer, streaming.read_layer_manifest(streaming.layer_file(folder / "layers", index)))
    manifest = json.loads((rest / MANIFEST).read_text())
    masks = SafetensorsFolder(rest, ["masks.safetensors"])
    _load_rest(shell, layers_path, manifest, SafetensorsFolder(rest, ["model.safetensors"]), masks, rest)
    tokenizer = AutoTokenizer.from_pretrained(rest) if (rest / "tokenizer_config.json").exists() else None
    streaming.attach(shell, streaming.LayerStream(shell, layers_path, store=folder / "layers"))
    return LoadedModel(shell.eval(), tokenizer, str(folder))


def _load_rest(shell: nn.Module, layers_path: str, manifest: dict, weights: SafetensorsFolder,
               masks: SafetensorsFolder, folder: Path) -> None:
    """Everything of ``shell`` outside its decoder layers, from a checkpoint's files: the
    modules ``manifest`` (the rest's) names rebuilt, their tensors read, masks attached. Reads
    only the rest's tensors, whatever else the files hold."""
    tied = bool(getattr(shell.config, "tie_word_embeddings", False))
    with streaming.without_layers(shell, layers_path):
        for name in sorted(manifest, key=lambda n: manifest[n]["type"] != "QuantizedEmbedding"):
            set_module(shell, name, rebuild_module(manifest[name], shell))
        targets = dict(shell.state_dict(keep_vars=True))
        stored = {id(targets[k]) for k in targets if k in weights}
        # a tensor held under two names (a tied head: the embedding's weight, tied again below,
        # or a quantized embedding's storage) is stored once, under the first
        missing = [k for k in targets if k not in weights and id(targets[k]) not in stored
                   and not _tied_alias(shell, k)]
        if missing:
            raise PocketError(f"the checkpoint in {folder} lacks {missing[:4]}", exit_code=1,
                              fix="delete this stage folder and rerun with --resume to recompute it")
        state = weights.read_many([k for k in targets if k in weights])
        state = {k: v.to(targets[k].dtype) if v.is_floating_point() else v for k, v in state.items()}
        shell.load_state_dict(state, strict=False, assign=True)
        if tied and not manifest:
            shell.tie_weights()
        unread = [k for k, v in shell.state_dict().items() if v.is_meta]
        if unread:
            raise PocketError(f"the checkpoint in {folder} lacks {unread[:4]}", exit_code=1,
                              fix="delete this stage folder and rerun with --resume to recompute it")
        inside = layers_path + "."
        for name, mask in masks.read_many([n for n in masks.where if not n.startswith(inside)]).items():
            get_module(shell, name).register_buffer(MASK_BUFFER, mask, persistent=False)


def _extensions(folder: Path) -> bool:
    """Whether the checkpoint holds a plugin's module types (those load whole)."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False          # the whole load reports the damage
    return any("extension" in spec for spec in manifest.values())


def load_checkpoint_streamed(folder: Path, layers_path_of=find_layers_path) -> LoadedModel:
    """A regular (whole-model) stage checkpoint as a streamed model: the shell on the meta
    device, its quantized modules rebuilt there, everything outside the decoder layers read,
    and each layer read from ``model.safetensors`` (with its masks) only when it is opened. The
    same model :func:`load_checkpoint` builds (float32, the same tensors), without holding it."""
    from transformers import AutoConfig, AutoTokenizer

    folder = Path(folder)
    try:
        config = AutoConfig.from_pretrained(folder)
        config.tie_word_embeddings = getattr(config, "tie_word_embeddings", False)
        manifest = json.loads((folder / MANIFEST).read_text())
        weights = SafetensorsFolder(folder, ["model.safetensors"])
        masks = SafetensorsFolder(folder, ["masks.safetensors"])
        shell = streaming.build_shell(config, torch.float32)   # load_checkpoint's dtype
        layers_path = layers_path_of(shell)
        inside = layers_path + "."
        with torch.device("meta"):
            for name, spec in manifest.items():
                if name.startswith(inside):
                    set_module(shell, name, rebuild_module(spec, shell))
        rest = {name: spec for name, spec in manifest.items() if not name.startswith(inside)}
        _load_rest(shell, layers_path, rest, weights, masks, folder)
        tokenizer = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").exists() else None
    except Exception as exc:  # noqa: BLE001 - any damage is reported as load_checkpoint reports it
        cause = exc.message if isinstance(exc, PocketError) else f"{type(exc).__name__}: {exc}"
        raise PocketError(f"the checkpoint in {folder} cannot be loaded: {cause}",
                          fix="delete this stage folder and rerun with --resume to recompute it",
                          exit_code=1) from None
    stream = streaming.LayerStream(shell, layers_path, source=weights, masks=masks, shard_per_part=False)
    streaming.attach(shell, stream)
    return LoadedModel(shell.eval(), tokenizer, str(folder))
