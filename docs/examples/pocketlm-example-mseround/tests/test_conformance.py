"""The pocketlm conformance kit on the ``mse`` grid rule itself, and on rtn and gptq using it (see
docs/plugins/conformance.md)."""

import pytest

from pocketlm.plugins import get_plugins
from pocketlm.testing.conformance import GridRuleConformance, MethodConformance, check_light_registration

needs_rtn = pytest.mark.skipif("rtn" not in get_plugins().methods,
                               reason="the mse grid rule is used through rtn and gptq: install pocketlm-gptq")


def test_registration_is_light():
    check_light_registration("pocketlm_example_mseround")


class TestMSEGridRule(GridRuleConformance):
    grid_rule = "mse"     # every setting it supports: bits 2-8, every group size, symmetric


@needs_rtn
class TestRTNWithMSEGrid(MethodConformance):
    method = "rtn"
    options = {"bits": 4, "group_size": 32, "grid": "mse"}


@needs_rtn
class TestGPTQWithMSEGrid(MethodConformance):
    method = "gptq"
    options = {"bits": 4, "group_size": 32, "grid": "mse"}
