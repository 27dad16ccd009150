"""Run a .gguf file in llama.cpp (llama-cpp-python): perplexity on given token windows and CPU
tokens/s. Runs in its own environment (llama-cpp-python is never a pocketlm dependency), called
by bench_gguf.py as a subprocess:

  LLAMA_PYTHON benchmarks/gguf_llamacpp.py MODEL.gguf WINDOWS.npy OUT.json [--threads 2]

``WINDOWS.npy``: int64 ``[n, seq_len]`` token ids (the benchmark's evaluation windows, made by the
model's transformers tokenizer), so both runtimes score exactly the same tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
from llamacpp_decode import decode_once  # noqa: E402


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("windows")
    parser.add_argument("out")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gen-tokens", type=int, default=128)
    args = parser.parse_args()

    import llama_cpp
    from llama_cpp import Llama

    windows = np.load(args.windows)
    seq_len = windows.shape[1]
    llm = Llama(model_path=args.model, n_ctx=seq_len, n_batch=seq_len, n_ubatch=seq_len, logits_all=True,
                n_threads=args.threads, n_threads_batch=args.threads, verbose=False, seed=0)
    total, count, eval_seconds = 0.0, 0, 0.0
    for window in windows:
        llm.reset()
        start = time.perf_counter()
        llm.eval(window.tolist())
        eval_seconds += time.perf_counter() - start
        logits = np.array(llm.scores[:seq_len], dtype=np.float32)
        logp = log_softmax(logits[:-1])
        total -= float(logp[np.arange(seq_len - 1), window[1:]].sum())
        count += seq_len - 1

    # generation speed: greedy decoding after a 64-token prompt from the first window, timed
    # from the first generated token (the prompt itself is evaluated in one batch before it)
    prompt = windows[0, :min(64, seq_len // 4)].tolist()
    limit = min(args.gen_tokens, seq_len - len(prompt) - 1)
    _, gen_seconds = decode_once(llm, prompt, limit)
    generated = limit - 1   # timed from the first new token on
    result = {
        "llama_cpp_version": llama_cpp.__version__,
        "threads": args.threads,
        "perplexity": math.exp(total / count),
        "windows": int(windows.shape[0]),
        "prompt_tokens_per_s": round(windows.size / eval_seconds, 1),
        "gen_tokens_per_s": round(generated / gen_seconds, 1),
        "gen_tokens": generated,
    }
    with open(args.out, "w") as handle:
        json.dump(result, handle)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
