"""The pocketlm conformance kit: the contract every method, exporter and loader meets (options, every
tiny architecture, masks, ignore, determinism, untouched teacher and calibration data, the core
checkpoint). The hf round trip does not apply: a thresholded model holds a feature
(``thresholds``) the hf exporter cannot represent, and recipes refuse that export."""

from pocketlm.testing.conformance import (LoaderConformance, MethodConformance, check_exporter, check_light_registration,
                                          export_model)
from pocketlm.testing.models import tiny_tokenizer


class TestConformance(MethodConformance):
    method = "activation-sparsity"
    options = {"sparsity": 0.5}


class TestGreedyConformance(MethodConformance):
    method = "activation-sparsity"
    options = {"sparsity": 0.5, "allocation": "greedy"}
    architectures = ("llama", "gpt2")


class TestGreedyProxyConformance(MethodConformance):
    method = "activation-sparsity"
    options = {"sparsity": 0.5, "allocation": "greedy-proxy"}
    architectures = ("llama",)


def test_exporter_conformance():
    check_exporter("dynamic", {"base": "hf"}, method="activation-sparsity", method_options={"sparsity": 0.5})


class TestDynamicLoaderConformance(LoaderConformance):
    loader = "dynamic"

    def source(self, tmp_path):
        return str(export_model("dynamic", tmp_path / "export", {"base": "hf"}, method="activation-sparsity",
                                method_options={"sparsity": 0.5}, tokenizer=tiny_tokenizer()))


def test_registration_is_light():
    """Importing the plugin and registering its components imports no tensor library (``validate``
    loads every plugin): the options and effects are light, the methods' code loads when it runs."""
    check_light_registration("pocketlm_dynamic")
