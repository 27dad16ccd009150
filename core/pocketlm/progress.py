"""Progress reporting, kept free of torch so the command line starts fast.

``Progress`` is the quiet default a :class:`pocketlm.Context` carries; the command line swaps in
:class:`pocketlm.cli.RichProgress` (a bar with the time left on a terminal, nothing in logs).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator


class Progress:
    """A progress reporter; the CLI swaps in a rich progress bar."""

    @contextlib.contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Callable[..., None]]:
        """``with progress.task("layers", 30) as advance: advance(1, loss=0.3)``"""
        yield lambda steps=1, **fields: None
