"""Finding and replacing submodules by dotted name, the architecture of a model, and model shells
(a model of a config with no data: every parameter on the meta device)."""

from __future__ import annotations

import contextlib
import fnmatch
from typing import Iterable, Iterator

import torch
from torch import nn

from .components import Architecture
from .errors import PocketError
from .families import BUILTIN_ARCHITECTURES
from .patterns import matches  # noqa: F401  (imported from here by plugins)
from .weights import QuantizedEmbedding, QuantizedLinear, dense_linear, is_linear


def get_module(root: nn.Module, name: str) -> nn.Module:
    """``root``'s submodule at dotted ``name`` ("" is ``root`` itself)."""
    return root.get_submodule(name) if name else root


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace ``root``'s submodule at dotted ``name`` with ``module``."""
    parent_name, _, child = name.rpartition(".")
    setattr(get_module(root, parent_name), child, module)


def find_architecture(model: nn.Module, architectures: Iterable[Architecture]) -> Architecture:
    """The registered architecture whose ``model_types`` holds ``model.config.model_type``; of
    several, the first whose ``layers`` exists in ``model`` (a bare encoder and its masked-LM
    wrapper keep their layers at different paths)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    candidates = [a for a in architectures if model_type in a.model_types]
    for architecture in candidates:
        try:
            get_module(model, architecture.layers)
        except AttributeError:
            continue
        return architecture
    if candidates:
        return candidates[0]
    known = sorted({t for a in architectures for t in a.model_types})
    raise PocketError(
        f"no architecture is registered for model type {model_type!r}",
        fix="register one through the register_architectures hook (see docs/plugin-api.md); "
        f"known model types: {', '.join(known)}",
    )


def is_encoder(model: nn.Module, architectures: Iterable[Architecture]) -> bool:
    """Whether ``model``'s registered architecture is an encoder (False when none is registered)."""
    try:
        return find_architecture(model, architectures).encoder
    except PocketError:
        return False


def decoder_layers(model: nn.Module, architecture: Architecture) -> nn.ModuleList:
    return get_module(model, architecture.layers)


def select_linears(model: nn.Module, targets: Iterable[str], ignore: Iterable[str]) -> dict[str, nn.Module]:
    """Linear modules whose names match ``targets`` and none of ``ignore``."""
    targets, ignore = list(targets), list(ignore)
    return {
        name: module
        for name, module in model.named_modules()
        if name and is_linear(module) and matches(name, targets) and not matches(name, ignore)
    }


def auto_class(config):
    """The transformers auto class that builds a model of ``config``: the masked-LM class when
    its ``architectures`` name one (``BertForMaskedLM``), the bare model class when they name
    one (``BertModel``: a sentence encoder has no head), else the causal-LM class."""
    import transformers

    names = list(getattr(config, "architectures", None) or [])
    if any(n.endswith("ForMaskedLM") for n in names):
        return transformers.AutoModelForMaskedLM
    if any(n.endswith("Model") and not n.endswith("LMHeadModel") for n in names):
        return transformers.AutoModel
    return transformers.AutoModelForCausalLM


def dense_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every quantized module replaced by its dense equivalent (pruned
    weights are zeros already): what an exporter writing float weights starts from."""
    import copy

    dense = copy.deepcopy(model)
    for name, module in list(dense.named_modules()):
        if isinstance(module, QuantizedEmbedding):
            table = nn.Embedding(module.num_embeddings, module.embedding_dim, padding_idx=module.padding_idx)
            table.weight.data.copy_(module.dequantize())
            set_module(dense, name, table)
        elif isinstance(module, QuantizedLinear):
            set_module(dense, name, dense_linear(module))
    return dense


# ------------------------------------------------------------------------- model shells


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules whose parameters live on the meta device (no memory) while their buffers
    (rotary tables, say) are computed for real, as they would be by a normal build."""
    original = nn.Module.register_parameter

    def register(module, name, parameter):
        original(module, name, parameter)
        if parameter is not None:
            module._parameters[name] = nn.Parameter(parameter.to("meta"), requires_grad=parameter.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def build_shell(config, dtype: torch.dtype) -> nn.Module:
    """A model of ``config`` with every parameter on the meta device."""
    with parameters_on_meta():
        model = auto_class(config).from_config(config, dtype=dtype)
    return model.eval()


def find_layers_path(model: nn.Module) -> str:
    """Where the decoder layers are: the built-in family's table, else the longest ModuleList."""
    try:
        return find_architecture(model, BUILTIN_ARCHITECTURES).layers
    except PocketError:
        lists = [(len(m), n) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
        return max(lists)[1]
