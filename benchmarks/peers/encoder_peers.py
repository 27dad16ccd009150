"""Peer worker for the encoder benchmark; runs in the peers' own environment
(benchmarks/peers/setup_encoder_peers.sh), never in pocketlm's.

For each peer it exports the original model, embeds the benchmark's queries and passages with
ONNX Runtime, and times batch-1 encoding of the timing sentences:

* ``optimum-int8``: Optimum's ONNX export, then ONNX Runtime's dynamic int8 quantization
  (``ORTQuantizer`` with the AVX-512 VNNI dynamic config, per-channel weights), mean-pooled and
  normalized as the model's sentence-transformers config says;
* ``st-onnx-int8``: sentence-transformers' own ONNX backend and its
  ``export_dynamic_quantized_onnx_model`` (the int8 file it publishes for the same purpose).

Input: ``--texts`` JSON ``{"queries": [...], "passages": [...], "timing": [...]}``. Output, per
peer under ``--out``: ``{peer}-queries.npy``, ``{peer}-passages.npy`` and ``{peer}.json`` (bytes on
disk of the ONNX weights, batch-1 sentences/s with one thread and with all threads).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np


def onnx_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.suffix in (".onnx", ".onnx_data") or p.name.endswith(".onnx.data"))


def best_rate(encode, sentences: list[str], repeats: int = 3) -> float:
    encode(sentences[:4])  # warm-up
    best = min(_timed(lambda: [encode([s]) for s in sentences]) for _ in range(repeats))
    return len(sentences) / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def sentence_transformer(folder: Path, onnx_file: str | None, threads: int | None):
    from sentence_transformers import SentenceTransformer

    kwargs = {"file_name": onnx_file} if onnx_file else {}
    if threads:
        kwargs["provider_options"] = None
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        kwargs["session_options"] = options
    return SentenceTransformer(str(folder), backend="onnx", device="cpu", model_kwargs=kwargs)


def run_st_int8(model: Path, texts: dict, out: Path) -> dict:
    from sentence_transformers import SentenceTransformer, export_dynamic_quantized_onnx_model

    work = out / "st-onnx"
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(model, work)
    float_model = SentenceTransformer(str(work), backend="onnx", device="cpu")   # exports onnx/model.onnx
    float_model.save(str(work))
    export_dynamic_quantized_onnx_model(float_model, "avx512_vnni", str(work))
    quantized = next(p.relative_to(work) for p in work.rglob("*qint8*.onnx"))
    return _measure("st-onnx-int8", work, str(quantized), texts, out, weights=work / quantized)


def run_optimum_int8(model: Path, texts: dict, out: Path) -> dict:
    from optimum.onnxruntime import ORTModelForFeatureExtraction, ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    exported = out / "optimum-fp32"
    quantized = out / "optimum-int8"
    for folder in (exported, quantized):
        if folder.exists():
            shutil.rmtree(folder)
    ORTModelForFeatureExtraction.from_pretrained(str(model), export=True).save_pretrained(exported)
    quantizer = ORTQuantizer.from_pretrained(exported)
    quantizer.quantize(save_dir=quantized, quantization_config=AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True))
    for name in ("modules.json", "sentence_bert_config.json", "1_Pooling", "2_Normalize", "config_sentence_transformers.json"):
        source = model / name
        if source.is_dir():
            shutil.copytree(source, quantized / name, dirs_exist_ok=True)
        elif source.is_file():
            shutil.copy(source, quantized / name)
    for tokenizer_file in model.glob("*.txt"):
        shutil.copy(tokenizer_file, quantized / tokenizer_file.name)
    onnx_file = next(p.name for p in quantized.glob("*.onnx"))
    (quantized / "onnx").mkdir(exist_ok=True)
    shutil.move(str(quantized / onnx_file), quantized / "onnx" / onnx_file)
    return _measure("optimum-int8", quantized, f"onnx/{onnx_file}", texts, out, weights=quantized / "onnx" / onnx_file)


def _measure(peer: str, folder: Path, onnx_file: str, texts: dict, out: Path, weights: Path) -> dict:
    model = sentence_transformer(folder, onnx_file, None)
    encode = lambda batch: model.encode(batch, batch_size=32, convert_to_numpy=True, normalize_embeddings=False)  # noqa: E731
    np.save(out / f"{peer}-queries.npy", encode(texts["queries"]))
    np.save(out / f"{peer}-passages.npy", encode(texts["passages"]))
    result = {"peer": peer, "onnx_bytes": weights.stat().st_size,
              "sentences_per_s_batch1_threads_all": best_rate(encode, texts["timing"])}
    one = sentence_transformer(folder, onnx_file, 1)
    result["sentences_per_s_batch1_threads_1"] = best_rate(
        lambda batch: one.encode(batch, batch_size=32, convert_to_numpy=True), texts["timing"])
    (out / f"{peer}.json").write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--texts", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--peers", default="optimum-int8,st-onnx-int8")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    texts = json.loads(args.texts.read_text())
    runners = {"optimum-int8": run_optimum_int8, "st-onnx-int8": run_st_int8}
    for peer in args.peers.split(","):
        try:
            print(json.dumps(runners[peer](args.model, texts, args.out)))
        except Exception as exc:  # noqa: BLE001 - one peer failing must not hide the other
            (args.out / f"{peer}.json").write_text(json.dumps({"peer": peer, "error": f"{type(exc).__name__}: {exc}"}))
            print(f"{peer} failed: {type(exc).__name__}: {exc}")


if __name__ == "__main__":
    main()
