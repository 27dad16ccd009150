"""Built-in grid rules: ``minmax`` (every quantizer's default) and ``weighted-mse``."""

from __future__ import annotations

from .. import hookimpl
from ..components import GridRule
from ..grids import minmax_group_grid, weighted_group_grid


@hookimpl
def register_grid_rules(register):
    register(GridRule(
        name="minmax", fit=minmax_group_grid,
        summary="each group's grid spans its minimum and maximum"))
    register(GridRule(
        name="weighted-mse", fit=weighted_group_grid, uses_importance=True,
        summary="per group, the shrunken range (20 candidates) with the lowest squared error weighted "
                "by each input channel's mean squared activation (llama.cpp's imatrix idea)"))
