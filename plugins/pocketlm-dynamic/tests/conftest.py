import torch

# Tiny models: one thread is faster than several on a shared, busy machine.
torch.set_num_threads(1)
