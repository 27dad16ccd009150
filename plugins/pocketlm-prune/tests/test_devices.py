"""Devices and processes: every pruner allocates on the device of the layer it works on (with the
default device set to meta, a tensor made without device= breaks the run), a CUDA run matches
the CPU's where there is a GPU, and 2 gloo processes sharing the calibration windows prune as
1 process does (magnitude exactly; Wanda and SparseGPT within the summation tolerance)."""

import pytest
import torch

from pocketlm.testing.conformance import check_allocations, check_cuda_matches_cpu, windows
from pocketlm.testing.distributed import run_data_parallel

METHODS = [("magnitude", {"sparsity": 0.5}), ("wanda", {"sparsity": 0.5}), ("sparsegpt", {"sparsity": 0.5}),
           ("prune-width", {"mlp_ratio": 0.25}), ("prune-depth", {"layers": 1})]
# Two processes add their halves of a statistic (Wanda's squared input norms, SparseGPT's
# Hessian) in another order than one process: last-bit differences can flip a weight that sat
# on the pruning threshold. At most 1% of the mask may differ.
MASK_FLIPS = 0.01


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("name, options", METHODS, ids=[m for m, _ in METHODS])
def test_allocates_on_the_layer_device(name, options, family):
    check_allocations(name, options, family)


@pytest.mark.parametrize("name, options", METHODS[:3], ids=[m for m, _ in METHODS[:3]])
def test_cuda_matches_cpu(name, options):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here: benchmarks/gpu_smoke.sh runs this where there is one")
    check_cuda_matches_cpu(name, options, "llama")


def _masks(tensors):
    return {n: t for n, t in tensors.items() if n.endswith("#mask")}


def test_magnitude_two_processes_equal_one_exactly():
    one = run_data_parallel("magnitude", {"sparsity": 0.5}, processes=1)
    two = run_data_parallel("magnitude", {"sparsity": 0.5}, processes=2)
    assert one.keys() == two.keys() and _masks(one)
    for name in one:
        assert torch.equal(one[name], two[name]), name


@pytest.mark.parametrize("name", ["wanda", "sparsegpt"])
def test_calibrated_pruners_two_processes_equal_one_within_the_summation_tolerance(name):
    ids = windows(8)
    one = run_data_parallel(name, {"sparsity": 0.5}, processes=1, windows=ids)
    two = run_data_parallel(name, {"sparsity": 0.5}, processes=2, windows=ids)
    half = run_data_parallel(name, {"sparsity": 0.5}, processes=1, windows=ids[::2])
    masks = _masks(one)
    assert masks
    flips = sum(int((one[n] != two[n]).sum()) for n in masks)
    flips_half = sum(int((one[n] != half[n]).sum()) for n in masks)
    total = sum(m.numel() for m in masks.values())
    print(f"{name}, 2 processes against 1: {flips}/{total} mask entries differ; 1 process on half: {flips_half}")
    assert flips / total <= MASK_FLIPS
    assert flips_half > flips          # the statistics really were shared
