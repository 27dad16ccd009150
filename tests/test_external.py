"""pocketlm.external: the interpreter of another environment is named by a variable (or an
option) and refused clearly when missing; a worker script gets its JSON request on stdin and
writes its JSON reply; a failing worker's error shows the end of its stderr."""

from __future__ import annotations

import sys

import pytest

from pocketlm import PocketError
from pocketlm.external import STDERR_TAIL, find_python, run_worker

VARIABLE = "POCKETLM_TEST_PEER_PYTHON"

ECHO = """import json, sys
request = json.load(sys.stdin)
with open(sys.argv[1], "w") as handle:
    json.dump({"echo": request, "python": sys.executable}, handle)
"""

FAILING = """import sys
print("loading the library", file=sys.stderr)
for i in range(400):
    print(f"line {i} of the traceback", file=sys.stderr)
print("ValueError: group_size 48 is not supported", file=sys.stderr)
sys.exit(3)
"""


def test_an_unset_variable_names_it_and_how_to_set_it(monkeypatch):
    monkeypatch.delenv(VARIABLE, raising=False)
    with pytest.raises(PocketError) as error:
        find_python(VARIABLE, needs="llmcompressor", install="llmcompressor==0.14.*", what='backend = "llmcompressor"',
                    field="backend")
    assert error.value.message == ('backend = "llmcompressor" runs in a separate Python environment with '
                                   "llmcompressor, named by $POCKETLM_TEST_PEER_PYTHON, which is not set")
    assert error.value.field == "backend"
    assert error.value.fix == ("make its own environment (`python -m venv VENV && VENV/bin/pip install "
                               "llmcompressor==0.14.*`) and set POCKETLM_TEST_PEER_PYTHON=VENV/bin/python")


def test_an_option_is_named_next_to_the_variable_and_wins_over_it(monkeypatch, tmp_path):
    monkeypatch.delenv(VARIABLE, raising=False)
    with pytest.raises(PocketError) as error:
        find_python(VARIABLE, option="peer_python", what="the peer")
    assert "named by $POCKETLM_TEST_PEER_PYTHON or the option peer_python, which is not set" in error.value.message
    assert error.value.field == "peer_python" and error.value.fix.endswith("(or the option peer_python)")
    monkeypatch.setenv(VARIABLE, str(tmp_path / "missing" / "python"))
    assert find_python(VARIABLE, given=sys.executable, option="peer_python") == sys.executable


def test_a_path_that_does_not_exist_is_named(monkeypatch, tmp_path):
    missing = tmp_path / "venv" / "bin" / "python"
    monkeypatch.setenv(VARIABLE, str(missing))
    with pytest.raises(PocketError) as error:
        find_python(VARIABLE, what="the peer")
    assert error.value.message == (f"the peer: the Python interpreter {missing} ($POCKETLM_TEST_PEER_PYTHON) "
                                   "does not exist")


def test_the_module_it_needs_is_looked_for_in_that_environment(monkeypatch):
    monkeypatch.setenv(VARIABLE, sys.executable)
    assert find_python(VARIABLE, needs="json") == sys.executable
    with pytest.raises(PocketError) as error:
        find_python(VARIABLE, needs="surely_no_such_module_here", what="the peer")
    assert error.value.message == (f"the peer: surely_no_such_module_here is not installed in the environment of "
                                   f"{sys.executable} ($POCKETLM_TEST_PEER_PYTHON)")


def test_a_worker_gets_the_request_and_its_reply_comes_back(tmp_path):
    worker = tmp_path / "echo_worker.py"
    worker.write_text(ECHO)
    request = {"model": "some/folder", "bits": 4, "targets": ["re:^a$", "re:^b$"], "symmetric": False}
    reply = run_worker(sys.executable, worker, request, what="the echo worker")
    assert reply == {"echo": request, "python": sys.executable}


def test_a_failing_worker_shows_its_exit_status_and_the_end_of_its_stderr(tmp_path):
    worker = tmp_path / "failing_worker.py"
    worker.write_text(FAILING)
    with pytest.raises(PocketError) as error:
        run_worker(sys.executable, worker, {}, what="the peer", fix="check the peer's environment")
    message = error.value.message
    assert message.startswith("the peer failed (exit 3):\n...")
    assert message.endswith("line 399 of the traceback\nValueError: group_size 48 is not supported")
    assert "loading the library" not in message and len(message) < STDERR_TAIL + 100
    assert error.value.exit_code == 1 and error.value.fix == "check the peer's environment"


def test_a_worker_that_writes_no_reply_is_an_error(tmp_path):
    worker = tmp_path / "silent_worker.py"
    worker.write_text("import sys\nprint('done', file=sys.stderr)\n")
    with pytest.raises(PocketError) as error:
        run_worker(sys.executable, worker, {"x": 1}, what="the peer")
    assert error.value.message == ("the peer exited without writing a JSON reply to the file named by its first "
                                   "argument (FileNotFoundError):\ndone")
