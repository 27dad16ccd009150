"""Decode speed of several .gguf files in llama.cpp (llama-cpp-python), side by side. Runs in its
own environment (llama-cpp-python is never a pocketlm dependency), called by
``bench_kquants.py --speed`` as a subprocess:

  LLAMA_PYTHON benchmarks/peers/llamacpp_decode.py PROMPT.npy OUT.json A.gguf B.gguf ... [--threads 2]

Batch 1, greedy: the prompt (``PROMPT.npy``, int64 token ids) evaluated in one batch, then
``--new-tokens`` tokens generated one at a time. The files take turns (A, B, ..., A, B, ...) for
``--repeats`` rounds and each keeps its best round, so a busy moment of the machine costs every
file alike. Reported per file: tokens/s end to end (prompt included, as
``bench_dynamic.py speed`` counts it) and of the generation alone (from the first new token on).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def decode_once(llm, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(seconds end to end, seconds from the first new token on) for one greedy generation."""
    llm.reset()
    start = time.perf_counter()
    first, generated = None, 0
    for _ in llm.generate(prompt, temp=0.0):
        generated += 1
        if first is None:
            first = time.perf_counter()
        if generated >= new_tokens:
            break
    end = time.perf_counter()
    return end - start, end - first


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("prompt")
    parser.add_argument("out")
    parser.add_argument("models", nargs="+")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import llama_cpp
    from llama_cpp import Llama

    prompt = np.load(args.prompt).astype(np.int64).tolist()
    context = len(prompt) + args.new_tokens + 8
    models = {path: Llama(model_path=path, n_ctx=context, n_batch=len(prompt), n_threads=args.threads,
                          n_threads_batch=args.threads, verbose=False, seed=0) for path in args.models}
    for llm in models.values():   # warm-up: first touch of the weights, the threads' start
        decode_once(llm, prompt, 4)
    best = {path: (float("inf"), float("inf")) for path in models}
    for _ in range(args.repeats):
        for path, llm in models.items():
            total, generation = decode_once(llm, prompt, args.new_tokens)
            best[path] = (min(best[path][0], total), min(best[path][1], generation))
    result = {"llama_cpp_version": llama_cpp.__version__, "threads": args.threads, "prompt_tokens": len(prompt),
              "new_tokens": args.new_tokens, "repeats": args.repeats, "files": {
                  path: {"tokens_per_s_end_to_end": round(args.new_tokens / total, 1),
                         "gen_tokens_per_s": round((args.new_tokens - 1) / generation, 1)}
                  for path, (total, generation) in best.items()}}
    with open(args.out, "w") as handle:
        json.dump(result, handle)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
