"""Tiny randomly initialised models of every built-in family, and a tiny tokenizer.

They build in well under a second, so tests of real algorithms on real architectures stay fast.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

ARCHITECTURES = ("llama", "qwen2", "mistral", "phi3", "gpt2", "opt")
VOCAB = 256


def tiny_config(family: str, *, vocab_size: int = VOCAB, hidden: int = 64, layers: int = 2,
                intermediate: int = 128, heads: int = 4, kv_heads: int = 2):
    """A transformers config for a tiny model of ``family`` (GQA where the family has it)."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, tie_word_embeddings=False)
    if family in ("llama", "mistral", "qwen2"):
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[family]
        return cls(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                   num_attention_heads=heads, num_key_value_heads=kv_heads,
                   max_position_embeddings=1024, **common)
    if family == "phi3":
        return tf.Phi3Config(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=kv_heads,
                             max_position_embeddings=1024, pad_token_id=0, bos_token_id=1,
                             eos_token_id=2, **common)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_inner=intermediate,
                             n_positions=1024, bos_token_id=1, eos_token_id=2, **common)
    if family == "opt":
        return tf.OPTConfig(hidden_size=hidden, ffn_dim=intermediate, num_hidden_layers=layers,
                            num_attention_heads=heads, max_position_embeddings=1024,
                            word_embed_proj_dim=hidden, pad_token_id=0, bos_token_id=1,
                            eos_token_id=2, **common)
    raise ValueError(f"unknown family {family!r}; choose from {ARCHITECTURES}")


def tiny_model(family: str = "llama", *, seed: int = 0, outliers: bool = False, **sizes):
    """A tiny randomly initialised causal LM of ``family`` in float32 eval mode.

    ``outliers`` scales a few hidden channels of every norm (or embedding) up, giving the
    heavy-tailed activations real LLMs have, which activation-aware methods exploit."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family, **sizes)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for parameter in model.parameters():  # a wider init than HF's 0.02 gives livelier outputs
            if parameter.dim() == 2:
                parameter.normal_(0, 0.08)
        if outliers:
            generator = torch.Generator().manual_seed(seed + 1)
            hidden = model.config.hidden_size
            channels = torch.randperm(hidden, generator=generator)[:4]
            for name, module in model.named_modules():
                weight = getattr(module, "weight", None)
                if weight is not None and weight.dim() == 1 and weight.shape[0] == hidden and "norm" in type(module).__name__.lower():
                    weight[channels] *= 20  # RMSNorm and LayerNorm alike, once
    return model.eval()


def tiny_windows(n: int = 8, seq_len: int = 32, *, vocab_size: int = VOCAB, seed: int = 0) -> torch.Tensor:
    """Random token windows ``[n, seq_len]`` for calibration."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (n, seq_len), generator=generator)


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    """A byte-level BPE tokenizer with a vocabulary of 256, trained on the bundled calibration
    text in about a second (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ..data import DEFAULT_CALIBRATION_TEXT, read_text, resolve_text

    text = read_text(resolve_text(DEFAULT_CALIBRATION_TEXT))[:200_000]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def save_tiny_model(folder: Path, family: str = "llama", **kwargs) -> Path:
    """Save a tiny model and the tiny tokenizer as a transformers folder (safetensors)."""
    folder = Path(folder)
    model = tiny_model(family, vocab_size=len(tiny_tokenizer()), **kwargs)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder
