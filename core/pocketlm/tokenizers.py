"""A model folder's tokenizer, or one clear error saying how to supply it.

Exported checkpoints and hand-assembled folders often hold weights and a config but no
tokenizer; transformers then fails deep inside its resolver with a message that names none of
the files it looked for. Every loader reads tokenizers through :func:`load_tokenizer`.
"""

from __future__ import annotations

from pathlib import Path

from .errors import PocketError

#: Files any of which makes a folder hold a tokenizer transformers can read.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model",
                   "vocab.json", "vocab.txt")


def has_tokenizer(folder: Path) -> bool:
    """Whether ``folder`` holds one of :data:`TOKENIZER_FILES`."""
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(folder: Path | str, trust_remote_code: bool = False, field: str = "model.source"):
    """``AutoTokenizer.from_pretrained(folder)``, or a :class:`PocketError` naming the folder,
    the recipe ``field`` that pointed at it and how to add the tokenizer."""
    from transformers import AutoTokenizer

    folder = Path(folder).expanduser()
    fix = ("save the original model's tokenizer into the folder: "
           f"AutoTokenizer.from_pretrained(ORIGINAL).save_pretrained('{folder}')")
    if not has_tokenizer(folder):
        raise PocketError(f"{folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})",
                          field=field, fix=fix)
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001  (transformers raises OSError, ValueError, KeyError...)
        raise PocketError(f"cannot read the tokenizer in {folder}: {type(exc).__name__}: {str(exc)[:200]}",
                          field=field, fix=fix) from None
