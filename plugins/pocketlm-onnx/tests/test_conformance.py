"""The pocketlm conformance kit on the ``onnx`` exporter: a dense BERT and an 8-bit DistilBERT
(rtn) written only inside the folder it is given, the same bytes twice, nothing visible after a
failure, the model unchanged."""

from pocketlm.testing.conformance import check_exporter, check_light_registration
from pocketlm.testing.models import tiny_model, tiny_tokenizer


def test_conformance_dense():
    check_exporter("onnx", model=tiny_model("bert"), tokenizer=tiny_tokenizer(encoder=True))


def test_conformance_int8():
    check_exporter("onnx", family="distilbert", method="rtn",
                   method_options={"bits": 8, "group_size": -1, "targets": ["*"], "ignore": []})


def test_registration_is_light():
    """Importing the plugin and registering its components imports no tensor library (``validate``
    loads every plugin): the options and effects are light, the methods' code loads when it runs."""
    check_light_registration("pocketlm_onnx")
