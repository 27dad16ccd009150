"""The pocketlm conformance kit: the contract every method and exporter meets (options, every
tiny architecture, masks, ignore, determinism, untouched teacher and calibration data, the core
checkpoint). The hf round trip does not apply: a thresholded model holds a feature
(``thresholds``) the hf exporter cannot represent, and recipes refuse that export."""

from pocketlm.testing.conformance import MethodConformance, check_exporter


class TestConformance(MethodConformance):
    method = "activation-sparsity"
    options = {"sparsity": 0.5}


class TestGreedyConformance(MethodConformance):
    method = "activation-sparsity"
    options = {"sparsity": 0.5, "allocation": "greedy"}
    architectures = ("llama", "gpt2")


def test_exporter_conformance():
    check_exporter("dynamic", {"base": "hf"}, method="activation-sparsity", method_options={"sparsity": 0.5})
