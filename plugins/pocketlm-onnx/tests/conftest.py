"""Shared helpers: tiny encoders quantized through the core's public API, an export into a
folder with its log, and sentence embeddings from ONNX Runtime next to pocketlm's own."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import pocketlm
from pocketlm import sentence
from pocketlm.testing import make_context
from pocketlm.testing.models import tiny_model, tiny_tokenizer

SENTENCES = ["the cat sat on the mat", "a storm closed the northern pass for three days",
             "prices rose sharply in the second quarter of the year", "she wrote the letter in french",
             "the river floods every spring", "he scored twice in the final minutes", "ok"]

INT8_EVERYWHERE = {"method": "rtn", "bits": 8, "group_size": -1, "targets": ["*"], "ignore": []}


@pytest.fixture
def tokenizer():
    return tiny_tokenizer(encoder=True)


def encoder(family: str = "bert", **sizes):
    return tiny_model(family, vocab_size=len(tiny_tokenizer(encoder=True)), **sizes)


def compressed(model, *stages):
    """``model`` (a copy) after ``stages`` run through ``pocketlm.compress``."""
    return pocketlm.compress(copy.deepcopy(model), tiny_tokenizer(encoder=True), list(stages)).model


class Recorder:
    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, message: str) -> None:
        self.lines.append(message)

    def text(self) -> str:
        return "\n".join(self.lines)


def export(model, folder, tokenizer=None, **options):
    """Export with the ``onnx`` exporter into ``folder``; returns ``(folder, log)``."""
    from pocketlm_onnx import OnnxOptions, export_onnx

    folder.mkdir(parents=True, exist_ok=True)
    context = make_context(tokenizer=tokenizer)
    log = Recorder()
    context.logger = log
    export_onnx(model, folder, OnnxOptions(**options), context)
    return folder, log


def embeddings(model, folder, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """``(pocketlm's in-memory sentence embeddings, ONNX Runtime's from the export)``."""
    from pocketlm_onnx import runtime

    return sentence.embed(model, tokenizer, SENTENCES).numpy(), runtime.embed(folder, tokenizer, SENTENCES)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def graph(folder):
    return onnx.load(folder / "model.onnx").graph


def initializers(folder) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in graph(folder).initializer}


def ops(folder) -> list[str]:
    return [node.op_type for node in graph(folder).node]
