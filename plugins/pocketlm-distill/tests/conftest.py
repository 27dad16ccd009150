"""Fixtures: a tiny llama *trained* on real text, so its distributions are worth distilling."""

from __future__ import annotations

import copy
import hashlib

import pytest
import torch
import torch.nn.functional as F

from pocketlm import data
from pocketlm.testing.models import tiny_model, tiny_tokenizer

SEQ_LEN = 64


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    # Two shared cores: one thread per test process is several times faster than two.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """Training text file, held-out windows and the tokenizer."""
    tokenizer = tiny_tokenizer()
    text = data.read_text(data.resolve_text("builtin:wikitext-2-valid"))
    folder = tmp_path_factory.mktemp("corpus")
    train = folder / "train.txt"
    train.write_text(text[:60_000], encoding="utf-8")
    held_ids = torch.tensor(tokenizer(text[300_000:312_000], add_special_tokens=False)["input_ids"])
    held = data.windows(held_ids, SEQ_LEN)[:24]
    train_windows = data.windows(data.tokenize(tokenizer, train), SEQ_LEN)
    return {"tokenizer": tokenizer, "train": train, "train_windows": train_windows, "held": held}


def train_ce(model, windows, steps, lr=1e-2, batch=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        ids = windows[torch.randint(0, windows.shape[0], (batch,), generator=generator)]
        logits = model(input_ids=ids, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="session")
def trained_teacher(corpus):
    """A tiny llama trained for 50 CE steps on the training text (seconds)."""
    torch.manual_seed(0)
    model = tiny_model("llama", vocab_size=len(corpus["tokenizer"]))
    return train_ce(model, corpus["train_windows"], 50)


def frozen_copy(model):
    """A fresh, frozen copy of a trained teacher, so no test can leak changes into another."""
    model = copy.deepcopy(model)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()


@pytest.fixture
def teacher(trained_teacher):
    return frozen_copy(trained_teacher)


@torch.no_grad()
def perplexity(model, windows) -> float:
    logits = model(input_ids=windows, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)).exp().item()


@torch.no_grad()
def kl_to(teacher, student, windows) -> float:
    p = F.log_softmax(teacher(input_ids=windows, use_cache=False).logits, -1)
    q = F.log_softmax(student(input_ids=windows, use_cache=False).logits, -1)
    return F.kl_div(q.reshape(-1, q.shape[-1]), p.reshape(-1, p.shape[-1]), log_target=True, reduction="batchmean").item()


def params_hash(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
