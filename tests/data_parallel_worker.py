"""Run by tests/test_devices.py under torchrun: one process of a 2-process gloo group."""

import sys
from pathlib import Path

import torch

from pocketlm import distributed
from pocketlm.testing import make_context

distributed.init_from_environment(torch.device("cpu"))
windows = torch.arange(6).view(6, 1)
shard = distributed.shard(windows)
context = make_context(windows)
summed = context.all_reduce(torch.tensor([float(len(shard)) + distributed.rank() * 0]))
total = context.all_reduce_count(len(shard))
assert total == 6
(Path(sys.argv[1]) / f"rank{distributed.rank()}.txt").write_text(
    f"rank {distributed.rank()} of {context.processes}: windows {shard.view(-1).tolist()}, "
    f"summed {summed.item()}, writer {distributed.is_writer()}\n")
distributed.finish()
