"""pytest plugin: fixtures for tiny models (loaded automatically when pocketlm is installed)."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["llama", "qwen2", "gpt2", "opt"])
def tiny_family(request) -> str:
    return request.param
