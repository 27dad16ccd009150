"""The core's conformance kit on both methods, both exporters and both checkpoint loaders."""

from pocketlm.testing.conformance import (ExporterConformance, LoaderConformance, MethodConformance,
                                          check_light_registration, export_model)
from pocketlm.testing.models import tiny_tokenizer


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


class TestGPTQCheckpointLoaderConformance(LoaderConformance):
    loader = "gptq-checkpoint"

    def source(self, tmp_path):
        return str(export_model("gptq", tmp_path / "gptq", method="rtn", method_options={"bits": 4, "group_size": 32},
                                tokenizer=tiny_tokenizer()))


class TestCompressedTensorsCheckpointLoaderConformance(LoaderConformance):
    loader = "compressed-tensors-checkpoint"

    def source(self, tmp_path):
        return str(export_model("compressed-tensors", tmp_path / "ct", method="rtn",
                                method_options={"bits": 4, "group_size": 32}, tokenizer=tiny_tokenizer()))


def test_registration_is_light():
    # `pocketlm validate` loads every plugin: registering this one must import no tensor library
    check_light_registration("pocketlm_gptq")
