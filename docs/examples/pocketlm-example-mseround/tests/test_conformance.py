"""The pocketlm conformance kit on rtn and gptq with the ``mse`` grid (see docs/plugins/conformance.md)."""

import pytest

from pocketlm.plugins import get_plugins
from pocketlm.testing.conformance import MethodConformance

if "rtn" not in get_plugins().methods:
    pytest.skip("the mse grid rule is used through rtn and gptq: install pocketlm-gptq", allow_module_level=True)


class TestRTNWithMSEGrid(MethodConformance):
    method = "rtn"
    options = {"bits": 4, "group_size": 32, "grid": "mse"}


class TestGPTQWithMSEGrid(MethodConformance):
    method = "gptq"
    options = {"bits": 4, "group_size": 32, "grid": "mse"}
