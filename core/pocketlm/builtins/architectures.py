"""The model families pocketlm knows out of the box, as data (no code branches per family).

A plugin adds a family by registering another ``Architecture`` through
``register_architectures``."""

from __future__ import annotations

from .. import hookimpl
from ..components import Architecture, Smooth

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


@hookimpl
def register_architectures(register):
    for architecture in (LLAMA, PHI3, GPT2, OPT):
        register(architecture)
