"""pocketlm-example-mseround: the example third-party plugin of the pocketlm docs.

It provides one method, ``mse-round``: round-to-nearest weight quantization where each group's
scale is chosen by a small grid search that minimises the rounding error (instead of covering
the group's largest weight), which helps layers with heavy-tailed weights. The result is
``pocketlm.weights.QuantizedLinear`` modules, so every exporter that represents
``"quantized"`` (hf, gptq, compressed-tensors, gguf, ...) can write it.
"""

from __future__ import annotations

from pocketlm import PHASE_QUANTIZE, Method, hookimpl

from . import mseround

__version__ = "0.1.1"
POCKETLM_API = ">=1.0,<2"


@hookimpl
def register_methods(register):
    register(Method(
        name="mse-round",
        kind="quantize",
        options=mseround.MSERoundOptions,
        compress=mseround.compress,
        summary="round-to-nearest quantization with a per-group MSE-optimal scale search (symmetric grid)",
        needs_calibration=False,
        effect=mseround.effect,
        phase=PHASE_QUANTIZE,
        exclusive=True,  # one weight quantizer per layer
    ))
