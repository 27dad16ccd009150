"""The pocketlm conformance kit on mse-round (see docs/plugins/conformance.md)."""

from pocketlm.testing.conformance import MethodConformance


class TestConformance(MethodConformance):
    method = "mse-round"
    options = {"bits": 4, "group_size": 32, "grid": 8}
