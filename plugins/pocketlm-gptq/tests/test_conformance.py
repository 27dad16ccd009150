"""The core's conformance kit on both methods and both exporters."""

from pocketlm.testing.conformance import ExporterConformance, MethodConformance


class TestRTNConformance(MethodConformance):
    method = "rtn"
    options = {"bits": 4, "group_size": 32}


class TestGPTQConformance(MethodConformance):
    method = "gptq"
    options = {"bits": 4, "group_size": 32}


class TestGPTQExporterConformance(ExporterConformance):
    exporter = "gptq"
    method = "gptq"
    method_options = {"bits": 4, "group_size": 32}
    architectures = ("llama", "gpt2")


class TestCompressedTensorsExporterConformance(ExporterConformance):
    exporter = "compressed-tensors"
    method = "rtn"
    method_options = {"bits": 4, "group_size": 32}
