"""awq gives the same model, bit for bit, as before it was moved onto the core's quantizer kit
(``pocketlm.quant``): the folded norms and linears, the grids, scales and zero points.

The expected digests were produced by the code before the move (pocketlm-awq 0.2.4), on CPU in
float32 with one thread. A whole model's digest depends on the CPU's float32 rounding too (awq
searches its scales on the model's activations), so those are pinned per float platform
(``pocketlm.testing.float_platform``): the move's on the machine it ran on, the same code's on
each platform since.
"""

from __future__ import annotations

import pytest
import torch

from pocketlm.testing import assert_pinned, digest, float_platform, make_context
from pocketlm.testing.models import tiny_model, tiny_windows
from pocketlm.quant import round_to_grid
from pocketlm_awq.awq import AWQOptions, compress


CASES = {
    "llama-w4g32-asym": ("llama", dict(bits=4, group_size=32)),
    "llama-w4g64-sym-no-clip": ("llama", dict(bits=4, group_size=64, symmetric=True, clip=False)),
    "qwen2-w3g32-clip-qk": ("qwen2", dict(bits=3, group_size=32, clip_qk=True)),
    "gpt2-w8-channel": ("gpt2", dict(bits=8, group_size=-1)),
    "opt-w4g32-no-duo": ("opt", dict(bits=4, group_size=32, duo_scaling=False)),
}

EXPECTED = {
    'gpt2-w8-channel': 'd87a3c4be3c48346',
    'llama-w4g32-asym': '471343a9c0f9966d',
    'llama-w4g64-sym-no-clip': 'f1c4ec7aa188685b',
    'opt-w4g32-no-duo': '3896a42282e0a55e',
    'qwen2-w3g32-clip-qk': '77d79f8e569bcc27',
}
BEFORE = "pocketlm-awq 0.2.4, before the move (an AVX-512 CPU; no platform string kept)"
EXPECTED_ON = {
    "torch 2.13.0+cpu, 1 thread(s), products 7090f477": {
        'gpt2-w8-channel': 'b3396f80c9f6e9d7',
        'llama-w4g32-asym': '3f3b39ac03c8e2be',
        'llama-w4g64-sym-no-clip': 'c2a551003cc88852',
        'opt-w4g32-no-duo': '06f2e3ff9b61b5fe',
        'qwen2-w3g32-clip-qk': 'f67029e7574e1d94',
    },
}
EXPECTED_MATRIX = {
    'w3g64-sym': '967ee9e5da2b239d',
    'w4g16-sym': 'a2477f8d5e65a1ee',
    'w4g32-asym': '1cf4bef7c9ba75d8',
    'w8g-1-asym': '41ef377ddead39c2',
}

MATRIX_CASES = {f"w{bits}g{group}-{'sym' if sym else 'asym'}": (bits, group, sym)
                for bits, group, sym in ((4, 32, False), (3, 64, True), (8, -1, False), (4, 16, True))}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(case: str) -> str:
    family, options = CASES[case]
    model = compress(tiny_model(family, outliers=True), AWQOptions(**options), make_context(tiny_windows(8, 32)))
    return digest(dict(model.state_dict()))


def run_matrix(case: str) -> str:
    bits, group_size, symmetric = MATRIX_CASES[case]
    generator = torch.Generator().manual_seed(0)
    W = torch.randn(64, 64, generator=generator) * torch.rand(1, 64, generator=generator) * 3
    q, scales, zeros = round_to_grid(W, bits, group_size, symmetric)
    # awq's own quantize_groups, before the kit, returned the grid as float32 values
    return digest((q.float(), scales, zeros))


@pytest.mark.parametrize("case", sorted(CASES))
def test_awq_models_are_those_of_before(case):
    recorded = {platform: digests[case] for platform, digests in EXPECTED_ON.items()}
    assert_pinned(run(case), {BEFORE: EXPECTED[case], **recorded})


@pytest.mark.parametrize("case", sorted(MATRIX_CASES))
def test_kit_group_grids_are_those_of_awq_before_on_a_random_matrix(case):
    assert run_matrix(case) == EXPECTED_MATRIX[case]


if __name__ == "__main__":   # prints the expected digests of the code as it is
    torch.set_num_threads(1)
    print("float platform:", float_platform())
    print("EXPECTED =", {case: run(case) for case in sorted(CASES)})
    print("EXPECTED_MATRIX =", {case: run_matrix(case) for case in sorted(MATRIX_CASES)})
