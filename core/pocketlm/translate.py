"""Recipes of other tools turned into pocketlm recipes (``pocketlm import-recipe``).

llm-compressor, and SparseML before it, keep a recipe as YAML: stages that hold groups of
modifiers, each a class name with its arguments::

    quant_stage:
      quant_modifiers:
        GPTQModifier: {scheme: W4A16, ignore: [lm_head]}

The core reads the file and keeps each modifier with its line. It hands each one to the
translator that a plugin registered for the class name (``register_translators``), so the core
knows no modifier itself. A modifier that no installed plugin translates is refused by name, and
so is an argument a translator has no counterpart for; nothing is dropped silently.

What translators share lives here too: :class:`Arguments` (take what maps, say what is ignored,
refuse the rest) and the reading of the quantization vocabulary that llm-compressor and
compressed-tensors use (``scheme``, ``config_groups``, ``targets``, ``ignore``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import PocketError

#: Modifier arguments every llm-compressor modifier inherits; in a one-shot recipe they schedule
#: nothing, so a translator may ignore them (``Arguments.ignore_schedule``).
SCHEDULE_ARGUMENTS = ("index", "group", "start", "end", "update")

PLACEHOLDER_SOURCE = "SET-YOUR-MODEL"


@dataclass(frozen=True)
class Modifier:
    """One modifier of a foreign recipe: its class name, its arguments as written, the stage that
    holds it and its line in the file."""

    name: str
    arguments: dict
    stage: str
    line: int


class Untranslatable(Exception):
    """Raised by a translator: the modifier (or one of its arguments) has no pocketlm counterpart.
    ``reason`` says why; ``fix`` what the user can write instead."""

    def __init__(self, reason: str, fix: str | None = None):
        super().__init__(reason)
        self.reason, self.fix = reason, fix


@dataclass(frozen=True)
class Translation:
    """What a translator returns for one modifier.

    ``stages``: pocketlm stage tables in order (``{"method": NAME, "bits": 4, ...}``; may be
    empty when the modifier needs no stage). ``notes``: what the user should know (an argument
    that has no effect here, a default that differs). ``absorbs``: later modifiers of the same
    stage this translation covers (a smoothing modifier may take the quantizing one after it).
    ``export``: the export format a recipe like this one writes, if the translator knows one."""

    stages: tuple[dict, ...] = ()
    notes: tuple[str, ...] = ()
    absorbs: tuple[Modifier, ...] = ()
    export: str | None = None


@dataclass
class Arguments:
    """A modifier's arguments, consumed as they are translated: ``take`` what maps, ``ignore``
    what has no effect in pocketlm (noted), and ``finish`` refuses whatever is left."""

    modifier: Modifier
    left: dict = field(init=False)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.left = dict(self.modifier.arguments)

    def take(self, key: str, default: Any = None) -> Any:
        return self.left.pop(key, default)

    def ignore(self, key: str, why: str) -> None:
        if key in self.left:
            value = self.left.pop(key)
            self.notes.append(f"{self.modifier.name}.{key} = {value!r} is not carried over: {why}")

    def ignore_schedule(self) -> None:
        """Drop the scheduling arguments of a one-shot modifier; a schedule (training epochs) is refused."""
        for key in SCHEDULE_ARGUMENTS:
            value = self.left.pop(key, None)
            if key in ("start", "end") and value not in (None, -1, 0, 0.0, -1.0):
                raise Untranslatable(f"{key} = {value!r} schedules it during training; pocketlm runs it once",
                                     fix=f"remove {key} (one-shot), or train with a distill stage after it")

    def finish(self, counterpart: str) -> tuple[str, ...]:
        if self.left:
            names = ", ".join(sorted(self.left))
            raise Untranslatable(f"{'argument' if len(self.left) == 1 else 'arguments'} {names} "
                                 f"{'has' if len(self.left) == 1 else 'have'} no counterpart in {counterpart}",
                                 fix=f"remove {names} from the recipe, or set the {counterpart} options by hand")
        return tuple(self.notes)


# --------------------------------------------------------------------------- module patterns


def module_patterns(patterns, what: str) -> list[str]:
    """pocketlm module-name globs for llm-compressor ``targets``/``ignore`` entries: a plain name
    stays as it is, ``Linear`` is every linear (``*``), and a ``re:`` regular expression becomes
    globs when it is a literal name, possibly after ``.*`` and with one ``(a|b)`` alternation."""
    if isinstance(patterns, str):
        patterns = [patterns]
    globs: list[str] = []
    for pattern in patterns or []:
        if not isinstance(pattern, str):
            raise Untranslatable(f"{what} holds {pattern!r}, not a module name")
        if pattern == "Linear":
            globs.append("*")
        elif pattern.startswith("re:"):
            globs += _regex_globs(pattern, what)
        elif pattern[:1].isupper() and "." not in pattern:
            raise Untranslatable(f"{what} names the module class {pattern!r}; pocketlm's quantizers and "
                                 "pruners work on linear layers", fix=f"replace {pattern!r} with module-name patterns")
        else:
            globs.append(pattern)
    return list(dict.fromkeys(globs))


def _regex_globs(pattern: str, what: str) -> list[str]:
    body = pattern[3:]
    anywhere = body.startswith(".*")
    body = body[2:] if anywhere else body.lstrip("^")
    body = body[:-1] if body.endswith("$") else body
    alternatives = [body]
    group = re.fullmatch(r"(.*?)\(([\w|]+)\)(.*)", body)
    if group:
        alternatives = [group[1] + choice + group[3] for choice in group[2].split("|")]
    globs = []
    for text in alternatives:
        # a layer index (\d+, \d*, [0-9]+) and ".*" become the glob's *; an unescaped "." is
        # taken as the separator it almost always stands for; anything else is refused
        marked = re.sub(r"\\d[+*]|\[0-9\][+*]", "\0", text).replace("\\.", ".").replace(".*", "\0")
        literal = marked.replace("\0", "*")
        if not re.fullmatch(r"[\w.\0]+", marked):
            raise Untranslatable(f"{what} pattern {pattern!r} is a regular expression that pocketlm's module-name "
                                 "patterns cannot express", fix="write it as glob patterns, such as '*.q_proj'")
        globs += [f"*{literal}", f"*{literal}.*"] if anywhere else [literal]
    return globs


# --------------------------------------------------------------------------- quantization schemes

# compressed-tensors' preset schemes that quantize integer weights only: (bits, group size, symmetric)
WEIGHT_PRESETS = {f"W{bits}A16": (bits, 128, True) for bits in (2, 3, 4, 5, 6, 7, 8)}
WEIGHT_PRESETS["W4A16_ASYM"] = (4, 128, False)


def quantization_schemes(arguments: Arguments) -> list[dict]:
    """The weight schemes of an llm-compressor quantization modifier (``scheme`` or
    ``config_groups``, with ``targets`` and ``ignore``) as pocketlm quantizer options: one dict
    per scheme with ``bits``, ``group_size``, ``symmetric``, ``targets`` and ``ignore`` (and
    ``actorder`` as written, for a method that has it). Activation and float schemes are refused."""
    scheme, groups = arguments.take("scheme"), arguments.take("config_groups")
    targets = module_patterns(arguments.take("targets", ["Linear"]), "targets")
    ignore = module_patterns(arguments.take("ignore", []), "ignore")
    kv_cache = arguments.take("kv_cache_scheme")
    if kv_cache is not None:
        raise Untranslatable("kv_cache_scheme quantizes the attention cache at run time; pocketlm quantizes weights",
                             fix="remove kv_cache_scheme")
    for key in ("weight_observer", "observer"):
        observer = arguments.take(key)
        if observer not in (None, "minmax", "memoryless_minmax", {}):
            raise Untranslatable(f"{key} = {observer!r}: pocketlm's grids are min-max, or a registered grid rule",
                                 fix=f"remove {key}, then pick a `grid` rule in the stage by hand")
    for key in ("input_observer", "output_observer"):
        arguments.ignore(key, "activations are not quantized")
    arguments.ignore("bypass_divisibility_checks", "pocketlm's `allow_partial_group` option decides this")
    found: list[tuple[dict, list[str]]] = []
    if isinstance(scheme, str):
        found.append((_preset(scheme), targets))
    elif isinstance(scheme, dict):  # {"W4A16": ["Linear"], ...}
        found += [(_preset(name), module_patterns(group_targets, f"scheme.{name}")) for name, group_targets in scheme.items()]
    elif scheme is not None:
        raise Untranslatable(f"scheme = {scheme!r} is neither a preset name nor a table of presets")
    for name, group in (groups or {}).items():
        if not isinstance(group, dict):
            raise Untranslatable(f"config_groups.{name} is not a table")
        found.append((_weight_args(group, f"config_groups.{name}"),
                      module_patterns(group.get("targets", ["Linear"]), f"config_groups.{name}.targets")))
    if not found:
        raise Untranslatable("it names no quantization scheme", fix="add scheme = \"W4A16\" or config_groups")
    return [_pocketlm_scheme(weights, group_targets, ignore, arguments) for weights, group_targets in found]


def _preset(name: str) -> dict:
    if name not in WEIGHT_PRESETS:
        raise Untranslatable(f"scheme {name!r} quantizes activations or uses float formats; pocketlm quantizes "
                             "integer weights only", fix="use a weight-only scheme: " + ", ".join(sorted(WEIGHT_PRESETS)))
    bits, group_size, symmetric = WEIGHT_PRESETS[name]
    return {"num_bits": bits, "type": "int", "strategy": "group", "group_size": group_size, "symmetric": symmetric}


def _weight_args(group: dict, where: str) -> dict:
    unknown = set(group) - {"weights", "targets", "input_activations", "output_activations", "format"}
    if unknown:
        raise Untranslatable(f"{where} holds {', '.join(sorted(unknown))}, which pocketlm does not read")
    for key in ("input_activations", "output_activations"):
        if group.get(key) is not None:
            raise Untranslatable(f"{where}.{key} quantizes activations; pocketlm quantizes weights only",
                                 fix=f"set {key}: null, for a weight-only scheme such as W4A16")
    weights = group.get("weights")
    if not isinstance(weights, dict):
        raise Untranslatable(f"{where} has no weights table")
    return weights


def _pocketlm_scheme(weights: dict, targets: list[str], ignore: list[str], arguments: Arguments) -> dict:
    kind, strategy = weights.get("type", "int"), weights.get("strategy", "tensor")
    if kind != "int":
        raise Untranslatable(f"weights of type {kind!r}; pocketlm's grids are integers", fix="use type: int")
    if weights.get("dynamic"):
        raise Untranslatable("dynamic weight quantization has no stored grid")
    if strategy not in ("group", "channel"):
        raise Untranslatable(f"strategy {strategy!r} has no pocketlm grid (it has per-channel and per-group)",
                             fix="use strategy: channel, or strategy: group with a group_size")
    extra = set(weights) - {"num_bits", "type", "strategy", "group_size", "symmetric", "dynamic", "actorder",
                            "observer", "block_structure"}
    if extra:
        raise Untranslatable(f"weights.{', weights.'.join(sorted(extra))} have no pocketlm counterpart")
    if weights.get("observer") not in (None, "minmax", "memoryless_minmax"):
        raise Untranslatable(f"weights.observer = {weights['observer']!r}: pocketlm's grids are min-max, or a "
                             "registered grid rule", fix="remove the observer, then pick a `grid` rule by hand")
    head = "lm_head" in targets or ("*" in targets and "lm_head" not in ignore)
    if head:
        arguments.notes.append(f"{arguments.modifier.name} quantizes lm_head, as llm-compressor does when "
                               "`Linear` is targeted and lm_head not ignored; add it to ignore to keep the head in float")
    scheme = {
        "bits": int(weights.get("num_bits", 8)),
        "group_size": int(weights.get("group_size") or -1) if strategy == "group" else -1,
        "symmetric": bool(weights.get("symmetric", True)),
        "targets": targets + (["lm_head"] if head and "lm_head" not in targets else []),
        "ignore": ["embed"] + [p for p in ignore if p != "lm_head"] + ([] if head else ["lm_head"]),
    }
    if "actorder" in weights:
        scheme["actorder"] = weights["actorder"]
    return scheme


# --------------------------------------------------------------------------- reading the file


class _Tagged(dict):
    """A SparseML 1.x ``!NameModifier`` item."""


class _Lines(dict):
    lines: dict


def _foreign_loader():
    from .recipe import _UniqueKeyLoader

    class Loader(_UniqueKeyLoader):
        def construct_yaml_map(self, node):
            data = _Lines()
            yield data
            data.update(self.construct_mapping(node))
            data.lines = {self.construct_object(k): k.start_mark.line + 1 for k, _ in node.value}

    def tagged(loader, suffix, node):
        value = loader.construct_mapping(node, deep=True) if isinstance(node, yaml.MappingNode) else {}
        item = _Tagged(value)
        item.name, item.line = suffix, node.start_mark.line + 1
        return item

    Loader.add_constructor("tag:yaml.org,2002:map", Loader.construct_yaml_map)
    Loader.add_multi_constructor("!", tagged)
    return Loader


def read_modifiers(path: Path) -> tuple[list[Modifier], list[str]]:
    """The modifiers of the recipe at ``path`` in order, and notes on what was not a modifier."""
    from .recipe import load_yaml

    file = str(path)
    if not path.is_file():
        raise PocketError(f"{file} does not exist", field="RECIPE", fix="give the path of an llm-compressor recipe YAML")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PocketError("the recipe is not UTF-8 text", file=file, fix="save it as UTF-8") from None
    data = load_yaml(text, file, _foreign_loader(), syntax_fix="fix the YAML syntax")
    if not isinstance(data, dict) or not data:
        raise PocketError("the recipe holds no stages", file=file,
                          fix="an llm-compressor recipe is a table of stages holding modifier groups")
    modifiers: list[Modifier] = []
    notes: list[str] = []
    for key, value in data.items():
        line = data.lines.get(key)
        if key.endswith("modifiers"):  # a group at the top level: one unnamed stage
            modifiers += _group(value, "(top level)", file, line)
        elif isinstance(value, dict):
            for group, items in value.items():
                if str(group).endswith("modifiers"):
                    modifiers += _group(items, key, file, value.lines.get(group))
                else:
                    notes.append(f"{key}.{group} (line {value.lines.get(group)}) is not a modifier group and is "
                                 "not carried over")
        else:
            notes.append(f"{key} (line {line}) is not a stage and is not carried over")
    if not modifiers:
        raise PocketError("the recipe holds no modifiers", file=file,
                          fix="stages hold groups whose names end in `modifiers`, such as quant_modifiers")
    return modifiers, notes


def _group(items, stage: str, file: str, line: int | None) -> list[Modifier]:
    if isinstance(items, list):  # SparseML 1.x: a list of !Tagged modifiers
        found = []
        for item in items:
            if not isinstance(item, _Tagged):
                raise PocketError("a modifier list holds an item without a !Modifier tag", file=file, line=line)
            found.append(Modifier(item.name, dict(item), stage, item.line))
        return found
    if not isinstance(items, dict):
        raise PocketError(f"the modifier group of {stage} is not a table of modifiers", file=file, line=line)
    found = []
    for name, arguments in items.items():
        if arguments is not None and not isinstance(arguments, dict):
            raise PocketError(f"{name}'s arguments are not a table", file=file, line=items.lines.get(name),
                              fix=f"write {name}: followed by its arguments, one per line")
        found.append(Modifier(str(name), dict(arguments or {}), stage, items.lines.get(name)))
    return found


# --------------------------------------------------------------------------- translating


@dataclass
class ImportedRecipe:
    """A translated recipe: the pocketlm recipe as data, and what the user should know."""

    recipe: dict
    notes: list[str]
    mapping: list[tuple[Modifier, list[str]]]  # each modifier and the methods of the stages it became

    def toml(self, source_file: str) -> str:
        from .card import to_toml

        header = [f"# pocketlm recipe translated by `pocketlm import-recipe` from {source_file}"]
        for modifier, methods in self.mapping:
            where = f"{modifier.stage}: {modifier.name} (line {modifier.line})"
            header.append(f"#   {where} -> {', '.join(methods) if methods else 'no stage'}")
        header += [f"# note: {note}" for note in self.notes]
        if self.recipe["model"]["source"] == PLACEHOLDER_SOURCE:
            header.append("# set [model] source to your model (a folder, a Hub id or a demo: name), then run "
                          "`pocketlm validate` on this file")
        return "\n".join(header) + "\n\n" + to_toml(self.recipe)


def translate_recipe(path: Path, plugins, model: str | None = None) -> ImportedRecipe:
    """Translate the llm-compressor (or SparseML) recipe at ``path`` with the installed
    translators. Every refused modifier is listed in one error naming the file and its line."""
    path = Path(path)
    modifiers, notes = read_modifiers(path)
    stages: list[dict] = []
    mapping: list[tuple[Modifier, list[str]]] = []
    refusals: list[PocketError] = []
    absorbed: set[int] = set()
    exports: list[str] = []
    for index, modifier in enumerate(modifiers):
        if index in absorbed:
            continue
        siblings = [m for i, m in enumerate(modifiers) if i > index and m.stage == modifier.stage and i not in absorbed]
        try:
            translation = _translate(modifier, siblings, plugins)
        except Untranslatable as refusal:
            refusals.append(PocketError(f"{modifier.name}: {refusal.reason}", file=str(path), line=modifier.line,
                                        fix=refusal.fix or f"remove {modifier.name} and add its pocketlm counterpart "
                                        "by hand, if there is one"))
            continue
        for other in translation.absorbs:
            absorbed.add(modifiers.index(other))
            notes.append(f"{other.name} (line {other.line}) is covered by the stage {modifier.name} became")
        stages += [dict(s) for s in translation.stages]
        mapping.append((modifier, [s["method"] for s in translation.stages]))
        notes += translation.notes
        exports += [translation.export] if translation.export else []
    if refusals:
        first, rest = refusals[0], refusals[1:]
        if rest:  # every refusal with its own fix; the CLI prints the first "error:" itself
            first.message += f"\n  fix: {first.fix}" + "".join(f"\nerror: {r}" for r in rest)
            first.fix = None
            first.args = (first.message,)
        raise first
    if not stages:
        raise PocketError("no modifier of the recipe becomes a pocketlm stage", file=str(path),
                          fix="pocketlm recipes need at least one compression stage")
    recipe = {"model": {"source": model or PLACEHOLDER_SOURCE}, "stages": stages,
              "export": {"format": exports[-1] if exports else "auto", "path": "export"}}
    return ImportedRecipe(recipe, list(dict.fromkeys(notes)), mapping)


def _translate(modifier: Modifier, siblings: list[Modifier], plugins) -> Translation:
    translator = plugins.translators.get(modifier.name)
    if translator is None:
        from .registry import provider_of

        provider = provider_of("translators", modifier.name)
        if provider is not None:
            raise Untranslatable(f"the plugin that translates it, {provider.distribution}, is not installed",
                                 fix=f"{provider.install}, then run import-recipe again")
        known = ", ".join(sorted(plugins.translators)) or "none"
        raise Untranslatable(f"no installed plugin translates it (installed translators: {known})",
                             fix=f"remove {modifier.name}, or install a plugin that translates it "
                             "(`pocketlm plugins --available`)")
    try:
        translation = translator.translate(modifier, siblings)
    except (Untranslatable, PocketError):
        raise
    except Exception as exc:  # noqa: BLE001 - a broken translator is named, never a traceback
        owner = plugins.owner.get(("translators", modifier.name), "?")
        raise Untranslatable(f"plugin {owner}'s translator raised {type(exc).__name__}: {exc}",
                             fix="report it to the plugin's authors") from None
    if not isinstance(translation, Translation):
        raise Untranslatable(f"its translator returned {type(translation).__name__}, not a pocketlm Translation")
    return translation
