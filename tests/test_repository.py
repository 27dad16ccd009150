"""The repository describes the project and its measurements only: no work sessions, no
absolute paths of the machine that ran something, no files outside the repository, raw result
files named by what they measure, and every file a document names is in the repository."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
THIS = "tests/test_repository.py"
DATA = ("core/pocketlm/data/",)  # third-party text (WikiText-2), not ours to word
BINARY = {".png", ".jpg", ".gguf", ".safetensors", ".whl", ".pdf"}


def _committed() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return [p for p in out.stdout.split("\0") if p]


def _text_files() -> list[tuple[str, str]]:
    files = []
    for name in _committed():
        if name == THIS or name.startswith(DATA) or Path(name).suffix in BINARY:
            continue
        path = ROOT / name
        if not path.is_file():
            continue
        try:
            files.append((name, path.read_text(encoding="utf-8")))
        except UnicodeDecodeError:
            continue
    return files


RULES = {
    "an absolute path of a machine": re.compile(r"(?<![\w.~])/(?:work|root|home|Users)/"),
    "an interpreter under an absolute path": re.compile(r"(?<![\w.~])/(?:[\w.+-]+/)+bin/python"),
    "a file outside the repository": re.compile(r"\.\./shared|shared/BENCHMARK|shared/PEERS"),
    "a work session": re.compile(r"\bsessions?\b", re.IGNORECASE),
}
# pytest's own vocabulary is not a work session; a test's deliberately missing path is no machine's
ALLOWED = {"a work session": re.compile(r'scope="session"|pytest session'),
           "an interpreter under an absolute path": re.compile(r"/nonexistent/")}


def test_committed_text_names_no_session_machine_path_or_outside_file():
    offenders = []
    for name, text in _text_files():
        for number, line in enumerate(text.splitlines(), 1):
            for what, rule in RULES.items():
                if rule.search(line) and not (what in ALLOWED and ALLOWED[what].search(line)):
                    offenders.append(f"{name}:{number}: {what}: {line.strip()[:120]}")
    assert not offenders, "\n".join(offenders)


WHEN_NAMED = re.compile(r"(?:^|[-_.])(?:s\d+[a-z]?|session\d*|run\d+|day\d+)(?=[-_.]|$)", re.IGNORECASE)


def test_raw_result_files_are_named_by_what_they_measure():
    results = [n for n in _committed() if n.startswith(("docs/", "benchmarks/")) and Path(n).suffix in {".jsonl", ".json", ".csv"}]
    assert results  # the check looks at something
    offenders = [n for n in results if WHEN_NAMED.search(Path(n).stem)]
    assert not offenders, offenders


# paths from the repository root (a plugin's own tests/ are named relative to the plugin, so not here)
REFERENCE = re.compile(r"(?<![\w./-])((?:benchmarks|docs|core|plugins|\.ci)/[\w./-]*[\w/])")
FILE_KINDS = {".py", ".md", ".toml", ".jsonl", ".json", ".png", ".sh", ".txt", ".yaml", ".yml", ""}
NOT_VERSIONED = ("benchmarks/results", "benchmarks/.venvs", "runs/")


def test_every_file_the_documents_name_is_in_the_repository():
    committed = set(_committed())
    folders = {str(Path(n).parent) for n in committed} | {str(p) for n in committed for p in Path(n).parents}
    missing = []
    for name, text in _text_files():
        if not name.endswith(".md"):
            continue
        for match in REFERENCE.finditer(text):
            target = match.group(1).rstrip(".")
            if target.startswith(NOT_VERSIONED) or Path(target).suffix not in FILE_KINDS:
                continue
            relative = str((Path(name).parent / target)) if name.startswith("plugins/") else target
            if target not in committed and target.rstrip("/") not in folders and relative not in committed:
                missing.append(f"{name}: {target}")
    assert not missing, "\n".join(missing)
