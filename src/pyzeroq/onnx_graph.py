"""ONNX graph building shared by the two exporters of an integer plan: QOperator
(:mod:`pyzeroq.export`) and QDQ (:mod:`pyzeroq.export_qdq`).

What lives here is what both write the same way: initializers and node bookkeeping
(:class:`GraphBuilder`), the ONNX element type of a record's codes (:func:`code_type`; sub-byte
types packed by :func:`pack_codes`), the integer-only pixel input, lookup tables, the zero
points a transposed convolution inserts, layout ops and reshape targets, the graph's output
names (:func:`output_names`) and the assembly of the ModelProto (:func:`assemble`).
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from .integer.convert import IntegerModel
from .integer.steps import ConvStep, InputStep, LayoutStep, LookupStep, ReshapeStep, output_leaves
from .layout_ops import slice_bounds
from .qspec import TensorQuant

__all__ = ["GraphBuilder", "code_type", "code_dtype", "container_bits", "container_range", "pack_codes",
           "reshape_target", "output_names", "assemble", "check_choice", "check_integer_model", "example_shapes",
           "INPUT_NAME", "OUTPUT_NAME", "PIXELS"]

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
STRUCTURED_OUTPUT_PREFIX = "output"
PIXEL_LEVELS = 256
PIXEL_MAX = 255.0
PIXELS = ("float", "uint8")
BITS_PER_BYTE = 8
BYTE_BITS, SHORT_BITS = 8, 16  # code containers of activations (and of weights when not packed)
PACKED_WIDTHS = (2, 4)  # sub-byte ONNX integer types: INT2 / UINT2 (opset 25), INT4 / UINT4 (opset 21)
WIDTHS = PACKED_WIDTHS + (BYTE_BITS, SHORT_BITS)
BATCH_DIM = "N"


def container_bits(q: TensorQuant, min_width: int = BYTE_BITS) -> int:
    """Width of the smallest ONNX integer type of at least ``min_width`` bits (2, 4, 8 or 16)
    that holds ``q``'s codes."""
    if min_width not in WIDTHS:
        raise ValueError(f"min_width must be one of {WIDTHS}, got {min_width!r}")
    return next(w for w in WIDTHS if w >= min_width and q.bits <= w)


def code_type(q: TensorQuant, min_width: int = BYTE_BITS) -> int:
    """The ``onnx.TensorProto`` element type of ``q``'s codes, from its ``bits`` and ``signed``
    (:func:`container_bits`): UINT8 / INT8 up to 8 bits, UINT16 / INT16 above; with ``min_width``
    4 (or 2), UINT4 / INT4 up to 4 bits (and UINT2 / INT2 up to 2), which ONNX stores two (four)
    codes per byte."""
    from onnx import TensorProto

    names = {2: "INT2", 4: "INT4", 8: "INT8", 16: "INT16"}
    name = names[container_bits(q, min_width)]
    return getattr(TensorProto, name if q.signed else "U" + name)


def code_dtype(q: TensorQuant) -> type:
    """numpy dtype of ``q``'s codes in an 8 / 16-bit container (uint8 / int8 / uint16 / int16)."""
    return {(BYTE_BITS, False): np.uint8, (BYTE_BITS, True): np.int8, (SHORT_BITS, False): np.uint16,
            (SHORT_BITS, True): np.int16}[(container_bits(q), q.signed)]


def container_range(q: TensorQuant) -> tuple[int, int]:
    """(lowest, highest) code of ``q``'s 8 / 16-bit container: where QuantizeLinear saturates."""
    info = np.iinfo(code_dtype(q))
    return int(info.min), int(info.max)


def pack_codes(codes: np.ndarray, width: int) -> bytes:
    """Sub-byte codes (``width`` 2 or 4 bits; signed codes in two's complement) packed as ONNX
    stores INT2 / UINT2 / INT4 / UINT4 tensors: element ``i`` in bits ``(i % k) * width`` of byte
    ``i // k`` (``k = 8 / width``, the first element in the least significant bits), the last byte
    zero-padded; ``ceil(codes.size / k)`` bytes."""
    if width not in PACKED_WIDTHS:
        raise ValueError(f"width must be one of {PACKED_WIDTHS}, got {width!r}")
    per_byte = BITS_PER_BYTE // width
    flat = (np.asarray(codes).reshape(-1).astype(np.int64) & ((1 << width) - 1)).astype(np.uint8)
    flat = np.concatenate([flat, np.zeros((-flat.size) % per_byte, np.uint8)]).reshape(-1, per_byte)
    shifts = (np.arange(per_byte) * width).astype(np.uint8)
    return np.bitwise_or.reduce(flat << shifts, axis=1).astype(np.uint8).tobytes()


def max_pool_attrs(step, height: int, width: int) -> dict:
    """ONNX ``MaxPool`` attributes of a MaxPoolStep on a [N, C, height, width] input: torch's
    ``ceil_mode`` drops a last window that would start in the right padding, ONNX's keeps it, so the
    padding is given explicitly (:meth:`MaxPoolStep.ceil_padding`, ``ceil_mode=0``) where onnxruntime
    takes it (every pad smaller than the kernel), else as ``ceil_mode=1`` with symmetric pads."""
    top, left, bottom, right = step.ceil_padding(height, width)
    attrs = {"kernel_shape": list(step.kernel), "strides": list(step.stride)}
    if bottom < step.kernel[0] and right < step.kernel[1]:
        return {**attrs, "pads": [top, left, bottom, right], "ceil_mode": 0}
    ph, pw = step.padding
    return {**attrs, "pads": [ph, pw, ph, pw], "ceil_mode": int(step.ceil_mode)}


def check_choice(value, choices: tuple, argument: str) -> None:
    """ValueError naming ``argument`` unless ``value`` is one of the strings ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{argument} must be one of {choices}, got {value!r}")


class GraphBuilder:
    """Collects the ONNX nodes / initializers of one integer model (the exporters subclass it with
    one handler per step type). ``shapes``: value slot -> shape from a run on the example input."""

    def __init__(self, int_model: IntegerModel, shapes: dict, pixels: str):
        from onnx import TensorProto, helper, numpy_helper
        self.h, self.nh, self.tp = helper, numpy_helper, TensorProto
        self.im = int_model
        self.shapes = shapes
        self.pixels = pixels
        self.nodes: list = []
        self.inits: list = []
        self._names: set = set()

    def _name(self, base: str) -> str:
        name, i = base, 0
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def const(self, base: str, value) -> str:
        """An initializer holding ``value`` (its numpy dtype); returns its (unique) name."""
        name = self._name(base)
        self.inits.append(self.nh.from_array(np.asarray(value), name))
        return name

    def code_const(self, base: str, codes, q: TensorQuant, min_width: int = BYTE_BITS) -> str:
        """An initializer of codes of record ``q`` in :func:`code_type` (``min_width`` 4 / 2: sub-byte
        types stored two / four per byte, :func:`pack_codes`)."""
        codes = np.asarray(codes)
        width = container_bits(q, min_width)
        if width not in PACKED_WIDTHS:
            return self.const(base, codes.astype(code_dtype(q)))
        name = self._name(base)
        self.inits.append(self.h.make_tensor(name, code_type(q, min_width), list(codes.shape),
                                             pack_codes(codes, width), raw=True))
        return name

    def qparams(self, base: str, q: TensorQuant):
        """(scale, zero point) initializers of a per-tensor record: a float32 scalar and a code of ``q``'s type."""
        return (self.const(f"{base}_scale", np.float32(q.scale_value)),
                self.code_const(f"{base}_zero_point", np.int64(q.zero_point_value), q))

    def free_names(self, names: set) -> dict:
        """Rename the internal values and initializers called ``names`` (``name_value``) so that
        graph outputs can take those names; returns {old: new}."""
        used = {o for n in self.nodes for o in n.output} | {i.name for i in self.inits} | self._names
        renamed = {}
        for name in sorted(names & used):
            new = f"{name}_value"
            while new in used:
                new = f"{new}_"
            used.add(new)
            renamed[name] = new
        for n in self.nodes:
            for field in (n.input, n.output):
                for i, v in enumerate(field):
                    field[i] = renamed.get(v, v)
        for init in self.inits:
            init.name = renamed.get(init.name, init.name)
        return renamed

    def node(self, op: str, inputs: list, outputs: list, name: str, domain: Optional[str] = None, **attrs):
        self.nodes.append(self.h.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))

    def channel_shape(self) -> tuple:
        """[1, C, 1, ...]: per-channel constants broadcast over an input of the example's rank."""
        return (1, -1) + (1,) * (len(self.shapes[self.im.steps[0].output]) - 2)

    # ------------------------------------------------------------------ shared emissions
    def pixel_input(self, step: InputStep, raw: str) -> None:
        """uint8 pixels -> ``raw`` codes, integer only: ``Cast(int32)`` [+ channel offset] ``Gather``
        from the simulator's 256-entry table per channel."""
        lut = self.im.input_lut
        idx = f"{step.output}_index"
        self.node("Cast", [INPUT_NAME], [idx], f"{step.output}_cast", to=self.tp.INT32)
        if lut.shape[0] > 1:
            offs = (np.arange(lut.shape[0], dtype=np.int32) * PIXEL_LEVELS).reshape(self.channel_shape())
            self.node("Add", [idx, self.const(f"{step.output}_channel_offset", offs)], [f"{idx}_c"],
                      f"{step.output}_offset")
            idx = f"{idx}_c"
        self.node("Gather", [self.code_const(f"{step.output}_lut", lut.reshape(-1), step.quant), idx], [raw],
                  f"{step.output}_lookup", axis=0)

    def normalized_input(self, step: InputStep) -> str:
        """The float input after the model's normalization (``Sub(mean)``, ``Div(std)``: the
        simulator's float32 ops; none without a normalizer); returns the float value's name."""
        if step.mean is None:
            return INPUT_NAME
        mean = np.asarray(step.mean, np.float32).reshape(self.channel_shape())
        std = np.asarray(step.std, np.float32).reshape(self.channel_shape())
        self.node("Sub", [INPUT_NAME, self.const("normalize_mean", mean)], ["normalize_centered"], "normalize_sub")
        self.node("Div", ["normalize_centered", self.const("normalize_std", std)], ["normalized"], "normalize_div")
        return "normalized"

    def lookup(self, step: LookupStep):
        """``Cast(int32)`` -> ``Gather`` from the step's table (the simulator's, bit-exact by construction)."""
        b = step.output
        self.node("Cast", [step.inputs[0]], [f"{b}_index"], f"{b}_cast", to=self.tp.INT32)
        self.node("Gather", [self.code_const(f"{b}_table", step.table, step.quant), f"{b}_index"], [b], f"{b}_lookup",
                  axis=0)

    def insert_zero_points(self, step: ConvStep, src: str) -> str:
        """[N, C, H, W] -> [N, C, (H-1)*uh+1, (W-1)*uw+1] with the zero point between the pixels
        (a transposed conv's input): Reshape to [N, C, H, 1, W, 1], Pad with the zero point to
        [N, C, H, uh, W, uw], Reshape, Slice off the trailing fill."""
        b, (uh, uw) = step.output, step.upsample
        _, c, h, w = self.shapes[src]
        self.node("Reshape", [src, self.const(f"{b}_split", np.array([-1, c, h, 1, w, 1], np.int64))],
                  [f"{b}_x6"], f"{b}_reshape6")
        pads = np.array([0] * 6 + [0, 0, 0, uh - 1, 0, uw - 1], np.int64)
        xq = step.layer.input
        self.node("Pad", [f"{b}_x6", self.const(f"{b}_pads", pads),
                          self.code_const(f"{b}_fill", np.int64(xq.zero_point_value), xq)], [f"{b}_filled"],
                  f"{b}_pad", mode="constant")
        self.node("Reshape", [f"{b}_filled", self.const(f"{b}_merge", np.array([-1, c, h * uh, w * uw], np.int64))],
                  [f"{b}_spread"], f"{b}_reshape4")
        self.node("Slice", [f"{b}_spread", self.const(f"{b}_starts", np.array([0, 0], np.int64)),
                            self.const(f"{b}_ends", np.array([(h - 1) * uh + 1, (w - 1) * uw + 1], np.int64)),
                            self.const(f"{b}_axes", np.array([2, 3], np.int64))], [f"{b}_zeros_in"], f"{b}_slice")
        return f"{b}_zeros_in"

    def reshape_node(self, step: ReshapeStep, src: str, out: str) -> None:
        """``Reshape`` whose target keeps the batch size dynamic (:func:`reshape_target`)."""
        target = reshape_target(step, self.shapes[step.inputs[0]], self.shapes[step.output])
        self.node("Reshape", [src, self.const(f"{step.output}_shape", np.array(target, np.int64))], [out],
                  f"{step.output}_reshape")

    def layout_node(self, step: LayoutStep, src: str, out: str, fill: Callable[[], str]) -> None:
        """The data movement of ``step`` from ``src`` to ``out``: ``Transpose``, ``Resize`` (nearest,
        asymmetric, floor: plain replication), ``Pad`` (with the initializer ``fill()`` makes: the code
        or the real value of 0.0; made only for a Pad, so no graph holds an unused initializer) or
        ``Slice`` (an item of chunk / split)."""
        b = step.output
        rank = len(self.shapes[step.inputs[0]])
        if step.op in ("permute", "transpose"):
            perm = [d % rank for d in step.args] if step.op == "permute" else list(range(rank))
            if step.op == "transpose":
                i, j = (d % rank for d in step.args)
                perm[i], perm[j] = perm[j], perm[i]
            self.node("Transpose", [src], [out], f"{b}_transpose", perm=perm)
        elif step.op == "upsample":  # nearest, integer factors: output index i reads floor(i / f)
            scales = np.array([1.0] * (rank - 2) + [float(f) for f in step.args], np.float32)
            self.node("Resize", [src, "", self.const(f"{b}_scales", scales)], [out], f"{b}_resize", mode="nearest",
                      coordinate_transformation_mode="asymmetric", nearest_mode="floor")
        elif step.op == "pad":  # torch (last dim first) -> ONNX [begins..., ends...]
            begins, ends = [0] * rank, [0] * rank
            for i in range(len(step.args) // 2):
                begins[rank - 1 - i], ends[rank - 1 - i] = step.args[2 * i], step.args[2 * i + 1]
            self.node("Pad", [src, self.const(f"{b}_pads", np.array(begins + ends, np.int64)), fill()], [out],
                      f"{b}_pad", mode="constant")
        else:  # an item of chunk / split: a Slice along its dim
            dim = step.args[0] % rank
            start, stop = slice_bounds(step.op, step.args, self.shapes[step.inputs[0]][dim])
            self.node("Slice", [src, self.const(f"{b}_starts", np.array([start], np.int64)),
                                self.const(f"{b}_ends", np.array([stop], np.int64)),
                                self.const(f"{b}_axes", np.array([dim], np.int64))], [out], f"{b}_slice")


def _reads_batch(entry) -> bool:
    """A ReshapeStep shape entry that depends on the batch size (dim 0 of a tensor)."""
    if entry == "batch":
        return True
    if isinstance(entry, tuple):
        return (entry[0] == "size" and entry[2] == 0) or any(_reads_batch(e) for e in entry[1:])
    return False


def reshape_target(step: ReshapeStep, in_shape: tuple, out_shape: tuple) -> list:
    """The ONNX Reshape target of a ReshapeStep: the example's output shape with the dims that
    depend on the batch size made dynamic -- flatten: 0 (copy) before the merged dims, -1 for the
    merged dims; view / reshape: the one batch-dependent entry -1 (or 0, a copy of the input's
    dim 0, when it is a batch size at dim 0 and a -1 is already there). ValueError when two entries depend on the batch."""
    if step.flatten is not None:
        start = step.flatten[0] % len(in_shape)
        return [0] * start + [-1] + list(out_shape[start + 1:])
    target, dynamic = list(out_shape), [i for i, d in enumerate(step.shape) if _reads_batch(d)]
    has_minus_one = -1 in step.shape
    for i, d in enumerate(step.shape):
        if d == -1:
            target[i] = -1
    if not dynamic:
        return target
    if len(dynamic) == 1 and not has_minus_one:
        target[dynamic[0]] = -1
    elif dynamic == [0] and (step.shape[0] == "batch" or step.shape[0][0] == "size") and \
            out_shape[0] == in_shape[0]:
        target[0] = 0  # a batch size equal to the input's dim 0: copied
    else:
        raise ValueError(f"node {step.name!r}: a reshape with more than one batch-dependent dimension cannot be "
                         f"exported with a dynamic batch (shape {step.shape})")
    return target


def output_names(spec) -> list:
    """[(ONNX output name, slot)]: one tensor -> "logits"; a structure -> its keys / indices
    joined by "." (a dict ``{"boxes": ..., "scores": ...}`` -> "boxes", "scores"; a tuple ->
    "output.0", "output.1")."""
    if isinstance(spec, str):
        return [(OUTPUT_NAME, spec)]
    names = []
    for path, slot in output_leaves(spec):
        name = ".".join(str(p) for p in path)
        names.append((name if isinstance(path[0], str) else f"{STRUCTURED_OUTPUT_PREFIX}.{name}", slot))
    return names


def check_integer_model(int_model) -> None:
    """TypeError unless ``int_model`` is an IntegerModel; ValueError unless its rounding is
    "float32_rne" (onnxruntime's arithmetic, which the exported graphs are compared with)."""
    if not isinstance(int_model, IntegerModel):
        raise TypeError(f"int_model must be a pyzeroq IntegerModel (pyzeroq.to_integer), got {type(int_model).__name__}")
    if int_model.rounding != "float32_rne":
        raise ValueError(f"ONNX export needs rounding='float32_rne' (onnxruntime's arithmetic), "
                         f"got {int_model.rounding!r}")


def example_shapes(int_model: IntegerModel, example_input, pixels: str) -> tuple[np.ndarray, dict]:
    """(the example as the graph takes it, {value slot: shape}) from one simulator run:
    TypeError unless ``int_model`` is an IntegerModel; ``example_input`` checked as
    :meth:`IntegerModel.check_input` does (errors name "example_input"); float images become
    uint8 pixels for ``pixels="uint8"``."""
    check_integer_model(int_model)
    example = int_model.check_input(example_input, "example_input")
    if pixels == "uint8" and example.dtype != np.uint8:
        example = np.clip(np.rint(example.astype(np.float64) * PIXEL_MAX), 0, PIXEL_MAX).astype(np.uint8)
    try:
        env = int_model.run(example)
    except (ValueError, IndexError, RuntimeError) as exc:  # e.g. a concat of sizes that no longer match
        raise ValueError(f"example_input of shape {tuple(example.shape)} does not fit the model (the integer "
                         f"model fails on it: {type(exc).__name__}: {exc}); pass an input of the size "
                         "the model was quantized for") from exc
    return example, {k: tuple(v.shape) for k, v in env.items()}


def assemble(b: GraphBuilder, example: np.ndarray, graph_name: str, opsets: dict, ir_version: int,
             intermediate: bool = False):
    """The checked ModelProto of builder ``b`` after its handlers ran: input "input" (float32, or
    uint8 for ``b.pixels == "uint8"``) [N, ...] with a dynamic batch, one ``Identity`` per returned
    tensor named by :func:`output_names` (an internal value of that name renamed "<name>_value";
    a clash with "input" or a repeated key gets "_output"), and with ``intermediate`` every code
    slot of the plan as an extra output (its :func:`code_type`). ``opsets``: {domain: version}."""
    import onnx
    from onnx import TensorProto, helper

    im, shapes = b.im, b.shapes
    in_type = TensorProto.UINT8 if b.pixels == "uint8" else TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info(INPUT_NAME, in_type, [BATCH_DIM] + list(example.shape[1:]))]
    wanted = output_names(im.output)
    renamed = b.free_names({name for name, _ in wanted})
    outputs, taken = [], {INPUT_NAME}
    for name, slot in wanted:
        while name in taken:  # the graph input's name, or the same key twice
            name = f"{name}_output"
        taken.add(name)
        b.node("Identity", [renamed.get(slot, slot)], [name], f"{name}_output")
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [BATCH_DIM] + list(shapes[slot][1:])))
    if intermediate:
        outputs += [helper.make_tensor_value_info(renamed.get(st.output, st.output), code_type(st.out_q),
                                                  [BATCH_DIM] + list(shapes[st.output][1:]))
                    for st in im.steps if st.out_q is not None]
    graph = helper.make_graph(b.nodes, graph_name, inputs, outputs, b.inits)
    model = helper.make_model(graph, producer_name="pyzeroq",
                              opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])
    model.ir_version = ir_version
    onnx.checker.check_model(model)
    return model
