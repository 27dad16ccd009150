"""Progress per layer with the time left on a terminal; nothing in logs (a pipe or a file)."""

import io

from rich.console import Console

from pocketlm import cli


def _record(monkeypatch, terminal: bool) -> str:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=terminal, width=120)
    monkeypatch.setattr(cli, "console", console)
    with cli.RichProgress().task("calibrating", 4) as advance:
        for _ in range(4):
            advance(1, loss=0.25)
    return buffer.getvalue()


def test_a_terminal_shows_steps_elapsed_and_time_left(monkeypatch):
    output = _record(monkeypatch, terminal=True)
    assert "calibrating" in output and "4/4" in output and "left" in output and "loss=0.25" in output


def test_logs_stay_plain(monkeypatch):
    assert _record(monkeypatch, terminal=False) == ""
