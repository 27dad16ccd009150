"""Shared helpers: tiny models quantized onto pocketlm grids, a BPE tokenizer with merges, and
an export + reload round trip through transformers' GGUF loader."""

from __future__ import annotations

import functools

import pytest
import torch

from pocketlm import weights as W
from pocketlm.modules import select_linears, set_module
from pocketlm.testing import make_context


def grid_of(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool):
    """Min-max grid of ``weight`` ``[out, in]`` with groups along the input: ``(q, scales, zeros)``."""
    out, cols = weight.shape
    groups = W.n_groups(cols, group_size)
    size = cols if group_size == -1 else group_size
    flat = weight.reshape(out * groups, size)
    scale, zero = W.minmax_grid(flat, bits, symmetric)
    q = W.quantize(flat, scale, zero, bits).view(out, cols)
    return q, scale.view(out, groups), zero.view(out, groups)


def quantize_linears(model, bits: int, group_size: int = 32, symmetric: bool = True, act_order: bool = False,
                     ignore=("lm_head",)):
    """Replace the selected linears by ``QuantizedLinear`` grids (``act_order``: a random column
    order before grouping, recorded in ``g_idx``, as GPTQ's act-order does)."""
    generator = torch.Generator().manual_seed(1)
    for name, module in select_linears(model, ["*"], list(ignore)).items():
        weight = module.weight.data
        bias = module.bias.data if module.bias is not None else None
        if act_order:
            cols = weight.shape[1]
            order = torch.randperm(cols, generator=generator)
            q_perm, scales, zeros = grid_of(weight[:, order], bits, group_size, symmetric)
            q = torch.empty_like(q_perm)
            q[:, order] = q_perm
            g_idx = torch.empty(cols, dtype=torch.int32)
            g_idx[order] = W.group_index(cols, group_size).to(torch.int32)
            new = W.QuantizedLinear.from_grid(q, scales, zeros, bits=bits, group_size=group_size,
                                              symmetric=symmetric, bias=bias, g_idx=g_idx)
        else:
            q, scales, zeros = grid_of(weight, bits, group_size, symmetric)
            new = W.QuantizedLinear.from_grid(q, scales, zeros, bits=bits, group_size=group_size,
                                              symmetric=symmetric, bias=bias)
        set_module(model, name, new)
    return model


@functools.lru_cache(maxsize=1)
def bpe_tokenizer():
    """A byte-level BPE tokenizer of 384 tokens with real merges (the core's tiny tokenizer has
    none), trained on the bundled calibration text in about a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from pocketlm.data import DEFAULT_CALIBRATION_TEXT, read_text, resolve_text

    text = read_text(resolve_text(DEFAULT_CALIBRATION_TEXT))[:100_000]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


@pytest.fixture
def tokenizer():
    return bpe_tokenizer()


def model_of(family: str = "llama", **sizes):
    """A tiny model (hidden 64, so rows split into 32-column blocks) with random biases where the
    family has them, so a bias lost on the way would show."""
    from pocketlm.testing.models import tiny_model

    model = tiny_model(family, vocab_size=len(bpe_tokenizer()), **sizes)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.3)
            if name.endswith("norm.weight"):
                parameter.uniform_(0.5, 1.5)
    return model


class Recorder:
    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, message: str) -> None:
        self.lines.append(message)

    def text(self) -> str:
        return "\n".join(self.lines)


def export(model, folder, tok=None, recipe=None, **options):
    """Export with the ``gguf`` exporter; returns ``(path of the file, log recorder)``."""
    from pocketlm_gguf import GGUFOptions, export_gguf

    context = make_context(tokenizer=tok)
    context.recipe = recipe or {}
    log = Recorder()
    context.logger = log
    opts = GGUFOptions(**options)
    export_gguf(model, folder, opts, context)
    return folder / opts.filename, log


def reload(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@torch.no_grad()
def relative_logit_error(a, b, ids=None) -> float:
    if ids is None:
        ids = torch.randint(3, a.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    la, lb = a(input_ids=ids).logits, b(input_ids=ids).logits
    return float((la - lb).abs().max() / la.abs().max())


def tensor_types(path) -> dict[str, str]:
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
