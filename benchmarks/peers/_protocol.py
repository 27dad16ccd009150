"""The perplexity of the benchmark protocol, torch only, so both pocketlm's environment
(benchmarks/common.py) and the peers' environments (peers/*.py, which never import pocketlm)
measure with the same code."""

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def perplexity(model, evaluation: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) over every predicted token of the ``[n, seq]`` windows."""
    torch.manual_seed(0)
    total, count = 0.0, 0
    for start in range(0, evaluation.shape[0], batch_size):
        batch = evaluation[start:start + batch_size]
        logits = model(input_ids=batch, use_cache=False).logits.float()
        total += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += batch[:, 1:].numel()
    return math.exp(total / count)


def load_model_and_windows(folder: str, windows_file: str):
    """What every peer script starts from: seed 0, 2 threads, the float32 model, the calibration
    and evaluation token windows the benchmark handed over, and the calibration windows as the
    ``datasets.Dataset`` llm-compressor's ``oneshot`` takes."""
    from datasets import Dataset
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(2)
    tensors = load_file(windows_file)
    calibration, evaluation = tensors["calibration"], tensors["evaluation"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    dataset = Dataset.from_dict({"input_ids": calibration.tolist(),
                                 "attention_mask": torch.ones_like(calibration).tolist()})
    return model, calibration, evaluation, dataset
