"""What rtn and gptq share beyond the core's quantizer kit (``pocketlm.quant``): the ``grid``
option, and the shared options model both methods subclass.

Selection, the group-size policy, the size effect, grid rules and module swaps are the kit's;
the names below stay for code that imported them from here.
"""

from __future__ import annotations

from pydantic import Field

from pocketlm.quant import (EMBED_ALIAS, GROUP_SIZES, QuantScheme, Selection, check_group_size, select_targets,
                            size_effect)


class QuantOptions(QuantScheme):
    """Options shared by rtn and gptq: the kit's ``QuantScheme`` (bits, group_size, symmetric,
    targets, ignore, allow_partial_group) and the grid rule.

    * ``group_size``: the default 64 divides the widths of every built-in tiny model and of the
      reference model (576, 1536); 128 does not divide 576 and is refused there (see
      ``allow_partial_group``).
    * ``grid``: the registered grid rule that chooses each group's scale and zero point
      (``pocketlm plugins`` lists them): ``"minmax"`` (default), ``"weighted-mse"`` (weighted by the
      mean squared activation of each input channel), or a format's own grid such as the
      ``gguf`` plugin's ``"q4_k"``.
    """

    grid: str = Field("minmax", description="grid rule choosing each group's scale and zero point "
                      "(minmax, weighted-mse, or one a plugin registers, such as q4_k)")


def select(model, options: QuantOptions, architecture) -> Selection:
    """The kit's :func:`pocketlm.quant.select_targets`."""
    return select_targets(model, options, architecture)


effect = size_effect

__all__ = ["EMBED_ALIAS", "GROUP_SIZES", "QuantOptions", "Selection", "check_group_size", "effect", "select"]
