"""llm-compressor's GPTQ on a model folder, with the whole model in CPU memory (its default) or
offloaded to disk through compressed-tensors' ``load_offloaded_model`` (``device_map =
"auto_offload"`` with a CPU memory cap, so the weights that do not fit wait in an offload folder).
Runs inside llm-compressor's own venv (benchmarks/.venvs/llmcompressor) and never imports
pocketlm. Used by ``benchmarks/bench_scale.py peer``, which samples this process's memory.

    python llmc_scale.py --model DIR --windows calib.safetensors --out DIR --result r.json \
        --offload none|disk [--cpu-memory BYTES] [--offload-folder DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# the shipped worker's measure of this process's own peak (it imports only the standard library)
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "plugins" / "pocketlm-gptq" / "src" / "pocketlm_gptq"))
from llmc_worker import peak_rss_mb  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--windows", required=True, help="safetensors file with an int64 'input_ids' [n, seq]")
    parser.add_argument("--out", required=True)
    parser.add_argument("--result", required=True)
    parser.add_argument("--offload", choices=["none", "disk"], default="none")
    parser.add_argument("--cpu-memory", type=int, default=1_000_000_000,
                        help="disk: bytes of weights kept in CPU memory; the rest goes to the offload folder")
    parser.add_argument("--offload-folder", default=None)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from safetensors.torch import load_file
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    ids = load_file(args.windows)["input_ids"].long()
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    start = time.perf_counter()
    if args.offload == "disk":
        from compressed_tensors.offload import load_offloaded_model

        with load_offloaded_model():
            model = AutoModelForCausalLM.from_pretrained(
                args.model, dtype=torch.float32, device_map="auto_offload",
                max_memory={"cpu": args.cpu_memory}, offload_folder=args.offload_folder)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    loaded = time.perf_counter()
    # The windows are token ids already; oneshot only insists on a processor.
    processor = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, "<unk>")),
                                        unk_token="<unk>", pad_token="<unk>")
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": args.group_size}
    recipe = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                          ignore=["lm_head"], block_size=128, dampening_frac=0.01, actorder="static")
    oneshot(model=model, processor=processor, dataset=dataset, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False, batch_size=1)
    compressed = time.perf_counter()
    model.save_pretrained(args.out, save_compressed=True)
    saved = time.perf_counter()
    import llmcompressor

    with open(args.result, "w") as handle:
        json.dump({"load_s": round(loaded - start, 1), "oneshot_s": round(compressed - loaded, 1),
                   "save_s": round(saved - compressed, 1), "wall_s": round(saved - start, 1),
                   "peak_rss_mb": round(peak_rss_mb(), 1),
                   "llmcompressor": llmcompressor.__version__, "offload": args.offload}, handle)


if __name__ == "__main__":
    main()
