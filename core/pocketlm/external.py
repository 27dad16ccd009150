"""Workers in another Python environment: find its interpreter, run a worker script there with a
JSON request, read its JSON reply.

A plugin that drives a library it cannot depend on (one that pins other versions of the packages
pocketlm uses) ships a stand-alone worker script and runs it in that library's own environment.
The user names the environment's interpreter in an option or an environment variable;
:func:`find_python` checks it and says how to set it when it is missing, and :func:`run_worker`
starts the worker.

The worker's side of the protocol needs only the standard library (it must not import pocketlm,
which the other environment lacks)::

    import json, sys

    request = json.load(sys.stdin)            # what the plugin sent
    ...                                       # the work
    with open(sys.argv[1], "w") as handle:    # the reply, as a JSON object
        json.dump({"seconds": 1.5}, handle)

Its stdout and stderr are captured; when it exits non-zero, the error shows the end of stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from .errors import PocketError

#: How much of a failed worker's stderr the error shows (the end of it, where the traceback is).
STDERR_TAIL = 2000


def _module_found(python: str, module: str) -> bool:
    # find_spec, not import: importing a large library takes seconds; the worker imports it
    probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    try:
        return subprocess.run([python, "-c", probe], capture_output=True, text=True).returncode == 0
    except OSError:
        return False


def find_python(variable: str, *, given: str | None = None, option: str | None = None, needs: str | None = None,
                install: str | None = None, what: str = "this", field: str | None = None) -> str:
    """The interpreter of the external environment: ``given`` (the value of a method option
    called ``option``) if set, else the environment variable ``variable``. With ``needs``, the
    module that must be importable there. Raises a :class:`PocketError` naming the variable (and
    the option) and how to set it when none is set, the path does not exist, or ``needs`` is
    missing; ``install`` is the pip requirement shown in the fix, ``field`` the recipe field the
    error points at (default: ``option``)."""
    source = f"option {option}" if given and option else f"${variable}"
    python = given or os.environ.get(variable) or ""
    install = install or needs or "the package"
    field = field or option
    setup = (f"make its own environment (`python -m venv VENV && VENV/bin/pip install {install}`) and set "
             f"{variable}=VENV/bin/python" + (f" (or the option {option})" if option else ""))
    if not python:
        raise PocketError(f"{what} runs in a separate Python environment{f' with {needs}' if needs else ''}, "
                          f"named by ${variable}{f' or the option {option}' if option else ''}, which is not set",
                          field=field, fix=setup)
    if not Path(python).is_file():
        raise PocketError(f"{what}: the Python interpreter {python} ({source}) does not exist",
                          field=field, fix=setup)
    if needs and not _module_found(python, needs):
        raise PocketError(f"{what}: {needs} is not installed in the environment of {python} ({source})",
                          field=field, fix=f"install it there (`{Path(python).parent}/pip install {install}`), "
                          f"or {setup}")
    return python


def run_worker(python: str, script: str | Path, request: dict[str, Any], *, what: str = "the worker",
               fix: str | None = None, timeout: float | None = None, env: dict[str, str] | None = None) -> dict:
    """Run ``python script REPLY`` with ``request`` as JSON on its stdin; returns the JSON object
    the worker wrote to the file ``REPLY``. A worker that exits non-zero, times out or writes no
    reply is a :class:`PocketError` (exit code 1) showing the end of its stderr; ``fix`` is its
    fix line."""
    with tempfile.TemporaryDirectory(prefix="pocketlm-worker-") as scratch:
        reply = Path(scratch) / "reply.json"
        try:
            done = subprocess.run([python, str(script), str(reply)], input=json.dumps(request), capture_output=True,
                                  text=True, timeout=timeout, env=None if env is None else {**os.environ, **env})
        except subprocess.TimeoutExpired as exc:
            raise PocketError(f"{what} did not finish in {timeout:g} s{_tail(exc.stderr)}", exit_code=1,
                              fix=fix) from None
        if done.returncode != 0:
            raise PocketError(f"{what} failed (exit {done.returncode}){_tail(done.stderr)}", exit_code=1, fix=fix)
        try:
            answer = json.loads(reply.read_text())
        except (OSError, ValueError) as exc:
            raise PocketError(f"{what} exited without writing a JSON reply to the file named by its first argument "
                              f"({type(exc).__name__}){_tail(done.stderr)}", exit_code=1, fix=fix) from None
    if not isinstance(answer, dict):
        raise PocketError(f"{what} replied {type(answer).__name__}, not a JSON object", exit_code=1, fix=fix)
    return answer


def _tail(stderr: str | bytes | None) -> str:
    if isinstance(stderr, bytes):
        stderr = stderr.decode(errors="replace")
    text = (stderr or "").strip()
    if not text:
        return ""
    return ":\n" + ("..." + text[-STDERR_TAIL:] if len(text) > STDERR_TAIL else text)


__all__ = ["STDERR_TAIL", "find_python", "run_worker"]
