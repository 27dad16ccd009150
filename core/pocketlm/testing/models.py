"""Tiny randomly initialised models of every built-in family, and a tiny tokenizer.

They build in well under a second, so tests of real algorithms on real architectures stay fast.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

ARCHITECTURES = ("llama", "qwen2", "mistral", "phi3", "gpt2", "opt")
#: Encoder families: a bare model (sentence embeddings) and masked-LM wrappers.
ENCODERS = ("bert", "bert-mlm", "roberta", "distilbert", "distilbert-mlm")
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
    if family in ("bert", "bert-mlm", "roberta"):
        cls = tf.RobertaConfig if family == "roberta" else tf.BertConfig
        return cls(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                   num_attention_heads=heads, max_position_embeddings=514, pad_token_id=0,
                   architectures=["BertForMaskedLM" if family == "bert-mlm" else cls.__name__.replace("Config", "Model")],
                   **common)
    if family in ("distilbert", "distilbert-mlm"):
        return tf.DistilBertConfig(dim=hidden, hidden_dim=intermediate, n_layers=layers, n_heads=heads,
                                   max_position_embeddings=512, pad_token_id=0,
                                   architectures=["DistilBertForMaskedLM" if family.endswith("mlm") else "DistilBertModel"],
                                   **common)
    if family == "mobilebert":   # the published layout, narrowed: 4 feed-forward networks, shared q/k bottleneck
        return tf.MobileBertConfig(hidden_size=hidden, embedding_size=hidden // 2, intra_bottleneck_size=hidden // 2,
                                   true_hidden_size=hidden // 2, num_hidden_layers=layers, num_attention_heads=heads,
                                   intermediate_size=intermediate // 2, num_feedforward_networks=4,
                                   max_position_embeddings=512, pad_token_id=0, architectures=["MobileBertModel"],
                                   **common)
    raise ValueError(f"unknown family {family!r}; choose from {ARCHITECTURES + ENCODERS + ('mobilebert',)}")


def tiny_model(family: str = "llama", *, seed: int = 0, outliers: bool = False, **sizes):
    """A tiny randomly initialised model of ``family`` in float32 eval mode: a causal LM, or an
    encoder (``ENCODERS``: the bare model, or its masked-LM wrapper for ``*-mlm``).

    ``outliers`` scales a few hidden channels of every norm (or embedding) up, giving the
    heavy-tailed activations real LLMs have, which activation-aware methods exploit."""
    from ..modules import auto_class

    torch.manual_seed(seed)
    config = tiny_config(family, **sizes)
    model = auto_class(config).from_config(config, dtype=torch.float32)
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


@functools.lru_cache(maxsize=2)
def tiny_tokenizer(encoder: bool = False):
    """A byte-level BPE tokenizer with a vocabulary of 256, trained on the bundled calibration
    text in about a second (no download). ``encoder``: BERT's special tokens (``[PAD]`` is id 0)
    and ``[CLS] ... [SEP]`` around every sentence."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from ..data import DEFAULT_CALIBRATION_TEXT, read_text, resolve_text

    text = read_text(resolve_text(DEFAULT_CALIBRATION_TEXT))[:200_000]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] if encoder else ["<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)], trainer)
    if encoder:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                       cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def save_tiny_model(folder: Path, family: str = "llama", **kwargs) -> Path:
    """Save a tiny model and the tiny tokenizer as a transformers folder (safetensors)."""
    folder = Path(folder)
    tokenizer = tiny_tokenizer(encoder=family in ENCODERS or family == "mobilebert")
    model = tiny_model(family, vocab_size=len(tokenizer), **kwargs)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
