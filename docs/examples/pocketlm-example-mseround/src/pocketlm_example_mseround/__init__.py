"""pocketlm-example-mseround: the example third-party plugin of the pocketlm docs.

It provides one grid rule, ``mse``: each group's scale is chosen by a small search that
minimises the rounding error, instead of covering the group's largest weight, which helps
layers with heavy-tailed weights. Any quantizer with a ``grid`` option uses it (``rtn`` and
``gptq`` of pocketlm-gptq: ``grid = "mse"``), and the result is an ordinary quantized grid that
every exporter that represents ``"quantized"`` writes.
"""

from __future__ import annotations

from pocketlm import GridRule, hookimpl

from . import mseround

__version__ = "0.2.1"
POCKETLM_API = ">=1.5,<2"


@hookimpl
def register_grid_rules(register):
    register(GridRule(
        name="mse", fit=mseround.mse_grid, symmetric=True,
        summary="per group, the symmetric scale (20 candidates down to 0.8x min-max) of least squared error"))
