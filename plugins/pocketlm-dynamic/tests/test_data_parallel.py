"""Data parallel: 2 gloo processes, each with half of the calibration windows, end with the same
thresholds (``run_data_parallel`` fails when the processes' models differ in any tensor), and
those are the thresholds 1 process finds on all the windows.

A threshold is the k-th smallest magnitude of both processes' together, found exactly; what
may differ is the magnitudes themselves in their last bits: a layer run on a batch of 2 windows
instead of 4 can round its matmuls otherwise, and the greedy block error is summed in another
order. 1 process on half of the windows (what process 0 alone sees) is far further off."""

import pytest
import torch

from pocketlm.testing.conformance import windows
from pocketlm.testing.distributed import run_data_parallel
from pocketlm_dynamic.sparsity import kth_smallest_across, threshold_for

# 8 windows of 128 tokens: greedy measures its block error on the first 512 // 128 = 4 windows,
# which 2 processes hold 2 each (windows 0, 2 and 1, 3).
IDS = windows(8, seq_len=128)
# Largest relative difference allowed between a threshold of 2 processes and of 1.
TOLERANCE = 1e-5


def _thresholds(tensors):
    return {n: float(t) for n, t in tensors.items() if n.endswith("_threshold")}


def _worst(a, b):
    return max(abs(a[n] - b[n]) / max(abs(b[n]), 1e-12) for n in b)


@pytest.mark.parametrize("options", [{"allocation": "uniform"}, {"allocation": "greedy"}, {"mode": "cats"}],
                         ids=["uniform", "greedy", "cats"])
def test_two_processes_end_with_the_thresholds_of_one(options):
    options = {"sparsity": 0.4, **options}
    one = _thresholds(run_data_parallel("activation-sparsity", options, processes=1, windows=IDS))
    two = _thresholds(run_data_parallel("activation-sparsity", options, processes=2, windows=IDS))
    half = _thresholds(run_data_parallel("activation-sparsity", options, processes=1, windows=IDS[::2]))
    assert one and one.keys() == two.keys() == half.keys()
    print(f"{options}: {len(one)} thresholds; 2 processes against 1: {_worst(two, one):.2e} at most; "
          f"1 process on half: {_worst(half, one):.2e}")
    assert _worst(two, one) <= TOLERANCE
    assert _worst(half, one) > 100 * TOLERANCE   # the magnitudes really were shared


def test_greedy_measured_on_one_window_that_process_1_does_not_hold():
    # 512 // 512 = 1 window measured: process 0 holds it, process 1 adds zero error to each sum
    ids = windows(4, seq_len=512)
    options = {"sparsity": 0.4, "allocation": "greedy"}
    one = _thresholds(run_data_parallel("activation-sparsity", options, processes=1, windows=ids))
    two = _thresholds(run_data_parallel("activation-sparsity", options, processes=2, windows=ids))
    assert one and one.keys() == two.keys()
    print(f"greedy on 4 x 512 tokens, 2 processes against 1: {_worst(two, one):.2e} at most")
    assert _worst(two, one) <= TOLERANCE


def test_greedy_proxy_processes_agree():
    # greedy-proxy averages the processes' error curves: the same allocation in both (checked
    # by run_data_parallel), though measured on other sampled rows than 1 process's
    two = _thresholds(run_data_parallel("activation-sparsity", {"sparsity": 0.4, "allocation": "greedy-proxy"},
                                        processes=2, windows=IDS))
    assert two and all(t > 0 for t in two.values())


def test_kth_smallest_across_is_kthvalue_in_one_process():
    generator = torch.Generator().manual_seed(0)
    values = torch.cat([torch.randn(5000, generator=generator).abs(), torch.zeros(300),
                        torch.full((200,), 0.5), torch.tensor([float("inf"), 1e-30, 3e38])])
    ranks = [1, 2, 300, 301, 2500, 4000, values.numel() - 1, values.numel()]
    found = kth_smallest_across(values.sort().values, ranks, lambda t: t)
    assert found == [float(torch.kthvalue(values, k).values) for k in ranks]
    assert found[5] == threshold_for(values, 4000 / values.numel())
