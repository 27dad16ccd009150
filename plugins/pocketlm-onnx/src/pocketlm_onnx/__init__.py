"""pocketlm-onnx: the ``onnx`` exporter, sentence encoders for ONNX Runtime with integer weights.

An 8- or 7-bit per-channel grid (``rtn``/``gptq`` with ``bits = 8`` or ``7``,
``group_size = -1``) is written as ``DynamicQuantizeLinear -> MatMulInteger``, holding the
layer's own codes, so ONNX Runtime runs it on its integer kernels (7-bit codes as int8, the
faster kernel on CPUs without VNNI); group-wise and 2/4-bit grids become com.microsoft ``MatMulNBits``; a
quantized token embedding becomes a 1-byte-per-weight table. :mod:`pocketlm_onnx.runtime` opens
and runs the export."""

from __future__ import annotations

from pocketlm import Exporter, hookimpl

from .options import OnnxOptions

__version__ = "0.1.5"
POCKETLM_API = ">=1.5,<2"

__all__ = ["OnnxOptions", "check", "export_onnx", "register_exporters"]


def check(model, options: OnnxOptions, context) -> list[str]:
    """Why ``model`` cannot be exported to ONNX (see :func:`pocketlm_onnx.export.check`)."""
    from .export import check as problems  # onnx and torch load when an export is at hand

    return problems(model, options, context)


def export_onnx(model, path, options: OnnxOptions | None, context) -> None:
    """Write ``model`` as ``model.onnx`` into ``path`` (see :func:`pocketlm_onnx.export.export_onnx`)."""
    from .export import export_onnx as write

    write(model, path, options, context)


EXPORTER = Exporter(
    name="onnx", options=OnnxOptions, export=export_onnx, check=check,
    represents=frozenset({"dense", "masked", "restructured", "quantized"}),
    packs=frozenset({"quantized", "quantized-embedding"}),
    library="onnx",
    summary="ONNX sentence encoder for ONNX Runtime: 8-bit grids as MatMulInteger, group-wise/4-bit as "
            "MatMulNBits, a quantized embedding as a 1-byte table; outputs last_hidden_state and sentence_embedding")


@hookimpl
def register_exporters(register):
    register(EXPORTER)
