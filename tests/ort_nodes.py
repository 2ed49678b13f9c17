"""Run one ONNX node on onnxruntime with constant inputs (tests only: bit-exact comparisons).

Every input is an initializer (graph optimizations off, so nothing is constant-folded and the
operator's own CPU kernel runs). Outputs of packed types (int4, uint4, int2, uint2), which
onnxruntime's Python API cannot hand back, go through a Cast to int8 / uint8 first.
"""

from __future__ import annotations

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

PACKED_TYPES = {TensorProto.INT4: TensorProto.INT8, TensorProto.UINT4: TensorProto.UINT8}
for _name, _wide in (("INT2", TensorProto.INT8), ("UINT2", TensorProto.UINT8)):
    if hasattr(TensorProto, _name):
        PACKED_TYPES[getattr(TensorProto, _name)] = _wide
MS_DOMAIN = "com.microsoft"


def tensor_type(dtype) -> int:
    """ONNX element type of a numpy dtype (ml_dtypes int4 etc. included)."""
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def run_node(op_type: str, inputs: list, out_type: int, opset: int = 21, domain: str = "", **attrs) -> np.ndarray:
    """Output 0 of ``op_type`` on ``inputs`` (numpy arrays, or None for an absent optional input),
    declared of element type ``out_type``."""
    names, inits = [], []
    for i, value in enumerate(inputs):
        if value is None:
            names.append("")
            continue
        names.append(f"in{i}")
        inits.append(numpy_helper.from_array(np.asarray(value), f"in{i}"))
    nodes = [helper.make_node(op_type, names, ["y0"], domain=domain, **attrs)]
    final_type = PACKED_TYPES.get(out_type, out_type)
    if final_type != out_type:
        nodes.append(helper.make_node("Cast", ["y0"], ["y"], to=final_type))
    else:
        nodes[0].output[0] = "y"
    graph = helper.make_graph(nodes, op_type, [], [helper.make_tensor_value_info("y", final_type, None)], inits)
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=opsets)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session.run(None, {})[0]


def qlinear_conv(x, sx, zx, w, sw, zw, sy, zy, bias=None, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1),
                 group=1) -> np.ndarray:
    """ONNX QLinearConv (opset 10); zero points keep their numpy dtypes (they choose the types)."""
    o = w.shape[0]
    return run_node("QLinearConv", [x, np.float32(sx), zx, w, np.asarray(sw, np.float32).reshape(-1)[:o],
                                    zw, np.float32(sy), zy, bias], tensor_type(np.asarray(zy).dtype), opset=10,
                    strides=list(strides), pads=list(pads), dilations=list(dilations), group=group,
                    kernel_shape=list(w.shape[2:]))


def qlinear_matmul(a, sa, za, b, sb, zb, sy, zy) -> np.ndarray:
    """ONNX QLinearMatMul (opset 10)."""
    return run_node("QLinearMatMul", [a, np.float32(sa), za, b, np.asarray(sb, np.float32), zb, np.float32(sy), zy],
                    tensor_type(np.asarray(zy).dtype), opset=10)


def matmul_integer(a, za, b, zb) -> np.ndarray:
    """ONNX MatMulInteger (opset 10): int32."""
    return run_node("MatMulInteger", [a, b, za, zb], TensorProto.INT32, opset=10)


def conv_integer(x, zx, w, zw, pads=(0, 0, 0, 0), strides=(1, 1), group=1) -> np.ndarray:
    """ONNX ConvInteger (opset 10): int32."""
    return run_node("ConvInteger", [x, w, zx, zw], TensorProto.INT32, opset=10, pads=list(pads),
                    strides=list(strides), group=group, kernel_shape=list(w.shape[2:]))
