"""pocketlm-onnx: the ``onnx`` exporter, sentence encoders for ONNX Runtime with integer weights.

An 8-bit per-channel grid (``rtn``/``gptq`` with ``bits = 8, group_size = -1``) is written as
``DynamicQuantizeLinear -> MatMulInteger``, holding the layer's own codes, so ONNX Runtime runs it
on its integer kernels; group-wise and 2/4-bit grids become com.microsoft ``MatMulNBits``; a
quantized token embedding becomes a 1-byte-per-weight table. :mod:`pocketlm_onnx.runtime` opens
and runs the export."""

from __future__ import annotations

from pocketlm import hookimpl

from .export import EXPORTER, OnnxOptions, check, export_onnx

__version__ = "0.1.2"
POCKETLM_API = ">=1.5,<2"

__all__ = ["OnnxOptions", "check", "export_onnx", "register_exporters"]


@hookimpl
def register_exporters(register):
    register(EXPORTER)
