"""pytest plugin: fixtures for tiny models (loaded automatically when pocketlm is installed,
through the ``pytest11`` entry point).

* ``tiny_family``: parametrizes a test over the four tiny architectures (llama, qwen2, gpt2, opt);
* ``tiny_model_factory``: ``tiny_model_factory(family="llama", seed=0, **sizes)`` builds a tiny
  random model (each call a fresh one);
* ``calibration_windows``: calibration token windows ``[4, 16]`` (the conformance kit's size);
* ``pocketlm_context``: a :class:`pocketlm.Context` over ``calibration_windows`` for calling a
  method's ``compress`` directly.

The conformance checks themselves live in :mod:`pocketlm.testing.conformance`.
"""

from __future__ import annotations

import pytest


@pytest.fixture(params=["llama", "qwen2", "gpt2", "opt"])
def tiny_family(request) -> str:
    return request.param


@pytest.fixture
def tiny_model_factory():
    from .models import tiny_model

    def build(family: str = "llama", *, seed: int = 0, **sizes):
        return tiny_model(family, seed=seed, **sizes)

    return build


@pytest.fixture
def calibration_windows():
    from .conformance import SEQ_LEN, WINDOWS
    from .models import tiny_windows

    return tiny_windows(WINDOWS, SEQ_LEN)


@pytest.fixture
def pocketlm_context(calibration_windows, tmp_path):
    from . import make_context

    return make_context(calibration_windows, stage_dir=tmp_path / "stage")
