"""Run llm-compressor's GPTQModifier on a model folder with given calibration token windows.

Runs inside llm-compressor's own environment (named by ``POCKETLM_LLMCOMPRESSOR_PYTHON``), never
in pocketlm's: it imports only the standard library, torch, transformers, datasets, safetensors
and llmcompressor. pocketlm-gptq's ``backend = "llmcompressor"`` starts it through
``pocketlm.external.run_worker``: the request is a JSON object on stdin, the reply a JSON object
written to the file named by the first argument::

    request: {"model": DIR, "windows": "calib.safetensors", "out": DIR, "bits": 4, "group_size": 64,
              "symmetric": true, "actorder": "static" | "none", "damp": 0.01, "block_size": 128,
              "targets": ["Linear"], "ignore": ["lm_head"], "threads": 2}
    reply:   {"seconds": ..., "peak_rss_mb": ..., "llmcompressor": "0.14.0", "actorder": "static"}

It writes a compressed-tensors folder to ``out``; ``seconds`` is the compression alone (oneshot,
the model already loaded).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

#: Request keys that may be left out, with their values.
DEFAULTS = {"bits": 4, "group_size": 64, "symmetric": True, "actorder": "static", "damp": 0.01, "block_size": 128,
            "targets": ["Linear"], "ignore": ["lm_head"], "threads": 2}

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


def quantize(request: dict) -> dict:
    """GPTQ of ``request["model"]`` into ``request["out"]``; returns the reply."""
    args = {**DEFAULTS, **request}

    import torch
    from datasets import Dataset
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier

    torch.manual_seed(0)
    torch.set_num_threads(args["threads"])
    ids = load_file(args["windows"])["input_ids"].long()
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.float32)
    has_tokenizer = (Path(args["model"]) / "tokenizer_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(args["model"]) if has_tokenizer else None
    processor = tokenizer
    if processor is None:  # the windows are already token ids; oneshot only insists on a processor
        from tokenizers import Tokenizer, models
        from transformers import PreTrainedTokenizerFast

        processor = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, "<unk>")),
                                            unk_token="<unk>", pad_token="<unk>")
    weights = {"num_bits": args["bits"], "type": "int", "symmetric": args["symmetric"],
               "strategy": "channel" if args["group_size"] == -1 else "group"}
    if args["group_size"] != -1:
        weights["group_size"] = args["group_size"]
    recipe = GPTQModifier(config_groups={"group_0": {"targets": args["targets"], "weights": weights}},
                          ignore=args["ignore"], block_size=args["block_size"], dampening_frac=args["damp"],
                          actorder=None if args["actorder"] == "none" else args["actorder"])
    start = time.perf_counter()
    oneshot(model=model, processor=processor, dataset=dataset, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False)
    seconds = time.perf_counter() - start
    model.save_pretrained(args["out"], save_compressed=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(args["out"])
    import llmcompressor

    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "llmcompressor": llmcompressor.__version__,
            "actorder": args["actorder"]}


if __name__ == "__main__":
    reply = quantize(json.load(sys.stdin))
    with open(sys.argv[1], "w") as handle:
        json.dump(reply, handle)
