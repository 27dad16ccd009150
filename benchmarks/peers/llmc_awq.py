"""llm-compressor's AWQ (AWQModifier smoothing + QuantizationModifier, W4A16 asymmetric, group
size 64) on the reference model, for benchmarks/bench_awq.py. Runs inside the llm-compressor
venv (never imports pocketlm).

Usage: <llmc-venv>/bin/python benchmarks/peers/llmc_awq.py MODEL_DIR WINDOWS.safetensors BITS GROUP [--patch]

``--patch`` replaces ``IntermediatesCache.pin_memory`` with a no-op: llm-compressor 0.14 calls it
unconditionally and it raises "Cannot access accelerator device when none is available" on a
CPU-only machine. Pinning only speeds up host-to-device copies, so the no-op changes no result.
Reads the calibration and evaluation token windows the main script saved, prints one JSON line.
"""

import json
import sys
import time


from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from llmcompressor.modifiers.transform.awq import AWQModifier


from _protocol import load_model_and_windows, perplexity  # noqa: E402  (same code as benchmarks/common.py)


def main():
    folder, windows_file, bits, group = sys.argv[1:5]
    patch = "--patch" in sys.argv[5:]
    if patch:
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    model, calibration, evaluation, dataset = load_model_and_windows(folder, windows_file)
    weights = {"num_bits": int(bits), "type": "int", "symmetric": False, "strategy": "group",
               "group_size": int(group)}
    recipe = [AWQModifier(duo_scaling=True, n_grid=20),
              QuantizationModifier(ignore=["lm_head"], config_groups={
                  "group_0": {"targets": ["Linear"], "weights": weights}})]
    start = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=calibration.shape[0],
            max_seq_length=calibration.shape[1], shuffle_calibration_samples=False)
    seconds = time.perf_counter() - start
    ppl = perplexity(model, evaluation)
    print("RESULT " + json.dumps({"method": "llmc-awq", "patched": patch, "bits": int(bits), "group_size": int(group),
                                   "seconds": seconds, "perplexity": ppl}), flush=True)


if __name__ == "__main__":
    main()
