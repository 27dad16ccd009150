"""The perplexity of the benchmark protocol, torch only, so both pocketlm's environment
(benchmarks/common.py) and the peers' environments (peers/*.py, which never import pocketlm)
measure with the same code."""

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
@torch.no_grad()   # scoring only: no autograd graph over a model whose parameters train
def window_nll(model, evaluation: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """Summed next-token NLL of each of the ``[n, seq]`` windows (float64, one value per window)."""
    torch.manual_seed(0)
    sums = []
    for start in range(0, evaluation.shape[0], batch_size):
        batch = evaluation[start:start + batch_size]
        logits = model(input_ids=batch, use_cache=False).logits.float()
        # (tokens, vocab) layout: a (batch, vocab, tokens) one takes another log-softmax kernel,
        # whose float32 sums read about 1e-4 lower on the reference model
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                              reduction="none")
        sums.append(nll.view(batch.shape[0], -1).double().sum(dim=1))
    return torch.cat(sums)


def perplexity_of(nll: torch.Tensor, seq_len: int) -> float:
    """exp(mean next-token NLL) of windows of ``seq_len`` tokens, from their :func:`window_nll`."""
    return math.exp(nll.sum().item() / (nll.numel() * (seq_len - 1)))


def perplexity(model, evaluation: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) over every predicted token of the ``[n, seq]`` windows."""
    return perplexity_of(window_nll(model, evaluation, batch_size), evaluation.shape[1])


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
