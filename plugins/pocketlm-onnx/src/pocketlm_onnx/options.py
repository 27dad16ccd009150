"""The ``onnx`` exporter's options (kept apart from the exporter, so registering the plugin
imports neither onnx nor torch)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pocketlm import Options


class OnnxOptions(Options):
    dtype: Literal["float32", "float16"] = Field(
        "float32", description="storage of the dense (not quantized) matrices; float16 halves them and is cast "
        "back to float32 when ONNX Runtime loads the graph, so computation stays float32")
    contrib_ops: bool = Field(
        True, description="write grids that are not 8-bit per channel (group-wise, or 2/4 bits) with ONNX "
        "Runtime's com.microsoft MatMulNBits; false writes them as dequantized float weights, for runtimes "
        "that only know standard ONNX operators")
