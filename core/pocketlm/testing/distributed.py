"""Run a method data-parallel in several gloo processes on the CPU, for tests.

    from pocketlm.testing.distributed import run_data_parallel

    two = run_data_parallel("my-method", {"bits": 4}, processes=2)
    one = run_data_parallel("my-method", {"bits": 4}, processes=1)

Each process is spawned fresh (``torch.multiprocessing``), joins a gloo group through a file
store, builds the same tiny model and runs the method through ``context.walk`` as a pipeline
stage would; the walker gives each process its shard of the windows and the method sums its
statistics with ``context.all_reduce``. Rank 0's resulting tensors are returned; every rank's
are checked to be identical (every process must make the same change to the model).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch


def _worker(rank: int, world: int, folder: str, name: str, options: Mapping[str, Any] | None, family: str,
            windows: torch.Tensor | None) -> None:
    import torch.distributed as dist

    from .conformance import run_method, tensors

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    try:
        run = run_method(name, options, family, ids=windows, check_inputs=False)
        torch.save(tensors(run.model), Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_data_parallel(name: str, options: Mapping[str, Any] | None = None, family: str = "llama", *,
                      processes: int = 2, windows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a tiny ``family`` model after method ``name`` ran on ``processes`` gloo
    processes sharing ``windows`` (the conformance kit's windows by default)."""
    from .conformance import ConformanceError, run_method, tensors
    from .conformance._shared import _differences

    if processes == 1:                       # no process group: the plain single-process path
        return tensors(run_method(name, options, family, ids=windows, check_inputs=False).model)
    with tempfile.TemporaryDirectory(prefix="pocketlm-dp-") as folder:
        torch.multiprocessing.spawn(_worker, args=(processes, folder, name, dict(options or {}), family, windows),
                                    nprocs=processes, join=True)
        results = [torch.load(Path(folder) / f"rank{rank}.pt") for rank in range(processes)]
    for rank, other in enumerate(results[1:], 1):
        differences = _differences(results[0], other)
        if differences:
            raise ConformanceError(f"method {name!r}: process {rank} ended with another model than process 0",
                                   differences)
    return results[0]
