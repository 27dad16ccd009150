"""pocketlm-example-mseround: the example third-party plugin of the pocketlm docs.

It provides one grid rule, ``mse``: each group's scale is chosen by a small search that
minimises the rounding error, instead of covering the group's largest weight, which helps
layers with heavy-tailed weights. Any quantizer with a ``grid`` option uses it (``rtn`` and
``gptq`` of pocketlm-gptq: ``grid = "mse"``), and the result is an ordinary quantized grid that
every exporter that represents ``"quantized"`` writes.

Registration imports no torch (every pocketlm command loads the plugin): the grid function is
named with ``pocketlm.lazy`` and imported when a quantizer first calls it.
"""

from __future__ import annotations

from pocketlm import GridRule, hookimpl, lazy

__version__ = "0.3.0"
POCKETLM_API = ">=1.8,<2"


@hookimpl
def register_grid_rules(register):
    register(GridRule(
        name="mse", fit=lazy("pocketlm_example_mseround.mseround:mse_grid"), symmetric=True,
        summary="per group, the symmetric scale (20 candidates down to 0.8x min-max) of least squared error"))
