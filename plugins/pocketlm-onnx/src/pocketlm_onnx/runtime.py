"""Running an ``onnx`` export with ONNX Runtime: an InferenceSession, and sentence embeddings from it.

>>> from pocketlm_onnx import runtime
>>> from transformers import AutoTokenizer
>>> ort_session = runtime.inference_session("out/onnx", threads=1)
>>> vectors = runtime.embed(ort_session, AutoTokenizer.from_pretrained("out/onnx"), ["a sentence"])
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime

MODEL_FILE = "model.onnx"


def inference_session(folder: str | Path, threads: int | None = None) -> onnxruntime.InferenceSession:
    """An ONNX Runtime CPU InferenceSession on ``folder``'s ``model.onnx``; ``threads`` caps the threads
    one run uses (None: ONNX Runtime's default, one per physical core)."""
    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(Path(folder) / MODEL_FILE), options, providers=["CPUExecutionProvider"])


def feed(ort_session: onnxruntime.InferenceSession, batch) -> dict[str, np.ndarray]:
    """The inputs ``ort_session`` takes, as int64, from a tokenizer's numpy ``batch`` (token types
    are zeros where the tokenizer gives none)."""
    ids = np.asarray(batch["input_ids"], dtype=np.int64)
    found = {"input_ids": ids, "attention_mask": np.asarray(batch["attention_mask"], dtype=np.int64),
             "token_type_ids": np.asarray(batch.get("token_type_ids", np.zeros_like(ids)), dtype=np.int64)}
    return {i.name: found[i.name] for i in ort_session.get_inputs()}


def embed(session_or_folder, tokenizer, sentences: list[str], batch_size: int = 32,
          max_length: int = 256) -> np.ndarray:
    """The ``sentence_embedding`` output for ``sentences``: float32 ``[len(sentences), width]``."""
    run = session_or_folder
    if not isinstance(run, onnxruntime.InferenceSession):
        run = inference_session(run)
    out = []
    for start in range(0, len(sentences), batch_size):
        batch = tokenizer(list(sentences[start:start + batch_size]), padding=True, truncation=True,
                          max_length=max_length, return_tensors="np")
        out.append(run.run(["sentence_embedding"], feed(run, batch))[0])
    return np.concatenate(out).astype(np.float32)
