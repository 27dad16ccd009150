"""Run llm-compressor's GPTQModifier on a model folder with given calibration token windows.

Runs inside llm-compressor's own venv (benchmarks/.venvs/llmcompressor), never in pocketlm's.
Used by benchmarks/bench_gptq.py (side-by-side) and by pocketlm-gptq's ``backend =
"llmcompressor"``. Writes a compressed-tensors folder to --out and a JSON line with the
compression seconds (oneshot only, model already loaded) and peak RSS to --result.

    python llmc_worker.py --model DIR --windows calib.safetensors --out DIR --result r.json \
        --bits 4 --group-size 64 [--asymmetric] [--actorder static|none] [--ignore lm_head ...]
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path



def peak_rss_mb() -> float:
    """This process's own peak resident memory: VmHWM (ru_maxrss would include the peak of the
    process that started this one, which a child inherits at exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--windows", required=True, help="safetensors file with an int64 'input_ids' [n, seq]")
    parser.add_argument("--out", required=True)
    parser.add_argument("--result", required=True)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--asymmetric", action="store_true")
    parser.add_argument("--actorder", default="static", choices=["static", "none"])
    parser.add_argument("--damp", type=float, default=0.01)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--targets", nargs="*", default=["Linear"])
    parser.add_argument("--ignore", nargs="*", default=["lm_head"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    ids = load_file(args.windows)["input_ids"].long()
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    has_tokenizer = (Path(args.model) / "tokenizer_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(args.model) if has_tokenizer else None
    processor = tokenizer
    if processor is None:  # the windows are already token ids; oneshot only insists on a processor
        from tokenizers import Tokenizer, models
        from transformers import PreTrainedTokenizerFast

        processor = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, "<unk>")),
                                            unk_token="<unk>", pad_token="<unk>")
    weights = {"num_bits": args.bits, "type": "int", "symmetric": not args.asymmetric,
               "strategy": "channel" if args.group_size == -1 else "group"}
    if args.group_size != -1:
        weights["group_size"] = args.group_size
    recipe = GPTQModifier(config_groups={"group_0": {"targets": args.targets, "weights": weights}},
                          ignore=args.ignore, block_size=args.block_size, dampening_frac=args.damp,
                          actorder=None if args.actorder == "none" else args.actorder)
    start = time.perf_counter()
    oneshot(model=model, processor=processor, dataset=dataset, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False)
    seconds = time.perf_counter() - start
    model.save_pretrained(args.out, save_compressed=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(args.out)
    import llmcompressor

    with open(args.result, "w") as handle:
        json.dump({"seconds": seconds, "peak_rss_mb": peak_rss_mb(),
                   "llmcompressor": llmcompressor.__version__, "actorder": args.actorder}, handle)


if __name__ == "__main__":
    main()
