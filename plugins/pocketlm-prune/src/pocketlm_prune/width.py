"""Width pruning (Minitron style): remove MLP channels and attention heads, physically.

Importance comes from activations on calibration data:

* an MLP channel: mean ``|a|`` of the intermediate activation ``a`` (the input of ``mlp_out``)
  over all calibration tokens;
* an attention head: mean over tokens of the L2 norm of the head's slice of the attention
  output (the input of ``o_proj``); a key/value group's importance is the sum over its query
  heads, and a group is removed together with its query heads (GQA-aware).

Every layer loses the same number of channels and groups (transformers needs one shape per
model); each layer picks its own least important ones. The Linear weights are sliced (rows of
``mlp_in``: both halves of a fused gate/up; columns of ``mlp_out``; q/k/v rows and ``o_proj``
columns, fused q/k/v included) and the config is updated, with ``head_dim`` written
explicitly so it stays the same. The result loads with plain transformers.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from pocketlm import PocketError, require_whole_model
from pocketlm.calibration import LayerHandler, module_input
from pocketlm.modules import decoder_layers, get_module, set_module
from pocketlm.weights import get_mask, is_quantized, is_transposed, linear_bias, linear_shape, linear_weight, set_mask

# the options, effect and plan live in the light module (registration reads them without torch)
from .options import WidthOptions
from .options import width_effect as effect, width_plan as plan  # noqa: F401


# ------------------------------------------------------------------------- pure tensors


def channel_importance(intermediate: torch.Tensor) -> torch.Tensor:
    """Sum of ``|a|`` per channel of activations ``[..., channels]`` (divide by tokens for the mean)."""
    return intermediate.detach().reshape(-1, intermediate.shape[-1]).float().abs().sum(dim=0)


def head_importance(attn_output: torch.Tensor, heads: int) -> torch.Tensor:
    """Sum over tokens of each head's output norm, from ``o_proj``'s input ``[..., heads * d]``."""
    x = attn_output.detach().reshape(-1, heads, attn_output.shape[-1] // heads).float()
    return x.norm(dim=-1).sum(dim=0)


def group_importance(per_head: torch.Tensor, kv_groups: int) -> torch.Tensor:
    """Importance of each key/value group: the sum over the query heads that read it
    (query head ``h`` reads group ``h // (heads / kv_groups)``, transformers' ``repeat_kv``)."""
    return per_head.view(kv_groups, -1).sum(dim=1)


def keep_top(importance: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` most important entries, in their original order."""
    return torch.sort(torch.topk(importance, keep).indices).values


def head_rows(groups: torch.Tensor, heads_per_group: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(query rows, key/value rows) of the kept ``groups``."""
    device = groups.device
    heads = (groups.view(-1, 1) * heads_per_group + torch.arange(heads_per_group, device=device)).flatten()
    q = (heads.view(-1, 1) * head_dim + torch.arange(head_dim, device=device)).flatten()
    kv = (groups.view(-1, 1) * head_dim + torch.arange(head_dim, device=device)).flatten()
    return q, kv


def slice_linear(module: nn.Module, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Module:
    """A new linear of the same kind (``nn.Linear`` or ``Conv1D``) holding the given output
    ``rows`` and input ``cols`` of ``module`` (its bias and sparsity mask follow)."""
    if is_quantized(module):
        raise PocketError("width pruning must run before quantization")
    weight = linear_weight(module)
    bias = linear_bias(module)
    mask = get_mask(module)
    if rows is not None:
        weight, bias = weight[rows], None if bias is None else bias[rows]
        mask = None if mask is None else mask[rows]
    if cols is not None:
        weight = weight[:, cols]
        mask = None if mask is None else mask[:, cols]
    out_features, in_features = weight.shape
    factory = dict(dtype=weight.dtype, device=weight.device)
    if is_transposed(module):
        with torch.device(weight.device):              # Conv1D takes no device argument
            new = type(module)(out_features, in_features)  # Conv1D(nf=out, nx=in), weight [in, out]
        new.to(**factory)
        new.weight.data.copy_(weight.t())
        new.bias.data.copy_(bias if bias is not None else torch.zeros(out_features, **factory))
    else:
        new = nn.Linear(in_features, out_features, bias=bias is not None, **factory)
        new.weight.data.copy_(weight)
        if bias is not None:
            new.bias.data.copy_(bias)
    new.train(module.training)
    if mask is not None:
        set_mask(new, mask)
    return new


# ---------------------------------------------------------------------------- the model


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def _set_ints(module: nn.Module, names: tuple[str, ...], value: int) -> None:
    for attr in names:
        if isinstance(getattr(module, attr, None), int) and not isinstance(getattr(module, attr), bool):
            setattr(module, attr, value)


class Shapes:
    """Head and channel counts of a model, read through its architecture table."""

    def __init__(self, model: nn.Module, arch):
        config, att = model.config, arch.attention
        self.arch, self.config = arch, config
        layer = decoder_layers(model, arch)[0]
        self.intermediate = linear_shape(get_module(layer, arch.mlp_out))[1]
        self.heads = getattr(config, att["heads_key"]) if "heads_key" in att else None
        kv_key = att.get("kv_heads_key")
        self.kv = getattr(config, kv_key, None) if kv_key else None
        self.kv = self.kv or self.heads
        if self.heads:
            o_in = linear_shape(get_module(layer, att["o"]))[1]
            self.head_dim = o_in // self.heads


def _common_parent(names: list[str]) -> str:
    """The deepest module that holds every one of ``names`` (``attention`` for BERT's
    ``attention.self.query`` and ``attention.output.dense``)."""
    parts = [name.split(".")[:-1] for name in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common)


def _build_empty(cls, config) -> nn.Module:
    """A module of ``cls`` made from ``config`` on the meta device (shapes only, no memory), the
    way transformers builds it when it loads a model."""
    with torch.device("meta"):
        try:
            return cls(config, layer_idx=0)
        except TypeError:  # encoders (DistilBERT) take no layer index
            return cls(config)


def _check_heads_loadable(model: nn.Module, arch, shapes: Shapes, heads: int, kv: int) -> None:
    """Build a fresh attention module from the updated config and make sure transformers would
    give it the sliced shapes; families whose attention derives the head width from
    ``hidden_size / heads`` (GPT-2, OPT, BERT, DistilBERT) fail here."""
    att = arch.attention
    layer = decoder_layers(model, arch)[0]
    projections = {key: att[key] for key in ("q", "k", "v", "o", "qkv") if key in att}
    attention_name = _common_parent(list(projections.values()))
    attention = get_module(layer, attention_name) if attention_name else layer
    config = copy.deepcopy(model.config)
    setattr(config, att["heads_key"], heads)
    if att.get("kv_heads_key"):
        setattr(config, att["kv_heads_key"], kv)
    config.head_dim = shapes.head_dim
    hidden = shapes.config.hidden_size
    expect = {att["o"]: (hidden, heads * shapes.head_dim)}
    if "qkv" in att:
        expect[att["qkv"]] = ((heads + 2 * kv) * shapes.head_dim, hidden)
    else:
        expect.update({att["q"]: (heads * shapes.head_dim, hidden), att["k"]: (kv * shapes.head_dim, hidden),
                       att["v"]: (kv * shapes.head_dim, hidden)})
    problem = None
    try:
        probe = _build_empty(type(attention), config)
        prefix = attention_name + "." if attention_name else ""
        for name, shape in expect.items():
            got = tuple(linear_shape(get_module(probe, name[len(prefix):])))
            if got != shape:
                problem = f"{name} would load as {got} instead of {shape}"
                break
    except Exception as exc:  # noqa: BLE001 - any failure means transformers cannot load the result
        problem = f"{type(exc).__name__}: {exc}"
    if problem:
        raise PocketError(
            f"head pruning is not possible for model type {model.config.model_type!r}: its attention derives "
            f"the head width from hidden_size / heads and its config cannot state another, so transformers "
            f"could not load a head-pruned model ({problem})", field="head_ratio",
            fix="prune MLP channels only (mlp_ratio / intermediate_size) for this family, or whole layers "
            "with prune-depth")


class _Importance(LayerHandler):
    """Read-only layer handler that sums channel and head importance per layer."""

    def __init__(self, arch, shapes: Shapes, mlp: bool, heads: bool):
        self.arch, self.shapes, self.mlp, self.heads = arch, shapes, mlp, heads
        self.channels: list[torch.Tensor] = []
        self.groups: list[torch.Tensor] = []
        self._sums: dict[str, torch.Tensor] = {}
        self._tokens = 0

    def select(self, index, layer, names):
        wanted = ([self.arch.mlp_out] if self.mlp else []) + ([self.arch.attention["o"]] if self.heads else [])
        return wanted

    def observe(self, name, module, args, kwargs, output):
        x = module_input(args, kwargs)
        if name == self.arch.mlp_out and self.mlp:
            value = channel_importance(x)
            self._tokens += x.reshape(-1, x.shape[-1]).shape[0]
            self._sums["mlp"] = self._sums["mlp"] + value if "mlp" in self._sums else value
        if self.heads and name == self.arch.attention["o"]:
            value = head_importance(x, self.shapes.heads)
            self._sums["heads"] = self._sums["heads"] + value if "heads" in self._sums else value

    def solve(self, index, layer, names):
        if self.mlp:
            self.channels.append(self._sums["mlp"] / max(self._tokens, 1))
        if self.heads:
            self.groups.append(group_importance(self._sums["heads"], self.shapes.kv))
        self._sums, self._tokens = {}, 0


def prune_mlp(layer: nn.Module, arch, keep: torch.Tensor, intermediate: int) -> None:
    """Keep intermediate channels ``keep`` of one decoder layer."""
    for name in arch.mlp_in:
        rows = torch.cat([keep, keep + intermediate]) if arch.mlp_fused_gate_up else keep
        set_module(layer, name, slice_linear(get_module(layer, name), rows=rows))
    set_module(layer, arch.mlp_out, slice_linear(get_module(layer, arch.mlp_out), cols=keep))
    _set_ints(get_module(layer, _parent(arch.mlp_out)), ("intermediate_size", "ffn_dim"), len(keep))


def prune_heads(layer: nn.Module, arch, keep_groups: torch.Tensor, shapes: Shapes) -> None:
    """Keep key/value groups ``keep_groups`` (and their query heads) of one decoder layer."""
    att, d = arch.attention, shapes.head_dim
    per_group = shapes.heads // shapes.kv
    q_rows, kv_rows = head_rows(keep_groups, per_group, d)
    if "qkv" in att:
        rows = torch.cat([q_rows, shapes.heads * d + kv_rows, (shapes.heads + shapes.kv) * d + kv_rows])
        set_module(layer, att["qkv"], slice_linear(get_module(layer, att["qkv"]), rows=rows))
    else:
        set_module(layer, att["q"], slice_linear(get_module(layer, att["q"]), rows=q_rows))
        for key in ("k", "v"):
            set_module(layer, att[key], slice_linear(get_module(layer, att[key]), rows=kv_rows))
    set_module(layer, att["o"], slice_linear(get_module(layer, att["o"]), cols=q_rows))
    attention = get_module(layer, _parent(att["o"]))
    _set_ints(attention, ("num_heads", "num_attention_heads"), len(keep_groups) * per_group)
    _set_ints(attention, ("num_key_value_heads", "num_kv_heads"), len(keep_groups))


class WidthPruner:
    def __init__(self, options: WidthOptions, context):
        self.options, self.context = options, context

    def targets(self, shapes: Shapes) -> tuple[int | None, int | None]:
        """(intermediate channels kept, key/value groups kept), None where unchanged."""
        o = self.options
        inter = o.intermediate_size
        if o.mlp_ratio is not None:
            inter = shapes.intermediate - round(shapes.intermediate * o.mlp_ratio)
        if inter is not None and not 0 < inter <= shapes.intermediate:
            raise PocketError(f"intermediate_size must be in 1..{shapes.intermediate}", field="intermediate_size")
        kv = o.kv_heads
        if o.head_ratio is not None:
            kv = shapes.kv - round(shapes.kv * o.head_ratio) if shapes.kv else None
        if kv is not None:
            if not shapes.heads:
                raise PocketError("this architecture table names no head-count config key", field="head_ratio")
            if not 0 < kv <= shapes.kv:
                raise PocketError(f"kv_heads must be in 1..{shapes.kv}", field="kv_heads")
        return (None if inter == shapes.intermediate else inter), (None if kv == shapes.kv else kv)

    def __call__(self, model: nn.Module) -> nn.Module:
        arch = self.context.architecture(model)
        if not arch.mlp_in or not arch.mlp_out:
            # MobileBERT: bottlenecks and stacked feed-forward networks, no single MLP to narrow
            raise PocketError(f"architecture {arch.name!r} names no MLP input and output linears "
                              "(Architecture.mlp_in / mlp_out), so prune-width has no channels to remove",
                              fix="prune whole layers (prune-depth) or prune unstructured (wanda, sparsegpt)")
        shapes = Shapes(model, arch)
        inter, kv = self.targets(shapes)
        if inter is None and kv is None:
            self.context.log("prune-width: nothing to remove")
            return model
        heads = kv * (shapes.heads // shapes.kv) if kv is not None else None
        if kv is not None:
            _check_heads_loadable(model, arch, shapes, heads, kv)
        importance = _Importance(arch, shapes, inter is not None, kv is not None)
        self.context.walk(model, importance, sequential=False, description="width importance")
        before = sum(p.numel() for p in model.parameters())
        for index, layer in enumerate(decoder_layers(model, arch)):
            if inter is not None:
                prune_mlp(layer, arch, keep_top(importance.channels[index], inter), shapes.intermediate)
            if kv is not None:
                prune_heads(layer, arch, keep_top(importance.groups[index], kv), shapes)
        config = model.config
        if inter is not None:
            setattr(config, arch.intermediate_size_key, inter)
        if kv is not None:
            setattr(config, arch.attention["heads_key"], heads)
            if arch.attention.get("kv_heads_key"):
                setattr(config, arch.attention["kv_heads_key"], kv)
            config.head_dim = shapes.head_dim
        after = sum(p.numel() for p in model.parameters())
        self.context.log(f"prune-width: intermediate {shapes.intermediate}->{inter or shapes.intermediate}, "
                         f"kv groups {shapes.kv}->{kv or shapes.kv}; parameters {before:,} -> {after:,}")
        return model


def compress(model: nn.Module, options: WidthOptions, context) -> nn.Module:
    require_whole_model(model, "prune-width (it reshapes every layer and the config together)",
                        fix='set offload = "none" in [model]')
    return WidthPruner(options, context)(model)
