"""rtn and gptq give the same grids, bit for bit, as before they were moved onto the core's
quantizer kit (``pocketlm.quant``).

Each case compresses a tiny model (or one random matrix) and hashes every tensor of the result.
The expected digests were produced by the code before the move (pocketlm-gptq 0.3.2), on CPU in
float32; a change in any grid, scale, zero point, mask or bias changes the digest. GPTQ's
digests of a whole model depend on the CPU's float32 rounding too (its Hessians come from the
model's forward passes), so they are pinned per float platform (``pocketlm.testing.float_platform``):
the move's on the machine it ran on, the same code's on each platform since.
"""

from __future__ import annotations

import pytest
import torch

from pocketlm.testing import assert_pinned, digest, float_platform, make_context, model_digest
from pocketlm.testing.models import tiny_model, tiny_windows
from pocketlm.weights import linear_shape, set_mask
from pocketlm_gptq.gptq import GPTQOptions, compress_gptq, gptq_quantize, hessian_update
from pocketlm_gptq.rtn import RTNOptions, compress_rtn, rtn_quantize


def _pruned(model, seed=5):
    """Half the weights of every second decoder linear masked (as a pruning stage leaves them)."""
    generator = torch.Generator().manual_seed(seed)
    for i, (name, module) in enumerate((n, m) for n, m in model.named_modules() if ".layers." in n or ".h." in n):
        if hasattr(module, "weight") and module.weight.dim() == 2 and "norm" not in name and i % 2 == 0:
            try:
                shape = linear_shape(module)
            except AttributeError:
                continue
            set_mask(module, torch.rand(shape, generator=generator) > 0.5)
    return model


def _tied(model):
    model.lm_head.weight = model.model.embed_tokens.weight
    model.config.tie_word_embeddings = True
    return model


MODELS = {
    "llama": lambda: tiny_model("llama"),
    "gpt2": lambda: tiny_model("gpt2"),
    "opt-pruned": lambda: _pruned(tiny_model("opt")),
    "llama-pruned": lambda: _pruned(tiny_model("llama", seed=3)),
    "llama-tied": lambda: _tied(tiny_model("llama", seed=1)),
}

RTN_CASES = {
    "w4g32-sym": ("llama", dict(bits=4, group_size=32)),
    "w3g64-asym": ("llama", dict(bits=3, group_size=64, symmetric=False)),
    "w8-channel": ("gpt2", dict(bits=8, group_size=-1)),
    "w2g16-asym-pruned": ("opt-pruned", dict(bits=2, group_size=16, symmetric=False)),
    "w4g32-weighted-mse": ("llama", dict(bits=4, group_size=32, grid="weighted-mse")),
    "w4g32-q4_k": ("llama-pruned", dict(bits=4, group_size=32, grid="q4_k")),
    "w6g16-q6_k-gpt2": ("gpt2", dict(bits=6, group_size=16, grid="q6_k")),
    "w4g32-embed-head-tied": ("llama-tied", dict(bits=4, group_size=32, targets=["*", "embed"], ignore=[])),
    "w8g32-embed-only": ("llama", dict(bits=8, group_size=32, targets=["embed"], ignore=[])),
    "w4g32-head-untied": ("llama", dict(bits=4, group_size=32, targets=["*"], ignore=["embed"])),
    "w4g128-partial": ("llama", dict(bits=4, group_size=128, allow_partial_group=True)),
}

GPTQ_CASES = {
    "w4g32-act-order": ("llama", dict(bits=4, group_size=32)),
    "w4g32-natural": ("llama", dict(bits=4, group_size=32, act_order=False)),
    "w3g64-asym-act-order": ("llama", dict(bits=3, group_size=64, symmetric=False)),
    "w3g64-asym-natural": ("gpt2", dict(bits=3, group_size=64, symmetric=False, act_order=False)),
    "w8-channel-natural": ("llama", dict(bits=8, group_size=-1, act_order=False)),
    "w4g32-pruned-act-order": ("llama-pruned", dict(bits=4, group_size=32)),
    "w2g16-asym-pruned-natural": ("opt-pruned", dict(bits=2, group_size=16, symmetric=False, act_order=False)),
    "w4g32-weighted-mse-act-order": ("llama", dict(bits=4, group_size=32, grid="weighted-mse")),
    "w4g32-weighted-mse-natural": ("llama", dict(bits=4, group_size=32, grid="weighted-mse", act_order=False)),
    "w4g32-q4_k-act-order": ("llama", dict(bits=4, group_size=32, grid="q4_k")),
    "w5g32-q5_k-natural": ("gpt2", dict(bits=5, group_size=32, grid="q5_k", act_order=False)),
    "w4g32-not-sequential": ("llama", dict(bits=4, group_size=32, true_sequential=False)),
    # head = "round": the head's grid as before 0.6 (the solved head is checked by its error, test_methods.py)
    "w4g32-embed-head-tied": ("llama-tied", dict(bits=4, group_size=32, targets=["*", "embed"], ignore=[],
                                                 head="round")),
    "w4g32-head-untied": ("llama", dict(bits=4, group_size=32, targets=["*"], ignore=["embed"], head="round")),
}

@pytest.fixture(autouse=True)
def one_thread():
    """Digests are of one-thread runs: a float sum may round differently when split otherwise."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


EXPECTED_RTN = {
    'w2g16-asym-pruned': '06b7fec783c31e0c',
    'w3g64-asym': '018722ead25bb6da',
    'w4g128-partial': 'dc5badaccdb2ccbf',
    'w4g32-embed-head-tied': '6c5929b7fe442640',
    'w4g32-head-untied': 'c643e508a5267cc0',
    'w4g32-q4_k': '4f110cf37558c63c',
    'w4g32-sym': '6fc1234c0f97bc2b',
    'w4g32-weighted-mse': 'b2cc283c0a129bd7',
    'w6g16-q6_k-gpt2': 'a0e52228068d630b',
    'w8-channel': 'ec04a9d53785fc97',
    'w8g32-embed-only': 'b45dd7ccd18dd9ca',
}
EXPECTED_GPTQ = {
    'w2g16-asym-pruned-natural': 'a2f6555816cde14e',
    'w3g64-asym-act-order': 'f983b2566cdb44fa',
    'w3g64-asym-natural': '146d5bc07020bf24',
    'w4g32-act-order': '38a322a40b6cfd74',
    'w4g32-embed-head-tied': '3a8a1d847de36e8d',
    'w4g32-head-untied': '139dad67052c0997',
    'w4g32-natural': 'd7ce94005148d4f8',
    'w4g32-not-sequential': '67171dbd7bf744c9',
    'w4g32-pruned-act-order': '1767a25ad0d8d5c7',
    'w4g32-q4_k-act-order': '0a80e54c76a7f7fd',
    'w4g32-weighted-mse-act-order': '0a80e54c76a7f7fd',
    'w4g32-weighted-mse-natural': '8924ce4120c51ff3',
    'w5g32-q5_k-natural': 'd7c04e27af148909',
    'w8-channel-natural': 'c3e2099f10480910',
}
BEFORE = "pocketlm-gptq 0.3.2, before the move (an AVX-512 CPU; no platform string kept)"
# The same code on other float platforms: only the cases whose digest differs from the move's
EXPECTED_GPTQ_ON = {
    "torch 2.13.0+cpu, 1 thread(s), products 7090f477": {
        'w2g16-asym-pruned-natural': '705499dd7b66d674',
        'w3g64-asym-natural': 'd12c171365c7cd9f',
        'w4g32-natural': 'db90e2e7d495f0f7',
    },
}
EXPECTED_MATRIX = {
    'gptq-None-act-order-dense': '52b81071798e86bf',
    'gptq-None-act-order-masked': 'e1a55569af50fc05',
    'gptq-None-natural-dense': '3bb8a1d230b4eaaa',
    'gptq-None-natural-masked': '98e18f3299481fe7',
    'gptq-minmax-act-order-dense': '52b81071798e86bf',
    'gptq-minmax-act-order-masked': 'e1a55569af50fc05',
    'gptq-minmax-natural-dense': '0bec4b7290c27000',
    'gptq-minmax-natural-masked': 'd85253d531a9a5ae',
    'gptq-q4_k-act-order-dense': 'e60b5830aff7bb04',
    'gptq-q4_k-act-order-masked': 'a4ffcad9be071614',
    'gptq-q4_k-natural-dense': '79bfe429e37b1218',
    'gptq-q4_k-natural-masked': 'dbb0e5922e5afd62',
    'gptq-weighted-mse-act-order-dense': 'e60b5830aff7bb04',
    'gptq-weighted-mse-act-order-masked': 'a4ffcad9be071614',
    'gptq-weighted-mse-natural-dense': '79bfe429e37b1218',
    'gptq-weighted-mse-natural-masked': 'dbb0e5922e5afd62',
    'rtn-None---dense': 'ac534ea6fe460727',
    'rtn-None---masked': 'a5e9f625b2f5c55c',
    'rtn-minmax---dense': 'ac534ea6fe460727',
    'rtn-minmax---masked': 'a5e9f625b2f5c55c',
    'rtn-q4_k---dense': 'ae2bc4f9a9784d3e',
    'rtn-q4_k---masked': 'ebce084bbd6e2372',
    'rtn-weighted-mse---dense': 'ae2bc4f9a9784d3e',
    'rtn-weighted-mse---masked': 'ebce084bbd6e2372',
}


def run_rtn(case: str) -> str:
    family, options = RTN_CASES[case]
    model = compress_rtn(MODELS[family](), RTNOptions(**options), make_context(tiny_windows(4, 32)))
    return model_digest(model)


def run_gptq(case: str) -> str:
    family, options = GPTQ_CASES[case]
    model = compress_gptq(MODELS[family](), GPTQOptions(**options), make_context(tiny_windows(4, 32)))
    return model_digest(model)


def _matrix(seed=0):
    generator = torch.Generator().manual_seed(seed)
    W = torch.randn(64, 64, generator=generator) * torch.rand(1, 64, generator=generator) * 3
    X = torch.randn(512, 64, generator=generator)
    X[:, :4] *= 10
    H, _ = hessian_update(None, 0, X)
    mask = torch.rand(64, 64, generator=generator) > 0.3
    return W, H, mask


def _rule(name):
    from pocketlm.plugins import get_plugins

    return None if name is None else get_plugins().grid_rules[name].fit


MATRIX_CASES = {
    f"{kind}-{rule}-{act}-{'masked' if masked else 'dense'}": (kind, rule, act == "act-order", masked)
    for kind in ("rtn", "gptq") for rule in (None, "minmax", "weighted-mse", "q4_k")
    for act in (("act-order", "natural") if kind == "gptq" else ("-",)) for masked in (False, True)
}


def run_matrix(case: str) -> str:
    kind, rule, act_order, masked = MATRIX_CASES[case]
    W, H, mask = _matrix()
    mask = mask if masked else None
    if kind == "rtn":
        return digest(rtn_quantize(W, 4, 32, True, mask, _rule(rule), torch.diag(H) / 2))
    return digest(gptq_quantize(W, H, 4, 32, True, act_order=act_order, mask=mask, fit=_rule(rule))[:3])


@pytest.mark.parametrize("case", sorted(RTN_CASES))
def test_rtn_grids_are_those_of_before(case):
    assert run_rtn(case) == EXPECTED_RTN[case]


@pytest.mark.parametrize("case", sorted(GPTQ_CASES))
def test_gptq_grids_are_those_of_before(case):
    recorded = {platform: digests.get(case, EXPECTED_GPTQ[case]) for platform, digests in EXPECTED_GPTQ_ON.items()}
    assert_pinned(run_gptq(case), {BEFORE: EXPECTED_GPTQ[case], **recorded})


@pytest.mark.parametrize("case", sorted(MATRIX_CASES))
def test_pure_functions_give_the_grids_of_before_on_a_random_matrix(case):
    assert run_matrix(case) == EXPECTED_MATRIX[case]


if __name__ == "__main__":   # prints the expected digests of the code as it is, on this platform
    torch.set_num_threads(1)
    print("float platform:", float_platform())
    for name, cases, run in (("RTN", RTN_CASES, run_rtn), ("GPTQ", GPTQ_CASES, run_gptq),
                             ("MATRIX", MATRIX_CASES, run_matrix)):
        print(f"EXPECTED_{name} =", {case: run(case) for case in sorted(cases)})
