"""Exporting and loading a model with activation thresholds.

The ``dynamic`` exporter writes the weights with another installed exporter (``base``: ``hf``,
``gguf``, ``compressed-tensors``, ...; ``auto`` picks the one that packs the most of the rest,
like ``format = "auto"``) and adds the thresholds beside them:

* ``activation-thresholds.json`` (always), the sidecar described by :data:`FORMAT`;
* ``activation-low-rank.safetensors`` where linears carry a low-rank correction (``low_rank``):
  tensors ``<module>.low_rank_a`` (``[out, rank]``) and ``<module>.low_rank_b`` (``[rank, in]``),
  float32; the JSON then has version 2 and gives each such entry its ``low_rank``, so a reader
  of version 1 refuses the file rather than run it without the correction;
* inside a GGUF file the base wrote, the same JSON as the string metadata key
  ``pocketlm.activation_sparsity.thresholds`` (through the ``gguf`` package's public metadata
  copier). llama.cpp does not read it today: it runs such a file dense.

The ``dynamic`` loader runs such a folder in pocketlm (``pocketlm eval``): it loads the weights
with the loader that claims them and sets every threshold, refusing a sidecar that does not
match the model. :func:`apply_thresholds` is the same for a model loaded with plain
transformers, with forward hooks and nothing from pocketlm (documented in the README).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from pocketlm import PocketError
from pocketlm.modules import get_module
from pocketlm.weights import is_linear, linear_shape

# the options and the loader's detection live in the light module (registration reads them without torch)
from .options import LOW_RANK_SIDECAR, SIDECAR, DynamicExportOptions, is_dynamic_export  # noqa: F401
from .sparsity import INPUT, LOW_RANK_A, LOW_RANK_B, OUTPUT, clear_threshold, factor_problem, install, \
    low_rank_correction, low_ranks, thresholds

GGUF_KEY = "pocketlm.activation_sparsity.thresholds"
FORMAT = "pocketlm-activation-thresholds"
#: Version 1: thresholds only; version 2: some entries also name a ``low_rank`` correction.
VERSION = 2
VERSIONS = (1, 2)
RULE = {"input": "the module computes f(x * (|x| > threshold)): input entries at or below the threshold are zero",
        "output": "the module's output y becomes y * (|y| > threshold) (an MLP gate activation, CATS)"}
_PLACE = {INPUT: "input", OUTPUT: "output"}


# ------------------------------------------------------------------------------ sidecar


def sidecar(model: nn.Module) -> dict:
    """The JSON document of ``model``'s thresholds."""
    entries, factors = [], low_ranks(model)
    for name, (where, value) in sorted(thresholds(model).items()):
        entries.append({"module": name, "place": _PLACE[where], "threshold": value, "width": _width(model, name, where)})
        if name in factors:
            entries[-1]["low_rank"] = int(factors[name][1].shape[0])
    config = getattr(model, "config", None)
    return {"format": FORMAT, "version": VERSION if factors else 1, "rule": RULE,
            "model_type": getattr(config, "model_type", None),
            "num_hidden_layers": getattr(config, "num_hidden_layers", None), "thresholds": entries}


def _width(model: nn.Module, name: str, where: str) -> int:
    if where == INPUT:
        return linear_shape(get_module(model, name))[1]
    parent = get_module(model, name.rpartition(".")[0])  # an MLP activation: the gate's output width
    gate = getattr(parent, "gate_proj", None)
    return linear_shape(gate)[0] if gate is not None else -1


def read_sidecar(path: Path) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise PocketError(f"{path} is not a readable thresholds file: {exc}", file=str(path),
                          fix="re-export the model with format = \"dynamic\"") from None
    if doc.get("format") != FORMAT or doc.get("version") not in VERSIONS:
        raise PocketError(f"{path} is not a {FORMAT} file of version {' or '.join(map(str, VERSIONS))}",
                          file=str(path), field="format", fix="re-export the model with format = \"dynamic\"")
    return doc


def read_low_rank(doc: dict, folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The low-rank factors the entries of ``doc`` name, from :data:`LOW_RANK_SIDECAR` in
    ``folder`` (an empty table when no entry has one)."""
    named = [e["module"] for e in doc.get("thresholds", []) if e.get("low_rank")]
    if not named:
        return {}
    path = Path(folder) / LOW_RANK_SIDECAR
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - a missing or damaged file is reported the same way
        fix = "copy the export folder whole, or re-export the model with format = \"dynamic\""
        raise PocketError(f"{path} cannot be read ({type(exc).__name__}: {exc}); the thresholds name a low-rank "
                          f"correction for {len(named)} linears", file=str(path), fix=fix) from None
    missing = [n for n in named if f"{n}.{LOW_RANK_A}" not in tensors or f"{n}.{LOW_RANK_B}" not in tensors]
    if missing:
        raise PocketError(f"{path} lacks the low-rank factors of {missing[0]}"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""), file=str(path),
                          fix="re-export the model with format = \"dynamic\"")
    return {n: (tensors[f"{n}.{LOW_RANK_A}"], tensors[f"{n}.{LOW_RANK_B}"]) for n in named}


def check_against(model: nn.Module, doc: dict, path: Path) -> dict[str, tuple[str, float]]:
    """The thresholds of ``doc`` as a table for :func:`install`, after checking that they fit
    ``model`` (family, depth, module names, widths)."""
    config = getattr(model, "config", None)
    problems = []
    for key in ("model_type", "num_hidden_layers"):
        if doc.get(key) is not None and getattr(config, key, None) != doc[key]:
            problems.append(f"{key} is {getattr(config, key, None)!r} in the model, {doc[key]!r} in the thresholds")
    table = {}
    for entry in doc.get("thresholds", []):
        where = INPUT if entry.get("place") == "input" else OUTPUT if entry.get("place") == "output" else None
        name = entry.get("module", "?")
        try:
            module = get_module(model, name)
        except AttributeError:
            problems.append(f"{name}: no such module in the model")
            continue
        if where is None:
            problems.append(f"{name}: place must be 'input' or 'output', not {entry.get('place')!r}")
        elif where == INPUT and (not is_linear(module) or linear_shape(module)[1] != entry.get("width")):
            problems.append(f"{name}: expected a linear with {entry.get('width')} inputs, found "
                            f"{type(module).__name__} {linear_shape(module) if is_linear(module) else ''}")
        else:
            table[name] = (where, float(entry["threshold"]))
    if problems:
        raise PocketError(f"the thresholds in {path} do not match the model: " + "; ".join(problems[:4])
                          + (f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""),
                          file=str(path), field="thresholds",
                          fix="use the thresholds exported with these weights, or recalibrate with activation-sparsity")
    return table


# ----------------------------------------------------------------------------- exporter


def _base_exporter(plugins, options: DynamicExportOptions, model: nn.Module):
    from pocketlm.recipe import rank_exporters

    if options.base == "dynamic":
        raise PocketError("the dynamic exporter cannot be its own base", field="export.base",
                          fix="base = \"hf\", \"gguf\" or another installed format")
    if options.base != "auto":
        if options.base not in plugins.exporters:
            raise PocketError(f"unknown base format {options.base!r}", field="export.base",
                              fix="choose one of: " + ", ".join(sorted(n for n in plugins.exporters if n != "dynamic")))
        return plugins.exporters[options.base]
    features = _features(model)
    ranked = [e for e in rank_exporters(plugins.exporters, features) if e.name != "dynamic"]
    return ranked[0] if ranked else plugins.exporters["hf"]


def _features(model: nn.Module) -> set[str]:
    from pocketlm.weights import QuantizedEmbedding, QuantizedLinear, masks

    features = {"dense"}
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        features.add("quantized")
    if any(isinstance(m, QuantizedEmbedding) for m in model.modules()):
        features.add("quantized-embedding")
    if masks(model):
        features.add("masked")
    return features


def check(model: nn.Module, options: DynamicExportOptions) -> list[str]:
    if options.base == "dynamic":
        return ["the dynamic exporter cannot be its own base: set base to hf, gguf or another format"]
    return []


def export_dynamic(model: nn.Module, path: Path, options: DynamicExportOptions, context) -> None:
    plugins = context.plugins
    base = _base_exporter(plugins, options, model)
    table, factors = thresholds(model), low_ranks(model)
    doc = sidecar(model)
    doc["weights_format"] = base.name
    try:  # the base writes the weights of the plain model; the thresholds go back afterwards
        for name in table:
            clear_threshold(get_module(model, name))
        problems = base.problems(model, base.options(**options.base_options), context)
        if problems:
            raise PocketError(f"base format {base.name!r} refuses the model: {'; '.join(problems)}",
                              field="export.base", fix="choose another base format")
        plugins.hook.export(model=model, exporter=base, options=base.options(**options.base_options), path=path,
                            context=context)
    finally:
        install(model, table, factors=factors)
    if factors:
        from safetensors.torch import save_file

        save_file({f"{name}.{key}": tensor.detach().float().cpu().contiguous()
                   for name, (a, b) in factors.items() for key, tensor in ((LOW_RANK_A, a), (LOW_RANK_B, b))},
                  str(Path(path) / LOW_RANK_SIDECAR), metadata={"format": FORMAT})
    text = json.dumps(doc, indent=1, sort_keys=True)
    (Path(path) / SIDECAR).write_text(text + "\n")
    for gguf_file in sorted(Path(path).glob("*.gguf")):
        add_gguf_metadata(gguf_file, text)


def add_gguf_metadata(path: Path, text: str) -> None:
    """Rewrite the GGUF file at ``path`` with the thresholds JSON as metadata key
    :data:`GGUF_KEY` (a string), through the ``gguf`` package's metadata copier."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(str(path), "r")
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch=arch, endianess=reader.endianess)
    alignment = reader.get_field(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = alignment.contents()
    import logging

    level = logging.getLogger("gguf-new-metadata").level
    copy_with_new_metadata(reader, writer, {GGUF_KEY: MetadataDetails(gguf.GGUFValueType.STRING, text)}, [])
    logging.getLogger("gguf-new-metadata").setLevel(level)
    del reader
    tmp.replace(path)


def read_gguf_metadata(path: Path) -> dict | None:
    """The thresholds JSON stored in a GGUF file's metadata, or None."""
    import gguf

    field = gguf.GGUFReader(str(path), "r").get_field(GGUF_KEY)
    return None if field is None else json.loads(field.contents())


# ------------------------------------------------------------------------------- loader


def load_dynamic(source: str, options):
    """Load the weights with the loader that claims them, then set the thresholds."""
    from pocketlm import LoadedModel, installed_plugins

    folder = Path(source)
    weights = str(folder)
    ggufs = sorted(folder.glob("*.gguf"))
    if not (folder / "config.json").is_file() and ggufs:
        weights = str(ggufs[0])
    loader = next((l for l in installed_plugins().loaders if l.name != "dynamic" and l.matches(weights)), None)
    if loader is None:
        raise PocketError(f"no installed loader reads the weights in {folder}", file=str(folder),
                          fix="install the plugin of the format it was exported with")
    loaded = loader.load(weights, options)
    doc = read_sidecar(folder / SIDECAR)
    install(loaded.model, check_against(loaded.model, doc, folder / SIDECAR), source=str(folder / SIDECAR),
            factors=read_low_rank(doc, folder))
    return LoadedModel(loaded.model, loaded.tokenizer, str(folder))


# ---------------------------------------------------------------- plain transformers


def apply_thresholds(model: nn.Module, path: str | Path) -> list:
    """Apply an ``activation-thresholds.json`` to a model loaded with plain transformers,
    with forward hooks (nothing else from pocketlm runs). Returns the hook handles; a sidecar
    that does not fit the model raises. The README shows the same in 15 self-contained lines."""
    doc = read_sidecar(Path(path))
    table = check_against(model, doc, Path(path))
    factors = read_low_rank(doc, Path(path).parent)
    for name, pair in factors.items():  # every factor checked before any hook: nothing half-applied
        problem = factor_problem(get_module(model, name), *pair)
        if problem:
            raise PocketError(f"{Path(path).parent / LOW_RANK_SIDECAR}: {name}: {problem}",
                              fix="use the export folder these weights came with")
    handles = []
    for name, (where, value) in table.items():
        module = get_module(model, name)
        t = torch.tensor(value)
        if where == INPUT and name in factors:  # the skipped part goes through A @ B, around the module
            handles += _corrected(module, t, *(f.to(module.weight.device) for f in factors[name]))
        elif where == INPUT:
            handles.append(module.register_forward_pre_hook(
                lambda m, args, t=t: (args[0] * (args[0].abs() > t),) + tuple(args[1:])))
        else:
            handles.append(module.register_forward_hook(lambda m, args, y, t=t: y * (y.abs() > t)))
    return handles


def _corrected(module: nn.Module, t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> list:
    """Hooks for a thresholded linear with a correction: the pre-hook keeps the input's skipped
    part (forward hooks see the thresholded input) and the forward hook adds it through A @ B."""
    skipped = {}

    def before(m, args):
        x = args[0]
        skipped["x"] = x * (x.abs() <= t)
        return (x * (x.abs() > t),) + tuple(args[1:])

    def after(m, args, y):
        return y + low_rank_correction(skipped.pop("x"), a, b)

    return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
