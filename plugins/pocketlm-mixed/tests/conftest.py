"""Tests run single-threaded: the kit's tiny models gain nothing from threads, and the CPU is shared."""

import torch

torch.set_num_threads(1)
