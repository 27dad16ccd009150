"""pocketlm.testing's digests pinned per float platform: a recorded platform must give its
digest, another passes on any recorded digest and otherwise skips with a reason."""

from __future__ import annotations

import pytest
import torch

from pocketlm.testing import assert_pinned, digest, float_platform


def test_float_platform_names_torch_threads_and_products():
    here = float_platform()
    assert here.startswith(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), products ")
    assert float_platform() == here  # the same machine rounds the same way every time


def test_float_platform_changes_with_the_thread_count():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = float_platform()
        torch.set_num_threads(2)
        assert float_platform() != one
    finally:
        torch.set_num_threads(threads)


def test_a_recorded_platform_must_give_its_digest():
    value = digest([torch.arange(6.0)])
    assert_pinned(value, {float_platform(): value, "another machine": "0" * 16})
    with pytest.raises(AssertionError, match="recorded on torch"):
        assert_pinned("f" * 16, {float_platform(): value})


def test_another_platform_passes_on_any_recorded_digest_and_else_skips():
    value = digest([torch.arange(6.0)])
    assert_pinned(value, {"an older machine": value})
    with pytest.raises(pytest.skip.Exception, match="no digest recorded for this float platform"):
        assert_pinned(value, {"an older machine": "0" * 16})
