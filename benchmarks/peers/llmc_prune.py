"""llm-compressor's SparseGPTModifier / WandaPruningModifier on the reference model, for
benchmarks/bench_prune.py. Runs inside the llm-compressor venv (never imports pocketlm).

Usage: <llmc-venv>/bin/python benchmarks/peers/llmc_prune.py MODEL_DIR WINDOWS.safetensors METHOD MASK
  METHOD: sparsegpt | wanda;  MASK: 0:0 (unstructured, 50%) or 2:4.
Reads the calibration and evaluation token windows the main script saved, prints one JSON line.
"""

import json
import sys
import time

import torch

from llmcompressor import oneshot
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier


from _protocol import load_model_and_windows, perplexity  # noqa: E402  (same code as benchmarks/common.py)


def main():
    folder, windows_file, method, mask = sys.argv[1:5]
    model, calibration, evaluation, dataset = load_model_and_windows(folder, windows_file)
    cls = {"sparsegpt": SparseGPTModifier, "wanda": WandaPruningModifier}[method]
    recipe = cls(sparsity=0.5, mask_structure=mask, targets=["Linear"], ignore=["lm_head", "re:.*lm_head"])
    start = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=calibration.shape[0],
            max_seq_length=calibration.shape[1], shuffle_calibration_samples=False)
    seconds = time.perf_counter() - start
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    zeros = sum(int((m.weight == 0).sum()) for m in linears) / sum(m.weight.numel() for m in linears)
    head_zeros = float((model.lm_head.weight == 0).float().mean())
    ppl = perplexity(model, evaluation)
    print("RESULT " + json.dumps({"method": f"llmc-{method}", "mask": mask, "seconds": seconds,
                                   "perplexity": ppl, "sparsity": zeros, "lm_head_zeros": head_zeros}), flush=True)


if __name__ == "__main__":
    main()
