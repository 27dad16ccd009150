"""What rtn and gptq share beyond the core's quantizer kit (``pocketlm.quant``): the ``grid``
option, and the shared options model both methods subclass (both defined in the light
:mod:`pocketlm_gptq.options`, which registration reads without torch).

Selection, the group-size policy, the size effect, grid rules and module swaps are the kit's;
the names below stay for code that imported them from here.
"""

from __future__ import annotations

from pocketlm.quant import EMBED_ALIAS, GROUP_SIZES, Selection, check_group_size, select_targets

from .options import QuantOptions, effect


def select(model, options: QuantOptions, architecture) -> Selection:
    """The kit's :func:`pocketlm.quant.select_targets`."""
    return select_targets(model, options, architecture)


__all__ = ["EMBED_ALIAS", "GROUP_SIZES", "QuantOptions", "Selection", "check_group_size", "effect", "select"]
