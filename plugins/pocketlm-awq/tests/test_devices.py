"""Processes: 2 gloo processes sharing the calibration windows (the channel means, the
scale-search losses and the clipping errors summed over them) give the grids 1 process gives,
within the summation tolerance. (Allocations on the layer's device and CUDA against the CPU are
checked by the conformance kit, tests/test_conformance.py.)"""

from pocketlm.testing.conformance import windows
from pocketlm.testing.distributed import run_data_parallel
from pocketlm.weights import unpack

OPTIONS = {"bits": 4, "group_size": 32}
# Sums over 2 processes are ordered differently from 1 process's; an alpha or a clipping bound
# whose losses tie to the last bits can be chosen differently. At most 2% of grid entries may differ.
GRID_FLIPS = 0.02


def test_two_processes_equal_one_within_the_summation_tolerance():
    ids = windows(8)
    one = run_data_parallel("awq", OPTIONS, processes=1, windows=ids)
    two = run_data_parallel("awq", OPTIONS, processes=2, windows=ids)
    grids = [n for n in one if n.endswith("qweight")]
    assert grids
    flips = total = 0
    for name in grids:
        cols = one[name].shape[1] * 8
        flips += int((unpack(one[name], 4, cols) != unpack(two[name], 4, cols)).sum())
        total += one[name].shape[0] * cols
    print(f"awq, 2 processes against 1: {flips}/{total} grid entries differ")
    assert flips / total <= GRID_FLIPS
