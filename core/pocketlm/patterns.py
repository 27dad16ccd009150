"""Module-name patterns, as recipes write them in ``targets`` and ``ignore`` (no torch here: option
validators and plan hooks use them)."""

from __future__ import annotations

import fnmatch
from typing import Iterable


def matches(name: str, patterns: Iterable[str]) -> bool:
    """True when ``name`` matches any glob pattern, or a pattern names one of its parents
    or its last components (``"lm_head"`` matches ``"lm_head"``; ``"*.q_proj"`` and
    ``"q_proj"`` match ``"model.layers.0.self_attn.q_proj"``)."""
    for pattern in patterns:
        if fnmatch.fnmatchcase(name, pattern) or name == pattern or name.endswith("." + pattern):
            return True
        if name.startswith(pattern + "."):
            return True
    return False
