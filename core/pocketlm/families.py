"""The model families pocketlm knows out of the box, as data (no code branches per family).

The built-in plugin :mod:`pocketlm.builtins.architectures` registers them; a plugin adds a family
by registering another ``Architecture`` through ``register_architectures``. They live outside the
built-in plugins so that core modules (:func:`pocketlm.modules.find_layers_path`) can read them."""

from __future__ import annotations

from .components import Architecture, Smooth

_Q, _K, _V, _O = "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"
_GATE, _UP, _DOWN = "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"
_GQA_HEADS = {"heads_key": "num_attention_heads", "kv_heads_key": "num_key_value_heads"}

LLAMA = Architecture(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3", "granite"),
    layers="model.layers",
    embed="model.embed_tokens",
    lm_head="lm_head",
    final_norm="model.norm",
    sequential=((_Q, _K, _V), (_O,), (_GATE, _UP), (_DOWN,)),
    smooth=(
        Smooth("input_layernorm", (_Q, _K, _V), block="self_attn"),
        Smooth(_V, (_O,)),
        Smooth("post_attention_layernorm", (_GATE, _UP), block="mlp"),
        Smooth(_UP, (_DOWN,)),
    ),
    mlp_in=(_GATE, _UP),
    mlp_out=_DOWN,
    attention={"q": _Q, "k": _K, "v": _V, "o": _O, **_GQA_HEADS},
)

PHI3 = Architecture(
    name="phi3",
    model_types=("phi3",),
    layers="model.layers",
    embed="model.embed_tokens",
    lm_head="lm_head",
    final_norm="model.norm",
    sequential=(("self_attn.qkv_proj",), (_O,), ("mlp.gate_up_proj",), (_DOWN,)),
    smooth=(
        Smooth("input_layernorm", ("self_attn.qkv_proj",), block="self_attn"),
        Smooth("post_attention_layernorm", ("mlp.gate_up_proj",), block="mlp"),
        Smooth("mlp.gate_up_proj", (_DOWN,), prev_rows="second_half"),
    ),
    mlp_in=("mlp.gate_up_proj",),
    mlp_out=_DOWN,
    mlp_fused_gate_up=True,
    attention={"qkv": "self_attn.qkv_proj", "o": _O, **_GQA_HEADS},
)

GPT2 = Architecture(
    name="gpt2",
    model_types=("gpt2",),
    layers="transformer.h",
    embed="transformer.wte",
    extra_embeddings=("transformer.wpe",),
    lm_head="lm_head",
    final_norm="transformer.ln_f",
    sequential=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
    # GELU is not positively homogeneous, so no scale folds from c_fc into mlp.c_proj.
    smooth=(
        Smooth("ln_1", ("attn.c_attn",), block="attn"),
        Smooth("ln_2", ("mlp.c_fc",), block="mlp"),
    ),
    mlp_in=("mlp.c_fc",),
    mlp_out="mlp.c_proj",
    attention={"qkv": "attn.c_attn", "o": "attn.c_proj", "heads_key": "n_head"},
    layer_count_key="n_layer",
    intermediate_size_key="n_inner",
)

_OQ, _OK, _OV, _OO = "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"
OPT = Architecture(
    name="opt",
    model_types=("opt",),
    layers="model.decoder.layers",
    embed="model.decoder.embed_tokens",
    extra_embeddings=("model.decoder.embed_positions",),
    lm_head="lm_head",
    final_norm="model.decoder.final_layer_norm",
    sequential=((_OQ, _OK, _OV), (_OO,), ("fc1",), ("fc2",)),
    # ReLU is positively homogeneous, so fc1 -> fc2 folds exactly.
    smooth=(
        Smooth("self_attn_layer_norm", (_OQ, _OK, _OV), block="self_attn"),
        Smooth(_OV, (_OO,)),
        Smooth("final_layer_norm", ("fc1",)),
        Smooth("fc1", ("fc2",)),
    ),
    mlp_in=("fc1",),
    mlp_out="fc2",
    attention={"q": _OQ, "k": _OK, "v": _OV, "o": _OO, "heads_key": "num_attention_heads"},
    intermediate_size_key="ffn_dim",
)


_BQ, _BK, _BV = "attention.self.query", "attention.self.key", "attention.self.value"
_BO, _BIN, _BOUT = "attention.output.dense", "intermediate.dense", "output.dense"


def _bert(name: str, model_types: tuple[str, ...], prefix: str = "", head: str = "") -> Architecture:
    """The BERT layout (BERT, MiniLM, BGE, RoBERTa), under ``prefix`` ("" for the bare model,
    "bert." inside a masked-LM wrapper). Post-norm: each LayerNorm also normalizes the residual,
    so no scale folds through one; only v -> o folds exactly (attention is linear in v)."""
    return Architecture(
        name=name,
        model_types=model_types,
        layers=prefix + "encoder.layer",
        embed=prefix + "embeddings.word_embeddings",
        extra_embeddings=(prefix + "embeddings.position_embeddings", prefix + "embeddings.token_type_embeddings"),
        lm_head=head,
        final_norm="",
        sequential=((_BQ, _BK, _BV), (_BO,), (_BIN,), (_BOUT,)),
        smooth=(Smooth(_BV, (_BO,)),),
        mlp_in=(_BIN,),
        mlp_out=_BOUT,
        attention={"q": _BQ, "k": _BK, "v": _BV, "o": _BO, "heads_key": "num_attention_heads"},
        encoder=True,
    )


def _distilbert(name: str, prefix: str = "", head: str = "") -> Architecture:
    q, k, v, o = "attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin"
    return Architecture(
        name=name,
        model_types=("distilbert",),
        layers=prefix + "transformer.layer",
        embed=prefix + "embeddings.word_embeddings",
        extra_embeddings=(prefix + "embeddings.position_embeddings",),
        lm_head=head,
        final_norm="",
        sequential=((q, k, v), (o,), ("ffn.lin1",), ("ffn.lin2",)),
        smooth=(Smooth(v, (o,)),),
        mlp_in=("ffn.lin1",),
        mlp_out="ffn.lin2",
        attention={"q": q, "k": k, "v": v, "o": o, "heads_key": "n_heads"},
        layer_count_key="n_layers",
        intermediate_size_key="hidden_dim",
        encoder=True,
    )


def _mobilebert(name: str, prefix: str = "", head: str = "") -> Architecture:
    """MobileBERT with its published layout (4 feed-forward networks per layer, shared q/k
    bottleneck): q and k read the bottleneck's output, v reads the layer input with the two
    bottleneck projections. NoNorm and the bottlenecks leave no exact scale fold (``smooth`` is
    empty) and no plain MLP to narrow (``mlp_in``/``mlp_out`` are empty); methods that need
    either say so."""
    ffn = tuple((f"ffn.{i}.intermediate.dense",) for i in range(3)), tuple((f"ffn.{i}.output.dense",) for i in range(3))
    return Architecture(
        name=name,
        model_types=("mobilebert",),
        layers=prefix + "encoder.layer",
        embed=prefix + "embeddings.word_embeddings",
        extra_embeddings=(prefix + "embeddings.position_embeddings", prefix + "embeddings.token_type_embeddings"),
        lm_head=head,
        final_norm="",
        sequential=(("bottleneck.input.dense", "bottleneck.attention.dense", _BV), (_BQ, _BK), (_BO,),
                    *[group for pair in zip(*ffn) for group in pair],
                    (_BIN,), (_BOUT,), ("output.bottleneck.dense",)),
        encoder=True,
    )


BERT = _bert("bert", ("bert",))
BERT_MLM = _bert("bert-mlm", ("bert",), "bert.", "cls.predictions.decoder")
ROBERTA = _bert("roberta", ("roberta", "xlm-roberta"))
ROBERTA_MLM = _bert("roberta-mlm", ("roberta", "xlm-roberta"), "roberta.", "lm_head.decoder")
DISTILBERT = _distilbert("distilbert")
DISTILBERT_MLM = _distilbert("distilbert-mlm", "distilbert.", "vocab_projector")
MOBILEBERT = _mobilebert("mobilebert")
MOBILEBERT_MLM = _mobilebert("mobilebert-mlm", "mobilebert.", "cls.predictions.decoder")

#: Every family above, in the order they are registered (and tried).
BUILTIN_ARCHITECTURES = (LLAMA, PHI3, GPT2, OPT, BERT, BERT_MLM, ROBERTA, ROBERTA_MLM, DISTILBERT, DISTILBERT_MLM,
                         MOBILEBERT, MOBILEBERT_MLM)
