"""Graph rewrites that put a model's own integer grids into an exported ONNX graph.

The torch exporter writes every linear as ``MatMul(x, W^T)`` with a float initializer and the
token embedding as ``Gather(table, input_ids)``. These functions replace them, node by node,
with ONNX's quantization operators holding pocketlm's codes unchanged (grid convention
``w = (q - zero) * scale``, see :mod:`pocketlm.weights`):

* :func:`integer_matmul`: an 8-bit grid with one group per row becomes
  ``DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul(x_scale * w_scale)``, the pattern ONNX
  Runtime fuses into its integer ``DynamicQuantizeMatMul`` kernel;
* :func:`nbits_matmul`: other grids of 2, 4 or 8 bits become com.microsoft ``MatMulNBits``
  (block size = group size), which ONNX Runtime runs on the packed codes;
* :func:`quantized_gather`: a quantized embedding becomes a 1-byte-per-weight table gathered
  and dequantized with the gathered rows' scales and zero points;
* :func:`store_float16`: dense matrices stored in float16 behind a ``Cast``.

Every rewrite keeps the replaced node's output name, so the rest of the graph is untouched.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pocketlm.weights import PackedGrid

CONTRIB = "com.microsoft"
NBITS = (2, 4, 8)            # widths MatMulNBits packs evenly into bytes
NBITS_BLOCK = 128            # block size for a per-row grid (any block repeats the row's scale)


# ----------------------------------------------------------------------------- lookups


def digest(array: np.ndarray) -> str:
    """A key for a tensor's exact values (shape and dtype included)."""
    array = np.ascontiguousarray(array)
    return hashlib.sha1(f"{array.shape}{array.dtype}".encode() + array.tobytes()).hexdigest()


def rename_initializers(graph: onnx.GraphProto, names: dict[str, str]) -> dict[str, str]:
    """Give initializers whose values ``names`` knows (digest -> name) that name, everywhere they
    are read. The torch exporter calls a folded weight ``onnx::MatMul_391``; module names make
    the graph readable and let the rewrites find each layer. Returns old -> new names."""
    renamed = {}
    for init in graph.initializer:
        new = names.get(digest(numpy_helper.to_array(init)))
        if new is not None and new not in renamed.values():
            renamed[init.name] = new
            init.name = new
    for node in graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
    return renamed


def consumers(graph: onnx.GraphProto, tensor: str, op_type: str) -> list[onnx.NodeProto]:
    return [node for node in graph.node if node.op_type == op_type and tensor in node.input]


def replace_node(graph: onnx.GraphProto, old: onnx.NodeProto, new: list[onnx.NodeProto]) -> None:
    """Put ``new`` where ``old`` was, keeping the graph's topological order."""
    index = list(graph.node).index(old)
    del graph.node[index]
    for offset, node in enumerate(new):
        graph.node.insert(index + offset, node)


def drop_unused(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input}
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def _add(graph: onnx.GraphProto, array: np.ndarray, name: str) -> str:
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
    return name


# ------------------------------------------------------------------------ grid contents


def grid_arrays(storage: PackedGrid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(codes [rows, cols] uint8, scales [rows, groups] float32, zeros [rows, groups] uint8)``
    of a pocketlm packed grid, exactly as stored."""
    codes = storage.grid().cpu().numpy().astype(np.uint8)
    return codes, storage.scales.float().cpu().numpy(), storage.zeros.cpu().numpy().astype(np.uint8)


def integer_codes(codes: np.ndarray, zeros: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """``(W_q [in, out], zero point [out])`` for ``MatMulInteger``: the codes with their
    per-output-channel zero points, so that they dequantize to exactly ``w``.

    ONNX Runtime multiplies uint8 activations by int8 weights with AVX2's ``vpmaddubsw``, which
    adds a pair of products in int16 and saturates on CPUs without VNNI unless every weight is
    within 64 of zero (2 x 255 x 64 < 2**15). So a 7-bit grid is stored as int8 ``q - 64`` (zero
    point ``zero - 64``): every value lies in [-64, 63], exact everywhere and on the faster
    uint8 x int8 kernel. An 8-bit grid keeps its uint8 codes (zero point 128 when symmetric): int8
    ``q - 128`` lost up to 0.5 on outputs of about 4 of a 384 x 1536 product on AVX2, and the
    uint8 x uint8 kernel is exact on every CPU."""
    if bits == 7:
        return (codes.T.astype(np.int16) - 64).astype(np.int8), (zeros[:, 0].astype(np.int16) - 64).astype(np.int8)
    return codes.T, zeros[:, 0]


# ------------------------------------------------------------------------- the rewrites


def integer_matmul(graph: onnx.GraphProto, node: onnx.NodeProto, name: str, storage: PackedGrid) -> None:
    """``MatMul(x, W)`` -> ``DynamicQuantizeLinear(x) -> MatMulInteger -> Cast -> Mul``: the
    activations are quantized to uint8 per tensor at run time, the weights are the grid's
    7- or 8-bit codes with per-output-channel scale and zero point (see :func:`integer_codes`)."""
    codes, scales, zeros = grid_arrays(storage)
    weight, zero = integer_codes(codes, zeros, storage.bits)
    x, out = node.input[0], node.output[0]
    w = _add(graph, weight, f"{name}.weight_quantized")
    wz = _add(graph, zero, f"{name}.weight_zero_point")
    ws = _add(graph, scales[:, 0].astype(np.float32), f"{name}.weight_scale")
    p = f"{name}/"
    replace_node(graph, node, [
        helper.make_node("DynamicQuantizeLinear", [x], [p + "x_q", p + "x_scale", p + "x_zero"], name=p + "quantize_input"),
        helper.make_node("MatMulInteger", [p + "x_q", w, p + "x_zero", wz], [p + "y_int32"], name=p + "MatMulInteger"),
        helper.make_node("Cast", [p + "y_int32"], [p + "y_float"], to=TensorProto.FLOAT, name=p + "cast"),
        helper.make_node("Mul", [p + "x_scale", ws], [p + "scale"], name=p + "combine_scales"),
        helper.make_node("Mul", [p + "y_float", p + "scale"], [out], name=p + "dequantize"),
    ])


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack ``values`` ``[..., n]`` (n a multiple of 8 // bits) into bytes, first value in the
    low bits: MatMulNBits' layout for weights and zero points."""
    per = 8 // bits
    grouped = values.reshape(*values.shape[:-1], -1, per).astype(np.uint16)
    packed = np.zeros(grouped.shape[:-1], np.uint16)
    for i in range(per):
        packed |= grouped[..., i] << (bits * i)
    return packed.astype(np.uint8)


def nbits_layout(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group_size: int, bits: int):
    """``(block, B [N, blocks, bytes], scales [N * blocks], zero points)`` for MatMulNBits. A
    per-row grid repeats its scale over blocks of ``NBITS_BLOCK``; a short last group is padded
    with its zero point (weights that dequantize to 0 and meet no input)."""
    rows, cols = codes.shape
    block = group_size if group_size != -1 else NBITS_BLOCK
    blocks = -(-cols // block)
    if group_size == -1:
        scales, zeros = np.repeat(scales, blocks, 1), np.repeat(zeros, blocks, 1)
    pad = blocks * block - cols
    padded = np.concatenate([codes, np.repeat(zeros[:, -1:], pad, 1)], 1) if pad else codes
    weight = pack_bits(padded.reshape(rows, blocks, block), bits)
    per = 8 // bits
    zero_cols = np.zeros((rows, -(-blocks // per) * per), np.uint8)
    zero_cols[:, :blocks] = zeros
    return block, weight, scales.reshape(-1).astype(np.float32), pack_bits(zero_cols, bits).reshape(-1)


def nbits_width(bits: int) -> int:
    """The MatMulNBits width that holds ``bits``-bit codes unchanged: a 3-bit code is a valid
    4-bit code with the same scale and zero point, a 5- or 6-bit code a valid 8-bit one."""
    return next(width for width in NBITS if width >= bits)


def nbits_matmul(graph: onnx.GraphProto, node: onnx.NodeProto, name: str, storage: PackedGrid) -> None:
    """``MatMul(x, W)`` -> com.microsoft ``MatMulNBits`` on the grid's packed codes."""
    codes, scales, zeros = grid_arrays(storage)
    width = nbits_width(storage.bits)
    block, weight, flat_scales, zero_points = nbits_layout(codes, scales, zeros, storage.group_size, width)
    inputs = [node.input[0],
              _add(graph, weight, f"{name}.weight_packed"),
              _add(graph, flat_scales, f"{name}.weight_scale"),
              _add(graph, zero_points, f"{name}.weight_zero_point")]
    replace_node(graph, node, [helper.make_node(
        "MatMulNBits", inputs, [node.output[0]], domain=CONTRIB, name=f"{name}/MatMulNBits",
        K=storage.cols, N=storage.rows, bits=width, block_size=block)])


def quantized_gather(graph: onnx.GraphProto, node: onnx.NodeProto, name: str, storage: PackedGrid) -> None:
    """``Gather(table, ids)`` -> gather the uint8 codes, the float16 scales and the zero points
    of the looked-up rows, then ``(q - zero) * scale`` per group."""
    codes, scales, zeros = grid_arrays(storage)
    rows, width = codes.shape
    groups = scales.shape[1]
    ids, out, p = node.input[1], node.output[0], f"{name}/"
    table = _add(graph, codes, f"{name}.weight_quantized")
    scale_table = _add(graph, scales.astype(np.float16).reshape(rows, groups, 1), f"{name}.weight_scale")
    zero_table = _add(graph, zeros.reshape(rows, groups, 1), f"{name}.weight_zero_point")
    shape = _add(graph, np.array([0, 0, groups, width // groups], np.int64), f"{name}.group_shape")
    flat = _add(graph, np.array([0, 0, width], np.int64), f"{name}.row_shape")
    gather = lambda source, target: helper.make_node("Gather", [source, ids], [p + target], name=p + "gather_" + target)
    cast = lambda source, target: helper.make_node("Cast", [p + source], [p + target], to=TensorProto.FLOAT,
                                                  name=p + "cast_" + target)
    replace_node(graph, node, [
        gather(table, "codes"), cast("codes", "codes_float"),
        helper.make_node("Reshape", [p + "codes_float", shape], [p + "grouped"], name=p + "group"),
        gather(zero_table, "zeros"), cast("zeros", "zeros_float"),
        gather(scale_table, "scales"), cast("scales", "scales_float"),
        helper.make_node("Sub", [p + "grouped", p + "zeros_float"], [p + "centred"], name=p + "centre"),
        helper.make_node("Mul", [p + "centred", p + "scales_float"], [p + "rows"], name=p + "scale"),
        helper.make_node("Reshape", [p + "rows", flat], [out], name=p + "ungroup"),
    ])


def store_float16(graph: onnx.GraphProto, min_dims: int = 2) -> int:
    """Store every float32 initializer of ``min_dims`` or more dimensions in float16, read
    through a ``Cast`` back to float32 (ONNX Runtime folds the cast once at load). Norms and
    biases stay float32. Returns how many were converted."""
    converted = []
    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT and len(init.dims) >= min_dims:
            array = numpy_helper.to_array(init).astype(np.float16)
            converted.append(init.name)
            init.CopyFrom(numpy_helper.from_array(array, init.name + ".float16"))
    for index, name in enumerate(converted):
        graph.node.insert(index, helper.make_node("Cast", [name + ".float16"], [name], to=TensorProto.FLOAT,
                                                  name=name + "/to_float32"))
    return len(converted)


# ------------------------------------------------------------------- runtime support


@functools.lru_cache(maxsize=None)
def runtime_runs_nbits(bits: int) -> bool:
    """Whether the installed ONNX Runtime's CPU provider runs ``MatMulNBits`` at ``bits``,
    checked on a 16 x 16 probe against its exact result (older releases lack some widths)."""
    import onnxruntime

    generator = np.random.default_rng(0)
    codes = generator.integers(0, 2**bits, (16, 32)).astype(np.uint8)
    scales = np.full((16, 2), 0.5, np.float32)
    zeros = np.full((16, 2), 2 ** (bits - 1), np.uint8)
    block, weight, flat_scales, zero_points = nbits_layout(codes, scales, zeros, 16, bits)
    graph = helper.make_graph(
        [helper.make_node("MatMulNBits", ["x", "B", "S", "Z"], ["y"], domain=CONTRIB, K=32, N=16, bits=bits,
                          block_size=block)], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
        [numpy_helper.from_array(a, n) for a, n in ((weight, "B"), (flat_scales, "S"), (zero_points, "Z"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(CONTRIB, 1)])
    x = generator.standard_normal((1, 32)).astype(np.float32)
    try:
        ort_session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        y = ort_session.run(None, {"x": x})[0]
    except Exception:  # an unknown op or width: ONNX Runtime raises its own error types
        return False
    return bool(np.allclose(y, x @ ((codes.astype(np.float32) - 2 ** (bits - 1)) * 0.5).T, atol=1e-4))
