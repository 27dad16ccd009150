"""Where layer computation runs (``[model] device``), where weights wait (``[model] offload``),
and whether the work fits before any of it starts.

* ``device = "auto"`` is the first CUDA device when there is one, else the CPU; ``"cuda:N"``
  that is not there is refused with the list of devices found.
* ``offload = "none"``: the whole model sits on the device. ``"cpu"``: weights wait in CPU memory
  and the layer walker moves one decoder layer at a time to the device, runs it, and moves it
  back. Calibration activations between layers always wait on the CPU and go to the device
  batch by batch, so the device holds one layer and one batch.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .errors import PocketError



def devices_found() -> list[str]:
    """``["cpu", "cuda:0 (NVIDIA H200)", ...]``: what this process can use."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    return found


def resolve_device(name: str) -> torch.device:
    """The ``torch.device`` for a recipe's ``device``; a CUDA device that is not there is a
    :class:`PocketError` that lists the devices found."""
    if name == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    index = int(name.split(":")[1]) if ":" in name else 0
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= count:
        raise PocketError(f"model.device is {name!r}, but this machine has no such device "
                          f"(devices found: {', '.join(devices_found())})", field="model.device",
                          fix='set device = "auto" (the first CUDA device, else the CPU) or one of the devices found')
    return torch.device("cuda", index)


def to_device(value: Any, device: torch.device | None) -> Any:
    """``value`` with every tensor in it (through tuples, lists and dicts) on ``device``."""
    if device is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=False)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def module_device(module: nn.Module) -> torch.device:
    """Where ``module``'s first parameter (or buffer) lives; the CPU for an empty module."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def module_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers, shared storage counted once."""
    seen, total = set(), 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def free_bytes(device: torch.device) -> int:
    """Memory this process could still take on ``device``: the CUDA allocator's free memory, or
    the kernel's ``MemAvailable`` for the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


# A layer at work holds its weights plus what a method keeps (a Hessian per linear, a copy of a
# weight while it is solved): twice the layer's bytes is the least the device must have free.
LAYER_WORKING_FACTOR = 2


def check_fits(model: nn.Module, layers: nn.ModuleList, device: torch.device, offload: str,
               free: int | None = None) -> None:
    """Refuse, before any work, a placement that cannot run: with ``offload = "none"`` on a CUDA
    device the whole model must fit there; in every case the largest decoder layer must fit
    ``LAYER_WORKING_FACTOR`` times in what ``device`` has free. The error names the size and
    what to set."""
    free = free_bytes(device) if free is None else free
    if offload == "none" and device.type != "cpu" and module_device(model) != device:
        size = module_bytes(model)
        if size > free:
            raise PocketError(f"the model needs {size / 1e9:.2f} GB on {device}, which has {free / 1e9:.2f} GB free",
                              field="model.offload", fix='set offload = "cpu" in [model]: weights wait in CPU '
                              "memory and one decoder layer at a time goes to the device")
    if not len(layers):
        return
    index = max(range(len(layers)), key=lambda i: module_bytes(layers[i]))
    need = LAYER_WORKING_FACTOR * module_bytes(layers[index])
    if need > free:
        raise PocketError(f"decoder layer {index} needs {need / 1e9:.2f} GB on {device} to be worked on "
                          f"({LAYER_WORKING_FACTOR} x its {module_bytes(layers[index]) / 1e9:.2f} GB), which has "
                          f"{free / 1e9:.2f} GB free", field="model.device",
                          fix='free memory on the device, choose another (device = "cpu" or "cuda:N"), or load '
                          'the weights in a smaller dtype (dtype = "bfloat16")')


def place(model: nn.Module, device: torch.device, offload: str) -> nn.Module:
    """Put ``model`` where the recipe says: all of it on ``device`` with ``offload = "none"``;
    on the CPU with ``"cpu"`` (the walker brings one layer at a time to ``device``)."""
    return model.to(device if offload == "none" else torch.device("cpu"))
