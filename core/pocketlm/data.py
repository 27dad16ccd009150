"""Text for calibration and evaluation: reading, tokenizing, cutting into windows.

The protocol is the one of the project's benchmark: the whole text is read as UTF-8 with
universal newlines, tokenized once without special tokens, and cut into non-overlapping
windows. Calibration samples windows with ``random.Random(seed).sample``; evaluation takes the
first windows in order.
"""

from __future__ import annotations

import hashlib
import random
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import PocketError

if TYPE_CHECKING:  # torch is imported where tokens are made, so validating a recipe stays fast
    import torch

BUILTIN_PREFIX = "builtin:"
BUILTIN_TEXTS = {
    "wikitext-2-test": "wikitext-2-raw-test.txt",
    "wikitext-2-valid": "wikitext-2-valid.txt",
}
DEFAULT_CALIBRATION_TEXT = "builtin:wikitext-2-valid"
DEFAULT_EVALUATION_TEXT = "builtin:wikitext-2-test"


def resolve_text(text: str, base: Path | None = None) -> Path:
    """The file a recipe's text reference points to: ``builtin:NAME`` or a path (relative paths
    are taken from ``base``, the recipe's folder)."""
    if text.startswith(BUILTIN_PREFIX):
        name = text[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_TEXTS:
            raise PocketError(f"unknown built-in text {text!r}",
                              fix="use one of " + ", ".join(BUILTIN_PREFIX + k for k in BUILTIN_TEXTS))
        return Path(str(resources.files("pocketlm") / "data" / BUILTIN_TEXTS[name]))
    path = Path(text).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    return path


def read_text(path: Path) -> str:
    with open(path, encoding="utf-8", newline=None) as handle:  # universal newlines: CRLF -> \n
        return handle.read()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_TOKEN_CACHE: dict[tuple, torch.Tensor] = {}


def tokenize(tokenizer, path: Path) -> torch.Tensor:
    """All tokens of the text at ``path`` as a 1-D tensor (cached per file and tokenizer)."""
    key = (str(path), path.stat().st_mtime_ns, getattr(tokenizer, "name_or_path", id(tokenizer)), len(tokenizer))
    if key not in _TOKEN_CACHE:
        import torch

        ids = tokenizer(read_text(path), add_special_tokens=False, return_attention_mask=False)["input_ids"]
        _TOKEN_CACHE[key] = torch.tensor(ids, dtype=torch.long)
    return _TOKEN_CACHE[key]


def windows(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows of ``seq_len`` tokens, ``[n, seq_len]`` (the tail is dropped)."""
    n = tokens.numel() // seq_len
    return tokens[: n * seq_len].view(n, seq_len)


def sample_windows(all_windows: torch.Tensor, samples: int, seed: int) -> torch.Tensor:
    """``samples`` windows picked with ``random.Random(seed).sample`` over the window indices."""
    if samples > all_windows.shape[0]:
        raise PocketError(f"asked for {samples} windows but the text holds only {all_windows.shape[0]}",
                          fix="lower samples or seq_len, or use a longer text")
    picked = random.Random(seed).sample(range(all_windows.shape[0]), samples)
    return all_windows[picked]


def calibration_windows(tokenizer, path: Path, samples: int, seq_len: int, seed: int,
                        around: tuple[int, int] | None = None) -> torch.Tensor:
    """``samples`` windows of ``seq_len`` tokens; with ``around = (first, last)`` each holds
    ``seq_len - 2`` tokens of text between those two ids (an encoder's ``[CLS]`` and ``[SEP]``)."""
    if around is None:
        return sample_windows(windows(tokenize(tokenizer, path), seq_len), samples, seed)
    import torch

    inner = sample_windows(windows(tokenize(tokenizer, path), seq_len - 2), samples, seed)
    first, last = (torch.full((inner.shape[0], 1), token, dtype=inner.dtype) for token in around)
    return torch.cat([first, inner, last], dim=1)


def generate_windows(model, count: int, seq_len: int, vocabulary: int, seed: int, batch: int = 16,
                     temperature: float = 1.0) -> torch.Tensor:
    """``[count, seq_len]`` token windows written by ``model`` itself, text that needs no dataset:
    each starts from a token drawn uniformly from ``range(vocabulary)`` and goes on by sampling
    the model's own next-token distribution at ``temperature`` (no top-k, no top-p), seeded. At 1
    the text follows the model's distribution exactly; a small model's samples then wander, and
    below 1 they stay on topic. The model must be a causal LM with transformers' ``generate``."""
    import torch

    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)   # generate() samples from the global generator
    found = []
    with torch.no_grad():
        for first in range(0, count, batch):
            size = min(batch, count - first)
            start = torch.randint(0, vocabulary, (size, 1), generator=generator).to(device)
            found.append(model.generate(input_ids=start, attention_mask=torch.ones_like(start), do_sample=True,
                                        temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=seq_len - 1,
                                        min_new_tokens=seq_len - 1, pad_token_id=0).cpu())
    return torch.cat(found)[:, :seq_len]


def evaluation_windows(tokenizer, path: Path, count: int, seq_len: int) -> torch.Tensor:
    all_windows = windows(tokenize(tokenizer, path), seq_len)
    return all_windows[:count]
