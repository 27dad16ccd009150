"""The pocketlm conformance kit on ``awq``, the ``awq`` exporter and the ``awq-checkpoint`` loader:
options, every tiny architecture, masks, ignore, determinism, allocations on the layer's device,
CUDA against the CPU (where there is a GPU), the core checkpoint and the hf round trip; the
exporter's folder contract; the loader's contract on an exported checkpoint."""

from pocketlm.testing.conformance import (ExporterConformance, LoaderConformance, MethodConformance,
                                          check_light_registration, export_model)
from pocketlm.testing.models import tiny_tokenizer

FAST = {"bits": 4, "group_size": 32, "n_grid": 4, "clip_grid": 4}


class TestAWQConformance(MethodConformance):
    method = "awq"
    options = FAST


class TestAWQExporterConformance(ExporterConformance):
    exporter = "awq"
    method = "awq"
    method_options = FAST          # asymmetric grids (awq's default), 4 bits in groups of 32


class TestAWQCheckpointLoaderConformance(LoaderConformance):
    loader = "awq-checkpoint"

    def source(self, tmp_path):
        return str(export_model("awq", tmp_path / "awq", method="awq", method_options=FAST, tokenizer=tiny_tokenizer()))


def test_registration_is_light():
    # `pocketlm validate` loads every plugin: registering this one must import no tensor library
    check_light_registration("pocketlm_awq")
