"""The pocketlm conformance kit on the ``gguf`` exporter (writes only inside its folder, the same
bytes twice, nothing visible after a failure, the model unchanged) and on the k-quant grid rules
``q2_k`` ... ``q6_k`` on rows of two super-blocks (float16 scales and integer zero points of the documented shape, pure,
deterministic, on the weight's device, a round-trip error within the kit's bound)."""

import pytest

from pocketlm.plugins import get_plugins
from pocketlm.testing.conformance import ExporterConformance, GridRuleConformance, check_light_registration

needs_rtn = pytest.mark.skipif("rtn" not in get_plugins().methods, reason="the quantized model is made by "
                               "pocketlm-gptq's rtn")


class TestGGUFExporterDenseConformance(ExporterConformance):
    exporter = "gguf"


@needs_rtn
class TestGGUFExporterConformance(ExporterConformance):
    exporter = "gguf"
    method = "rtn"
    method_options = {"bits": 4, "group_size": 32}      # Q4_0 blocks
    architectures = ("llama", "qwen2")                   # the Llama family it writes


class TestQ2KConformance(GridRuleConformance):
    grid_rule = "q2_k"
    cols = 512          # two 256-weight super-blocks (narrower rows take a plain grid)


class TestQ3KConformance(GridRuleConformance):
    grid_rule = "q3_k"
    cols = 512          # two 256-weight super-blocks (narrower rows take a plain grid)


class TestQ4KConformance(GridRuleConformance):
    grid_rule = "q4_k"
    cols = 512          # two 256-weight super-blocks (narrower rows take a plain grid)


class TestQ5KConformance(GridRuleConformance):
    grid_rule = "q5_k"
    cols = 512          # two 256-weight super-blocks (narrower rows take a plain grid)


class TestQ6KConformance(GridRuleConformance):
    grid_rule = "q6_k"
    cols = 512          # two 256-weight super-blocks (narrower rows take a plain grid)


def test_registration_is_light():
    # `pocketlm validate` loads every plugin: registering this one must import no tensor library
    check_light_registration("pocketlm_gguf")
