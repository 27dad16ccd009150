"""Recipes: TOML (or YAML, safe loader) files that describe a multi-stage run.

Validation happens in layers, and the first problem found ends it with one
:class:`PocketError` naming the file, the line (where the format allows), the field path, what
was expected, and the fix:

1. syntax (TOML or YAML);
2. the recipe's own sections (``[model]``, ``[calibration]``, ``[[stages]]``, ``[evaluate]``,
   ``[export]``, ``[plugins]``), closed to unknown keys;
3. each stage against its method's options model, declared by the plugin that provides it;
4. the plugins the recipe requires, with version ranges;
5. how the stages combine: ordering constraints, one quantizer per layer, and whether the
   exporter can represent the result.
"""

from __future__ import annotations

import difflib
import json
import os
import re
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as a package
    import tomli as tomllib
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import Version
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator
from pydantic_core import PydanticUndefined

from . import registry
from .components import Method, NoOptions, SizeEffect, unrepresented
from .data import DEFAULT_CALIBRATION_TEXT, resolve_text, sha256
from .errors import PocketError

#: The title of the JSON Schema ``pocketlm schema`` writes (it recognises its own earlier output by it).
RECIPE_SCHEMA_TITLE = "pocketlm recipe"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# Where weights wait while no layer works on them (see pocketlm.devices); a Literal that only grows.
Offload = Literal["auto", "none", "cpu", "disk"]
# Where layer computation runs (pocketlm.devices resolves it; kept here so validation needs no torch).
DEVICE_PATTERN = r"^(auto|cpu|cuda|cuda:[0-9]+)$"


class ModelSection(_Section):
    source: str = Field("demo:smollm2-135m", description="a transformers folder, a .gguf file, a Hugging Face Hub "
                        "id (org/name), or demo:NAME")
    revision: str | None = Field(None, description="branch, tag or commit of a Hub model (default: main)")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="dtype to load the weights in")
    # Safety switches: true or false only, never "yes", "on" or 1.
    allow_pickle: StrictBool = Field(False, description="allow pickle (.bin) weights; pickle can run code")
    trust_remote_code: StrictBool = Field(False, description="let transformers run the model folder's own code")
    device: str = Field("auto", pattern=DEVICE_PATTERN,
                        description='where layer computation runs: "auto" (the first CUDA device, else the CPU), '
                        '"cpu", "cuda" or "cuda:N"')
    offload: Offload = Field(
        "none", description='where weights wait while no layer works on them: "none" (the whole model on the '
        'device), "cpu" (one decoder layer at a time on the device), "disk" (each decoder layer read from the '
        'safetensors or GGUF files when its turn comes, written to the stage checkpoint and freed) or "auto" ("disk" '
        'when the float model exceeds half the available memory)')


class CalibrationSection(_Section):
    text: str = Field(DEFAULT_CALIBRATION_TEXT, description="calibration text file, or builtin:NAME")
    samples: int = Field(32, ge=1, le=1_000_000, description="number of windows")
    seq_len: int = Field(512, ge=8, le=1_000_000, description="tokens per window")
    seed: int = Field(0, ge=0, description="seed for picking windows and for every stage")
    batch_size: int = Field(8, ge=1, le=4096, description="windows per forward pass while calibrating")
    generated: int = Field(0, ge=0, le=100_000, description="windows the original model writes itself (sampled at "
                           "generated_temperature from a random first token, seeded), added after the text's windows so "
                           "every stage calibrates and trains on the model's own distribution too; causal LMs only")
    generated_temperature: float = Field(1.0, gt=0, le=2, description="the temperature the generated windows are "
                                         "sampled at: 1 is the model's own distribution, below 1 more coherent text")


class EvaluateSection(BaseModel):
    """``metrics`` to measure before and after; a sub-table named after a metric holds its
    options (``[evaluate.perplexity] windows = 8``)."""

    model_config = ConfigDict(extra="allow", strict=True)
    metrics: list[str] = Field(default_factory=lambda: ["perplexity", "size"])
    before: bool = Field(True, description="also measure the model before the first stage")
    per_stage: list[str] = Field(default_factory=lambda: ["parameters", "sparsity", "size"],
                                 description="metrics measured after every stage")


class ExportSection(BaseModel):
    """``format`` names an exporter; other keys are that exporter's options."""

    model_config = ConfigDict(extra="allow", strict=True)
    format: str = Field("hf", description="exporter name")
    path: str = Field("export", description="output folder, relative to the run folder")


class StageSection(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    method: str


class RecipeFile(_Section):
    model: ModelSection = Field(default_factory=ModelSection)
    calibration: CalibrationSection = Field(default_factory=CalibrationSection)
    stages: list[StageSection] = Field(default_factory=list)
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)
    export: ExportSection | None = None
    plugins: dict[str, str] = Field(default_factory=dict, description="required plugins and version ranges")

    @field_validator("plugins")
    @classmethod
    def _ranges(cls, value: dict[str, str]) -> dict[str, str]:
        for name, spec in value.items():
            try:
                SpecifierSet(spec)
            except InvalidSpecifier:
                raise ValueError(f"{spec!r} for plugin {name!r} is not a version range such as \">=0.1,<1\"")
        return value


class Stage(BaseModel):
    """A validated stage: the method and an instance of its options model."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    method: str
    options: Any


class Recipe(BaseModel):
    """A recipe validated against the installed plugins."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    file: RecipeFile
    stages: list[Stage]
    evaluators: dict[str, Any]
    export_options: Any = None
    path: Path | None = None
    locate: Any = Field(None, exclude=True)  # finds a field's line in the recipe text

    @property
    def base(self) -> Path:
        return self.path.parent if self.path else Path.cwd()

    def resolved(self) -> dict:
        """The recipe with every default filled in, as plain data."""
        data = self.file.model_dump(mode="json")
        data["stages"] = [{"method": s.method, **s.options.model_dump(mode="json")} for s in self.stages]
        if self.file.export is not None:
            data["export"] = {"format": self.file.export.format, "path": self.file.export.path,
                              **self.export_options.model_dump(mode="json")}
        data["evaluate"] = {"metrics": self.file.evaluate.metrics, "before": self.file.evaluate.before,
                            "per_stage": self.file.evaluate.per_stage,
                            **{k: v.model_dump(mode="json") for k, v in self.evaluators.items()}}
        return data


# ----------------------------------------------------------------------------- loading


def load_recipe(path: str | Path, plugins) -> Recipe:
    """Read and validate the recipe at ``path`` against ``plugins``."""
    path = Path(path)
    if not path.is_file():
        raise PocketError(f"recipe file {path} does not exist", file=str(path),
                          fix="check the path, or run `pocketlm run` with no recipe for the default")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[:exc.start].count(b"\n") + 1
        raise PocketError(f"the recipe is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})",
                          file=str(path), line=line, fix="save the recipe as UTF-8") from None
    fmt = "yaml" if path.suffix.lower() in (".yaml", ".yml") else "toml"
    return parse_recipe(text, plugins, fmt=fmt, file=str(path), path=path)


def parse_recipe(text: str, plugins, *, fmt: str = "toml", file: str = "<recipe>", path: Path | None = None) -> Recipe:
    return recipe_from_data(_parse(text, fmt, file), plugins, file=file, path=path, locate=_Locator(text, fmt, file))


def recipe_from_data(raw: dict, plugins, *, file: str = "<recipe>", path: Path | None = None, locate=None) -> Recipe:
    """Validate a recipe given as plain data (the dict a TOML or YAML file parses to)."""
    if not isinstance(raw, dict):
        raise PocketError("a recipe must be a table of sections at the top level", file=file,
                          fix="start with [model], [[stages]] ... (see docs/recipes.md)")
    locate = locate or _Locator("", "toml", file)
    try:
        recipe_file = strict_validate(RecipeFile, raw)
    except ValidationError as exc:
        raise _from_validation(exc, locate, prefix=(), model=RecipeFile) from None
    base = path.parent if path else Path.cwd()
    _resolve_source(recipe_file, base if path else None)
    _check_required_plugins(recipe_file, plugins, locate)
    stages = [_validate_stage(i, stage, plugins, locate) for i, stage in enumerate(recipe_file.stages)]
    evaluators = _validate_evaluate(recipe_file.evaluate, plugins, locate)
    export_options = _validate_export(recipe_file.export, plugins, locate) if recipe_file.export else None
    recipe = Recipe(file=recipe_file, stages=stages, evaluators=evaluators, export_options=export_options, path=path,
                    locate=locate)
    _check_source(recipe, plugins, locate)
    _check_texts(recipe, base, locate, plugins)
    _check_combination(recipe, plugins, locate)
    return recipe


def strict_validate(model: type[BaseModel], data: dict):
    """Validate recipe data without coercion: ``"yes"`` is not a boolean, ``"8"`` not a number,
    ``8.0`` not an integer. JSON's strict mode also accepts arrays for tuple options."""
    return model.model_validate_json(json.dumps(data, default=str), strict=True)


def _resolve_source(recipe_file: RecipeFile, base: Path | None) -> None:
    """A relative local ``[model] source`` is taken from the recipe's folder, like ``calibration.text``."""
    from .rundir import local_source

    source = recipe_file.model.source
    local = local_source(source, base)
    if base is not None and local is not None and not Path(source).expanduser().is_absolute():
        recipe_file.model.source = os.path.normpath(local.absolute())


class _DuplicateKey(Exception):
    def __init__(self, key, line: int, first: int):
        super().__init__(key)
        self.key, self.line, self.first = key, line, first


class _UniqueKeyLoader(yaml.SafeLoader):
    """The safe loader, refusing a key that appears twice in one mapping (TOML refuses it too;
    YAML would silently keep the last one, so a second ``model:`` could switch on pickle)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                break
            if first is not None:
                raise _DuplicateKey(key, key_node.start_mark.line + 1, first)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, file: str, loader=_UniqueKeyLoader,
              syntax_fix: str = "fix the YAML syntax (recipes are data: no tags, no code)"):
    """YAML data through a safe loader that refuses a key written twice; a duplicate or a syntax
    error is one :class:`PocketError` naming the file and the line."""
    try:
        return yaml.load(text, Loader=loader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as exc:
        raise PocketError(f"duplicate key {exc.key!r} (first at line {exc.first})", file=file, line=exc.line,
                          fix="keep one of them; YAML would silently use the last") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise PocketError(f"YAML syntax error: {getattr(exc, 'problem', exc)}", file=file,
                          line=mark.line + 1 if mark else None, fix=syntax_fix) from None


def _parse(text: str, fmt: str, file: str) -> dict:
    if fmt == "yaml":
        raw = load_yaml(text, file)
    else:
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            match = re.search(r"line (\d+)", str(exc))
            raise PocketError(f"TOML syntax error: {exc}", file=file, line=int(match.group(1)) if match else None,
                              fix="fix the TOML syntax; strings need quotes, tables need [brackets]") from None
    if raw is None or raw == {}:
        raise PocketError("the recipe is empty", file=file,
                          fix="write at least [model] source = \"...\" (see docs/recipes.md), or run "
                          "`pocketlm run` with no recipe for the default")
    if not isinstance(raw, dict):
        raise PocketError("a recipe must be a table of sections at the top level", file=file,
                          fix="start with [model], [[stages]] ... (see docs/recipes.md)")
    return raw


# ------------------------------------------------------------------------ stage checks


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}? " if close else ""


def _validate_stage(index: int, stage: StageSection, plugins, locate) -> Stage:
    where = ("stages", index)
    method: Method | None = plugins.methods.get(stage.method)
    if method is None:
        raise PocketError(f"unknown method {stage.method!r}", file=locate.file,
                          line=locate(where + ("method",)), field=f"stages[{index}].method",
                          fix=_missing_method_fix(stage.method, plugins))
    options = {k: v for k, v in (stage.model_extra or {}).items()}
    try:
        validated = strict_validate(method.options, options)
    except ValidationError as exc:
        raise _from_validation(exc, locate, prefix=where, model=method.options,
                               what=f"method {method.name!r}") from None
    _check_grid_rule(index, method, validated, plugins, locate)
    return Stage(method=stage.method, options=validated)


def _check_grid_rule(index: int, method: Method, options, plugins, locate) -> None:
    """A method option called ``grid`` names a registered grid rule (see ``GridRule``); refuse an
    unknown rule, or one that cannot fit the stage's ``bits``/``group_size``/``symmetric``."""
    name = getattr(options, "grid", None)
    if not isinstance(name, str):
        return
    where = ("stages", index, "grid")
    rules = getattr(plugins, "grid_rules", {})
    rule = rules.get(name)
    if rule is None:
        raise PocketError(f"method {method.name!r}: unknown grid rule {name!r}", file=locate.file,
                          line=locate(where), field=f"stages[{index}].grid",
                          fix=_did_you_mean(name, rules) + _missing_grid_hint(name) + "installed grid rules: "
                          + ", ".join(sorted(rules)))
    wanted = rule.problems(getattr(options, "bits", None), getattr(options, "group_size", None),
                           getattr(options, "symmetric", None))
    if wanted:
        raise PocketError(f"method {method.name!r}: grid rule {name!r} needs " + ", ".join(wanted),
                          file=locate.file, line=locate(where), field=f"stages[{index}].grid",
                          fix="set " + " and ".join(w.split(" (")[0] for w in wanted)
                          + f" in this stage, or choose another grid ({rule.summary})")


def _missing_grid_hint(name: str) -> str:
    entry = registry.provider_of("grid_rules", name)
    return f"grid rule {name!r} is provided by {entry.distribution} ({entry.install}); " if entry else ""


def _missing_method_fix(name: str, plugins) -> str:
    hint = _did_you_mean(name, plugins.methods)
    entry = registry.provider_of("methods", name)
    if entry is not None:
        skipped = next((p for p in plugins.problems if p.distribution == entry.distribution), None)
        if skipped is not None:
            return (f"{hint}method {name!r} is provided by {entry.distribution}, which is installed but was "
                    f"skipped: {skipped.reason}")
        return f"{hint}method {name!r} is provided by {entry.distribution}: {entry.install}"
    known = ", ".join(sorted(plugins.methods)) or "none (install a plugin)"
    return f"{hint}installed methods: {known}; `pocketlm plugins --available` lists more"


def _validate_evaluate(section: EvaluateSection, plugins, locate) -> dict[str, Any]:
    validated: dict[str, Any] = {}
    names = list(dict.fromkeys(section.metrics + section.per_stage + list(section.model_extra or {})))
    for metric in names:
        if metric not in plugins.evaluators:
            field_name = "metrics" if metric in section.metrics else ("per_stage" if metric in section.per_stage else metric)
            raise PocketError(f"unknown metric {metric!r}", file=locate.file, line=locate(("evaluate", field_name)),
                              field=f"evaluate.{field_name}",
                              fix=_did_you_mean(metric, plugins.evaluators) + "available metrics: "
                              + ", ".join(sorted(plugins.evaluators)))
        options = (section.model_extra or {}).get(metric, {})
        if not isinstance(options, dict):
            raise PocketError(f"options of metric {metric!r} must be a table", file=locate.file,
                              line=locate(("evaluate", metric)), field=f"evaluate.{metric}",
                              fix=f"write them as [evaluate.{metric}] with keys below it")
        try:
            validated[metric] = strict_validate(plugins.evaluators[metric].options, options)
        except ValidationError as exc:
            raise _from_validation(exc, locate, prefix=("evaluate", metric),
                                   model=plugins.evaluators[metric].options, what=f"metric {metric!r}") from None
    return validated


AUTO_FORMAT = "auto"


def _validate_export(section: ExportSection, plugins, locate):
    if section.format == AUTO_FORMAT:  # chosen at export time: see pipeline.Run._choose_exporter
        extra = dict(section.model_extra or {})
        if extra:
            raise PocketError(f"format \"auto\" takes no exporter options, got {', '.join(extra)}", file=locate.file,
                              line=locate(("export", next(iter(extra)))), field=f"export.{next(iter(extra))}",
                              fix="name a format to pass it options, or remove them")
        return NoOptions()
    exporter = plugins.exporters.get(section.format)
    if exporter is None:
        entry = registry.provider_of("exporters", section.format)
        fix = _did_you_mean(section.format, plugins.exporters)
        fix += (f"format {section.format!r} is provided by {entry.distribution}: {entry.install}" if entry else
                "available formats: " + ", ".join(sorted(plugins.exporters)))
        raise PocketError(f"unknown export format {section.format!r}", file=locate.file,
                          line=locate(("export", "format")), field="export.format", fix=fix)
    try:
        return strict_validate(exporter.options, dict(section.model_extra or {}))
    except ValidationError as exc:
        raise _from_validation(exc, locate, prefix=("export",), model=exporter.options,
                               what=f"export format {exporter.name!r}") from None


def _check_required_plugins(recipe_file: RecipeFile, plugins, locate) -> None:
    installed = {i.distribution: i for i in plugins.infos if i.distribution}
    installed.update({i.name: i for i in plugins.infos})
    for name, spec in recipe_file.plugins.items():
        normal = re.sub(r"[-_.]+", "-", name).lower()
        info = installed.get(normal) or installed.get(name)
        line = locate(("plugins", name))
        if info is None:
            entry = registry.entry(normal)
            raise PocketError(f"the recipe needs plugin {name!r}, which is not installed", file=locate.file,
                              line=line, field=f"plugins.{name}",
                              fix=entry.install if entry else f"pip install {name!r}")
        if info.version and Version(info.version) not in SpecifierSet(spec):
            raise PocketError(f"the recipe needs {name} {spec}, but {info.version} is installed", file=locate.file,
                              line=line, field=f"plugins.{name}", fix=f"pip install '{name}{spec}'")


def _model_config(recipe: Recipe, locate) -> dict | None:
    """The local source folder's config.json (read as data; no weights are loaded), or None for
    a source that is not a folder. A folder without one, or with a damaged one, is refused."""
    from .rundir import local_source

    local = local_source(recipe.file.model.source)
    if local is None or not local.is_dir():
        return None
    # a stage checkpoint streamed from disk keeps everything but its layers in rest/
    config = local / "config.json" if not (local / "rest" / "config.json").is_file() else local / "rest" / "config.json"
    where = dict(file=locate.file, line=locate(("model", "source")), field="model.source")
    if not config.is_file():
        raise PocketError(f"{local} is not a transformers model folder: it has no config.json", **where,
                          fix="point model.source at the folder save_pretrained wrote")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise PocketError(f"{config} is damaged: {exc}", **where,
                          fix="restore the model folder (its config.json is not valid JSON)") from None
    if not isinstance(data, dict):
        raise PocketError(f"{config} is damaged: it holds no JSON object", **where,
                          fix="restore the model folder (its config.json is not a model configuration)")
    return data


def _context_length(config: dict | None) -> int | None:
    if not config:
        return None
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def _check_source(recipe: Recipe, plugins, locate) -> None:
    """What can be known about the model without loading it: that a local source exists, that
    its architecture is registered, and that the windows fit its context."""
    from .rundir import local_source

    source = recipe.file.model.source
    local = local_source(source)
    line = locate(("model", "source"))
    if local is not None and not local.exists():
        raise PocketError(f"model source {local} does not exist", file=locate.file, line=line, field="model.source",
                          fix="give an existing transformers folder or .gguf file (a relative path is taken "
                          "from the recipe's folder), or demo:smollm2-135m")
    config = _model_config(recipe, locate)
    if config is None:
        return
    model_type = config.get("model_type")
    known = sorted({t for a in plugins.architectures for t in a.model_types})
    if recipe.stages and model_type not in known:
        raise PocketError(f"no architecture is registered for model type {model_type!r} (from {local / 'config.json'})",
                          file=locate.file, line=line, field="model.source",
                          fix="install a plugin that registers it (register_architectures hook); "
                          f"known model types: {', '.join(known)}")
    _check_encoder_metrics(recipe, plugins, model_type, locate)
    context = _context_length(config)
    calibration = recipe.file.calibration
    if context and recipe.stages and calibration.seq_len > context:
        raise PocketError(f"seq_len {calibration.seq_len} is longer than the model's context of {context} tokens",
                          file=locate.file, line=locate(("calibration", "seq_len")), field="calibration.seq_len",
                          fix=f"set seq_len to {context} or less")
    perplexity = recipe.evaluators.get("perplexity")
    if context and perplexity is not None and perplexity.seq_len > context:
        raise PocketError(f"seq_len {perplexity.seq_len} is longer than the model's context of {context} tokens",
                          file=locate.file, line=locate(("evaluate", "perplexity", "seq_len")),
                          field="evaluate.perplexity.seq_len", fix=f"set seq_len to {context} or less")


NEXT_TOKEN_METRICS = ("perplexity", "kl-divergence", "top1-agreement")


def _check_encoder_metrics(recipe: Recipe, plugins, model_type, locate) -> None:
    """An encoder predicts no next token: refuse the metrics that need one, where the recipe names
    them (with no metrics named, the run picks the encoder defaults)."""
    candidates = [a for a in plugins.architectures if model_type in a.model_types]
    if not candidates or not all(a.encoder for a in candidates):
        return
    evaluate = recipe.file.evaluate
    named = {"metrics": evaluate.metrics if "metrics" in evaluate.model_fields_set else [],
             "per_stage": evaluate.per_stage}
    for key, metrics in named.items():
        for metric in NEXT_TOKEN_METRICS:
            if metric in metrics:
                raise PocketError(f"{metric} measures next-token predictions, but {model_type!r} is an encoder",
                                  file=locate.file, line=locate(("evaluate", key)), field=f"evaluate.{key}",
                                  fix='measure an encoder by its embeddings: metrics = ["embedding-fidelity", '
                                  '"retrieval", "size"]')


def _check_texts(recipe: Recipe, base: Path, locate, plugins=None) -> None:
    """Both texts exist, differ in content, and are long enough: a token takes at least one
    byte, so a text of fewer bytes than the windows need tokens is surely too short."""
    calibration = resolve_text(recipe.file.calibration.text, base)
    if not calibration.is_file():
        raise PocketError(f"calibration text {calibration} does not exist", file=locate.file,
                          line=locate(("calibration", "text")), field="calibration.text",
                          fix="give an existing text file, or builtin:wikitext-2-valid")
    section = recipe.file.calibration
    calibrates = plugins is not None and any(plugins.methods[s.method].needs_calibration for s in recipe.stages)
    needed = section.samples * section.seq_len
    if calibrates and calibration.stat().st_size < needed:
        raise PocketError(f"calibration text {calibration} holds {calibration.stat().st_size} bytes, fewer than the "
                          f"{section.samples} windows of {section.seq_len} tokens need", file=locate.file,
                          line=locate(("calibration", "samples")), field="calibration.samples",
                          fix="lower samples or seq_len, or use a longer text")
    perplexity = recipe.evaluators.get("perplexity")
    if perplexity is not None:
        evaluation = resolve_text(perplexity.text, base)
        if not evaluation.is_file():
            raise PocketError(f"evaluation text {evaluation} does not exist", file=locate.file,
                              line=locate(("evaluate", "perplexity", "text")), field="evaluate.perplexity.text",
                              fix="give an existing text file, or builtin:wikitext-2-test")
        if evaluation.stat().st_size < perplexity.seq_len:
            raise PocketError(f"evaluation text {evaluation} holds {evaluation.stat().st_size} bytes, fewer than "
                              f"one window of {perplexity.seq_len} tokens needs", file=locate.file,
                              line=locate(("evaluate", "perplexity", "text")), field="evaluate.perplexity.text",
                              fix="use a longer text, or lower evaluate.perplexity.seq_len")
        if evaluation.resolve() == calibration.resolve() or sha256(evaluation) == sha256(calibration):
            raise PocketError("the recipe calibrates on the text it evaluates on, which flatters the result",
                              file=locate.file, line=locate(("calibration", "text")), field="calibration.text",
                              fix="calibrate and evaluate on disjoint texts (builtin:wikitext-2-valid for "
                              "calibration, builtin:wikitext-2-test for evaluation)")


# ---------------------------------------------------------------------- combinations


def combination_problems(stages: list[tuple[Method, Any]], exporter=None, export_options=None) -> list[tuple[int | None, str]]:
    """Why a sequence of (method, options) stages, optionally followed by ``exporter``, cannot
    work: a list of (stage index or None for the export, reason). Uses only what plugins
    declare: kinds, ``not_after``, ``needs_before``, ``exclusive`` and size effects. Shared with
    the planner."""
    problems: list[tuple[int | None, str]] = []
    seen_kinds: dict[str, int] = {}
    exclusive_seen: list[tuple[str, int, SizeEffect]] = []
    features: set[str] = set()
    for index, (method, options) in enumerate(stages):
        for kind in method.not_after:
            if kind in seen_kinds:
                problems.append((index, f"method {method.name!r} ({method.kind}) cannot run after a {kind} stage "
                                        f"(stage {seen_kinds[kind]}): its declared order forbids it"))
        if method.needs_before and not set(method.needs_before) & set(seen_kinds):
            needed = " or ".join(sorted(method.needs_before))
            problems.append((index, f"method {method.name!r} works on what a {needed} stage made, and no {needed} "
                                    "stage comes before it"))
        effect = method.effect(options)
        if method.exclusive:
            for kind, earlier, seen in exclusive_seen:
                if _disjoint(seen, effect):
                    continue
                if kind == method.kind and (seen.covers == effect.covers or "all" in (seen.covers, effect.covers)):
                    problems.append((index, f"two {method.kind} stages would act on the same layers "
                                            f"(stage {earlier} and stage {index}); a layer takes one {method.kind}r"))
                    break
            exclusive_seen.append((method.kind, index, effect))
        seen_kinds.setdefault(method.kind, index)
        features |= set(effect.features)
    if exporter is not None:
        missing = unrepresented(features, exporter.represents)
        if missing:
            problems.append((None, f"export format {exporter.name!r} cannot represent {', '.join(sorted(missing))} "
                                   f"weights that the stages produce"))
    return problems


def _disjoint(first: SizeEffect, second: SizeEffect) -> bool:
    """Whether two stages act on no module in common, as far as their effects say: both name
    their modules one by one and none is in both, or every pattern one selects by is a pattern
    the other ignores (what the first matches, the second leaves alone)."""
    if first.modules is not None and second.modules is not None:
        return not first.modules & second.modules
    return any(a.targets is not None and a.targets <= b.ignore for a, b in ((first, second), (second, first)))


def rank_exporters(exporters: dict, features: set[str]) -> list:
    """Exporters that can represent ``features``: those that pack most of them first, then the
    dense ``hf`` folder, then by name. Used by ``format = "auto"`` and by the planner."""
    fitting = [e for e in exporters.values() if not unrepresented(features, e.represents)]
    return sorted(fitting, key=lambda e: (-len(set(features) & set(e.packs)), e.name != "hf", e.name))


def _check_combination(recipe: Recipe, plugins, locate) -> None:
    pairs = [(plugins.methods[s.method], s.options) for s in recipe.stages]
    exporter = plugins.exporters.get(recipe.file.export.format) if recipe.file.export else None
    for index, reason in combination_problems(pairs, exporter, recipe.export_options):
        if index is None:
            raise PocketError(reason, file=locate.file, line=locate(("export", "format")), field="export.format",
                              fix="choose an export format that can hold the result (`pocketlm plugins` lists them)")
        needs = pairs[index][0].needs_before
        fix = (f"add a {' or '.join(sorted(needs))} stage before stage {index} (`pocketlm methods` lists them)"
               if needs and not needs & {m.kind for m, _ in pairs[:index]} else
               "reorder or remove stages; canonical order: structured pruning, distillation, unstructured pruning, "
               "quantization")
        raise PocketError(reason, file=locate.file, line=locate(("stages", index, "method")),
                          field=f"stages[{index}].method", fix=fix)


# ------------------------------------------------------------------ pydantic messages


def _from_validation(exc: ValidationError, locate, *, prefix: tuple, model, what: str = "") -> PocketError:
    error = exc.errors()[0]
    loc = tuple(error["loc"])
    path = prefix + loc
    field = _field_path(path)
    kind = error["type"]
    if kind == "extra_forbidden":
        key = str(loc[-1])
        owner = _owner_fields(model, loc[:-1])
        message = f"unknown key {key!r}" + (f" for {what}" if what and len(loc) == 1 else "")
        fix = _did_you_mean(key, owner) + ("valid keys: " + ", ".join(owner) if owner else "remove it")
    elif kind == "missing":
        message = f"required key {loc[-1]!r} is missing"
        fix = "add " + _field_fix(model, loc, locate.fmt).removeprefix("write ")
        if loc[-1] == "method":
            fix = 'add method = "NAME" (`pocketlm methods` lists them)'
    elif kind in ("model_type", "model_attributes_type", "dict_type"):  # pydantic would name its classes
        message = f"expected a table, got {error.get('input')!r}"
        fix = _field_fix(model, loc, locate.fmt)
    else:
        message = f"{error['msg']}, got {error.get('input')!r}"
        fix = _field_fix(model, loc, locate.fmt)
    return PocketError(message, file=locate.file, line=locate(path), field=field, fix=fix)


def _owner_fields(model, loc: tuple) -> list[str]:
    current = model
    for part in loc:
        field = getattr(current, "model_fields", {}).get(part) if isinstance(part, str) else None
        annotation = getattr(field, "annotation", None) if field else None
        if isinstance(part, int):
            continue
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            current = annotation
        else:
            args = getattr(annotation, "__args__", ())
            inner = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
            if inner is None:
                return []
            current = inner
    return list(getattr(current, "model_fields", {}))


def _leaf_field(model, loc: tuple):
    """The pydantic field ``loc`` ends at (list indices skipped), or None."""
    current, field = model, None
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return None
        current = _inner_model(field.annotation)
    return field


def _inner_model(annotation):
    """The pydantic model an annotation holds (``Section``, ``Section | None``, ``list[Section]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)), None)


def _without_none(annotation):
    if get_origin(annotation) in (Union, UnionType):
        kept = [a for a in get_args(annotation) if a is not type(None)]
        return kept[0] if len(kept) == 1 else annotation
    return annotation


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)


def _bounds(field) -> str:
    words = {"ge": "at least", "gt": "more than", "le": "at most", "lt": "less than"}
    parts = [f"{words[name]} {getattr(item, name)}" for item in field.metadata for name in words
             if getattr(item, name, None) is not None]
    return ", ".join(parts)


def _example(annotation, default) -> tuple[str, str]:
    """(a value to write, what kind of value it is) for a field's annotation."""
    annotation = _without_none(annotation)
    origin, args = get_origin(annotation), get_args(annotation)
    usable = default is not None and default is not PydanticUndefined and not callable(default)
    if origin is Literal:
        return _toml(default if usable else args[0]), "one of " + ", ".join(_toml(a) for a in args)
    if annotation is bool:
        return _toml(default if usable else True), "true or false"
    if annotation is int:
        return _toml(default if usable else 1), "a whole number"
    if annotation is float:
        return _toml(default if usable else 0.5), "a number"
    if annotation is str:
        return _toml(default if usable else "..."), "a quoted string"
    if origin in (list, tuple):
        if usable and default:
            return _toml(list(default)), "a list"
        inner, _ = _example(args[0], None) if args else ('"..."', "")
        return f"[{inner}]", "a list"
    if origin is dict:
        return "{ ... }", "a table"
    return "...", "a value of type " + getattr(annotation, "__name__", str(annotation))


def _section_fix(key: str, model: type[BaseModel], fmt: str) -> str:
    examples = [f"{name} = {_example(f.annotation, f.get_default(call_default_factory=True))[0]}"
                for name, f in list(model.model_fields.items())[:2] if name != "method"]
    if fmt == "yaml":
        return f"write {key}: as a mapping with keys below it, such as " + ", ".join(e.replace(" =", ":") for e in examples)
    return f"write [{key}] as a table with keys below it, such as " + ", ".join(examples) + " (see docs/recipes.md)"


def _field_fix(model, loc: tuple, fmt: str = "toml") -> str:
    """What to write instead, in the recipe's own syntax: the key with an example value, the
    kind of value, its bounds and its meaning."""
    field = _leaf_field(model, loc)
    key = next((str(p) for p in reversed(loc) if isinstance(p, str)), None)
    if field is None or key is None:
        return "see `pocketlm methods` and docs/recipes.md for valid values"
    annotation = _without_none(field.annotation)
    if key == "stages" and get_origin(annotation) is list:
        return ('write each stage as a [[stages]] table: a line [[stages]], then method = "NAME" and the '
                "method's options (`pocketlm methods` lists them)") if fmt != "yaml" else \
            "write stages: as a list of mappings, each with method: NAME and the method's options"
    section = _inner_model(annotation)
    if section is not None:
        return _section_fix(key, section, fmt)
    if key == "plugins":
        return 'write [plugins] as a table of distribution = "version range", such as "pocketlm-example" = ">=0.1,<1"'
    value, kind = _example(annotation, field.get_default(call_default_factory=True) if not field.is_required() else None)
    assign = f"{key}: {value}" if fmt == "yaml" else f"{key} = {value}"
    detail = ", ".join(p for p in (kind, _bounds(field)) if p)
    return f"write {assign} ({detail})" + (f": {field.description}" if field.description else "")


def _field_path(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class _Locator:
    """Finds the line of a field path in the recipe text (exact for YAML, by scanning for TOML)."""

    def __init__(self, text: str, fmt: str, file: str):
        self.text, self.fmt, self.file = text, fmt, file
        self.lines = text.splitlines()

    def __call__(self, path: tuple) -> int | None:
        try:
            return self._yaml(path) if self.fmt == "yaml" else self._toml(path)
        except Exception:  # noqa: BLE001 - a line number is a courtesy, never a failure
            return None

    def _yaml(self, path: tuple) -> int | None:
        node = yaml.compose(self.text)
        line = None
        for part in path:
            if node is None:
                break
            if isinstance(node, yaml.MappingNode):
                match = next(((k, v) for k, v in node.value if k.value == str(part)), None)
                if match is None:
                    break
                line, node = match[0].start_mark.line + 1, match[1]
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
                node = node.value[part]
                line = node.start_mark.line + 1
            else:
                break
        return line

    def _toml(self, path: tuple) -> int | None:
        start, end = 0, len(self.lines)
        parts = list(path)
        header = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*$")
        if parts and parts[0] == "stages" and len(parts) > 1 and isinstance(parts[1], int):
            count = -1
            for number, line in enumerate(self.lines):
                if re.match(r"^\s*\[\[\s*stages\s*\]\]", line):
                    count += 1
                    if count == parts[1]:
                        start = number + 1
                        break
            else:
                return None
            parts = parts[2:]
        elif parts:
            # a table header [a] or [a.b] for the longest prefix of the path
            for depth in range(len(parts), 0, -1):
                name = ".".join(str(p) for p in parts[:depth])
                found = next((n for n, line in enumerate(self.lines)
                              if (m := header.match(line)) and m.group(1) == name), None)
                if found is not None:
                    start, parts = found + 1, parts[depth:]
                    if not parts:
                        return found + 1
                    break
        for number in range(start, end):
            line = self.lines[number]
            if number > start and header.match(line) and parts:
                break
            if parts and re.match(rf"^\s*\"?{re.escape(str(parts[0]))}\"?\s*=", line):
                return number + 1
        return start if start else None


def json_schema(plugins) -> dict:
    """JSON Schema of recipes for the installed plugins (each stage is one of the methods)."""
    schema = RecipeFile.model_json_schema()
    variants = []
    for name, method in sorted(plugins.methods.items()):
        option_schema = method.options.model_json_schema()
        properties = {"method": {"const": name, "description": method.summary}, **option_schema.get("properties", {})}
        variant = {"type": "object", "title": name, "properties": properties, "required": ["method"],
                   "additionalProperties": False}
        if "$defs" in option_schema:
            schema.setdefault("$defs", {}).update(option_schema["$defs"])
        variants.append(variant)
    schema["properties"]["stages"] = {"type": "array", "items": {"oneOf": variants} if variants else {"type": "object"}}
    schema["properties"]["export"] = {"type": "object", "properties": {
        "format": {"enum": sorted(plugins.exporters)}, "path": {"type": "string"}}}
    evaluate = schema.get("$defs", {}).get("EvaluateSection", {})
    evaluate.setdefault("properties", {})["metrics"] = {"type": "array", "items": {"enum": sorted(plugins.evaluators)}}
    schema["title"] = RECIPE_SCHEMA_TITLE
    return json.loads(json.dumps(schema, default=str))
