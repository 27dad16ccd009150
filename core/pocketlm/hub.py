"""Models named by their Hugging Face Hub id (``source = "org/name"``, optional ``revision``).

Resolution goes through ``huggingface_hub``: its local cache first, ``HF_HUB_OFFLINE`` honoured,
a token from the usual places (``HF_TOKEN``, ``hf auth login``). Only the files a safe load needs
are fetched: safetensors weights, JSON configs and tokenizer files (never pickle unless the
recipe allows it). The resolved commit hash goes into the run's provenance.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import PocketError

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
SAFE_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.py"]
PICKLE_FILES = ["*.bin", "*.pt", "*.pth"]


def is_hub_id(source: str) -> bool:
    """``org/name`` that is not a local path."""
    return bool(HUB_ID.match(source)) and not source.endswith(".gguf") and not Path(source).expanduser().exists()


def _offline() -> bool:
    # read at call time: huggingface_hub reads it once, at import
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _cache_dir() -> str | None:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


@dataclass(frozen=True)
class Snapshot:
    """A resolved Hub model: the local folder and the commit hash it holds."""

    repo_id: str
    folder: Path
    commit: str


def _fetch_command(repo_id: str, revision: str | None) -> str:
    return f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")


def resolve(repo_id: str, revision: str | None = None, *, allow_pickle: bool = False) -> Snapshot:
    """The local snapshot of ``repo_id`` at ``revision`` (a branch, tag or commit; default
    ``main``), downloaded into the Hub cache when online and not cached yet."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    offline = _offline()
    patterns = SAFE_FILES + (PICKLE_FILES if allow_pickle else [])
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=_cache_dir(), local_files_only=offline,
                                        allow_patterns=patterns))
    except GatedRepoError:
        raise PocketError(f"model {repo_id} is gated on the Hugging Face Hub", field="model.source", exit_code=1,
                          fix="accept its terms on huggingface.co, then log in (`hf auth login`) or set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise PocketError(f"model {repo_id} does not exist on the Hugging Face Hub (or is private)",
                          field="model.source", exit_code=1,
                          fix="check the id; for a private model log in (`hf auth login`) or set HF_TOKEN") from None
    except RevisionNotFoundError:
        raise PocketError(f"model {repo_id} has no revision {revision!r}", field="model.revision", exit_code=1,
                          fix="name a branch, tag or commit of the model") from None
    except LocalEntryNotFoundError:
        where = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached"
        raise PocketError(f"model {repo_id}" + (f" at revision {revision}" if revision else "")
                          + f" is not in the Hugging Face cache and {where}", field="model.source", exit_code=1,
                          fix=f"fetch it once while online: {_fetch_command(repo_id, revision)}"
                          + (" (then HF_HUB_OFFLINE=1 works)" if offline else "")
                          + f"; if you meant a local folder, ./{repo_id} does not exist") from None
    return Snapshot(repo_id, folder, folder.name)
