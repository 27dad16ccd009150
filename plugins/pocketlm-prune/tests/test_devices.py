"""Processes: 2 gloo processes sharing the calibration windows prune as 1 process does
(magnitude exactly; Wanda and SparseGPT within the summation tolerance). (Allocations on the
layer's device and CUDA against the CPU are checked by the conformance kit,
tests/test_conformance.py.)"""

import pytest
import torch

from pocketlm.testing.conformance import windows
from pocketlm.testing.distributed import run_data_parallel

# Two processes add their halves of a statistic (Wanda's squared input norms, SparseGPT's
# Hessian) in another order than one process: last-bit differences can flip a weight that sat
# on the pruning threshold. At most 1% of the mask may differ.
MASK_FLIPS = 0.01


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
