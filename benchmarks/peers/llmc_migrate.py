"""llm-compressor's GPTQ (GPTQModifier W4A16: integer, symmetric, group 32, act-order off, lm_head
ignored) on the reference model, saved as a compressed-tensors (pack-quantized) checkpoint, for
benchmarks/bench_migrate.py. Runs inside llm-compressor's own venv (never imports pocketlm).

Usage: <llmc-venv>/bin/python benchmarks/peers/llmc_migrate.py MODEL_DIR WINDOWS.safetensors OUT_DIR DECOMPRESSED

Reads the calibration and evaluation token windows the main script saved (``calibration``,
``evaluation``), writes the checkpoint (and the model's tokenizer) to OUT_DIR, then loads it back
from disk the way transformers does (``CompressedTensorsConfig(run_compressed=False)``:
compressed-tensors decompresses every packed linear), saves those float32 weights of the
quantized linears to DECOMPRESSED (safetensors) and measures that model's perplexity on the
evaluation windows. Prints one line ``RESULT {json}``.

``scale_dtype = float16``: llm-compressor rounds every scale to float16 before quantizing with
it. Without it the scales are stored in the model's dtype (float32 here), which pocketlm's loader
refuses rather than round (float16 is pocketlm's scale dtype).
"""

import json
import sys
import time

from _protocol import load_model_and_windows, perplexity  # same code as benchmarks/common.py

GROUP_SIZE = 32


def quantize(model, dataset, calibration) -> float:
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier

    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": GROUP_SIZE,
               "scale_dtype": "float16"}
    recipe = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                          ignore=["lm_head"], actorder=None, block_size=128, dampening_frac=0.01)
    start = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=calibration.shape[0],
            max_seq_length=calibration.shape[1], shuffle_calibration_samples=False)
    return time.perf_counter() - start


def load_decompressed(folder: str):
    import torch
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    return AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, quantization_config=CompressedTensorsConfig(run_compressed=False)).eval()


def save_linear_weights(model, path: str) -> int:
    import torch
    from safetensors.torch import save_file

    weights = {f"{name}.weight": module.weight.detach().float().contiguous()
               for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and name != "lm_head"}
    save_file(weights, path, metadata={"format": "pt"})
    return len(weights)


def main():
    folder, windows_file, out, decompressed = sys.argv[1:5]
    import compressed_tensors
    import llmcompressor
    import torch
    import transformers
    from transformers import AutoTokenizer

    model, calibration, evaluation, dataset = load_model_and_windows(folder, windows_file)
    seconds = quantize(model, dataset, calibration)
    model.save_pretrained(out, save_compressed=True)
    AutoTokenizer.from_pretrained(folder).save_pretrained(out)
    del model
    reloaded = load_decompressed(out)
    matrices = save_linear_weights(reloaded, decompressed)
    ppl = perplexity(reloaded, evaluation)
    print("RESULT " + json.dumps({
        "oneshot_seconds": round(seconds, 1), "decompressed_matrices": matrices, "transformers_perplexity": ppl,
        "llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__,
        "transformers": transformers.__version__, "torch": torch.__version__}), flush=True)


if __name__ == "__main__":
    main()
