"""The pocketlm conformance kit on ``awq`` and the ``awq`` exporter: options, every tiny
architecture, masks, ignore, determinism, allocations on the layer's device, CUDA against the CPU
(where there is a GPU), the core checkpoint and the hf round trip; the exporter's folder contract."""

from pocketlm.testing.conformance import ExporterConformance, MethodConformance

FAST = {"bits": 4, "group_size": 32, "n_grid": 4, "clip_grid": 4}


class TestAWQConformance(MethodConformance):
    method = "awq"
    options = FAST


class TestAWQExporterConformance(ExporterConformance):
    exporter = "awq"
    method = "awq"
    method_options = FAST          # asymmetric grids (awq's default), 4 bits in groups of 32
