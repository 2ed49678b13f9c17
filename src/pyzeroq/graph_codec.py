"""The whitelisted, code-free description of a quantized model's torch.fx graph and modules.

:func:`encode_graph` turns a :class:`torch.fx.GraphModule` (after pyzeroq's surgery) into
dicts, lists, primitives and tensor specs only; :func:`decode_graph` rebuilds it from that
description without unpickling objects or executing code from the file (torch.fx compiles
the rebuilt graph as usual). Used by :mod:`pyzeroq.io`::

    {"nodes": [node, ...], "modules": [module, ...]}

    node   = {"op": "placeholder" | "get_attr" | "call_function" | "call_method" |
                    "call_module" | "output",
              "name": str, "target": str, "args": value, "kwargs": value,
              "type": "torch.Tensor" | "str:torch.Tensor" | None}      # the annotation
    module = {"name": qualified name ("" = the GraphModule root; named_modules order),
              "class": key, "attrs": {name: value}, "params": [[name, spec | None]],
              "buffers": [[name, spec | None, persistent]], "nonpersistent": {name: tensor}}
           | {"name": str, "alias": qualified name}      # one module under two names
    spec   = {"shape": [int], "dtype": "float32", "requires_grad": bool} | {"alias": name}

``value`` is None / bool / int / float / str, a list of values, or a one-key tagged
dict: ``{"tuple": [..]}``, ``{"dict": [[key, value], ..]}``, ``{"slice": [start, stop,
step]}``, ``{"size": [..]}`` (torch.Size), ``{"torch": "float32"}`` (a dtype, layout or
memory format), ``{"device": "cpu"}``, ``{"ellipsis": None}``, ``{"code_format": {signed,
narrow_range, symmetric}}`` (a quantizer's :class:`pyzeroq.qspec.CodeFormat`), ``{"node": name}`` (an
earlier graph node) and ``{"module": name}`` (a module of the model: the plain
cross-references ``input_quant`` / ``output_quant`` / ``same_as``).

Whitelists (checked when saving, so that every saved file loads, and again when loading):

* module classes: ``pyzeroq.QuantAct`` / ``WeightQuant`` / ``QuantConv2d`` / ``QuantConv1d`` /
  ``QuantLinear``; ``pyzeroq.Normalize`` (any input normalizer with buffers ``mean`` /
  ``std`` computing exactly ``(x - mean) / std``, rebuilt as
  :class:`pyzeroq.models.Normalize`); ``torch.nn.<Name>`` classes defined under
  ``torch.nn.`` (rebuilt from their primitive attributes, without calling ``__init__``);
* call_function targets: public ``operator`` and ``math`` functions (not
  ``operator.attrgetter`` / ``methodcaller`` / ``call``); in ``torch`` and
  ``torch.nn.functional`` the tensor ops (C builtins) and the Python functions defined in
  ``torch.functional`` / ``torch.nn.functional`` -- not ``torch.load`` / ``save`` /
  ``from_file`` / ``compile`` / ``vmap`` / ``set_*`` / ``import_ir_module`` ...; and
  ``builtins.getattr`` of the tensor attributes in :data:`GETATTR_NAMES`;
* call_method targets: public ``torch.Tensor`` methods minus those leaving torch
  (``numpy``, ``tolist``, storage, hooks, ``apply_`` / ``map_`` ...);
* call_module / get_attr targets: rebuilt modules, parameters and buffers only.

"""

from __future__ import annotations

import builtins
import dataclasses
import keyword
import math
import operator
import re
from collections import OrderedDict

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.immutable_collections import immutable_dict, immutable_list

from .modules import is_normalizer
from .qspec import CodeFormat
from .quantizers import (
    QuantAct,
    QuantChannelAffine,
    QuantConv1d,
    QuantConv2d,
    QuantConvTranspose2d,
    QuantLinear,
    WeightQuant,
)

__all__ = ["encode_graph", "decode_graph", "plain", "GETATTR_NAMES", "NODE_OPS"]

NODE_OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")
_PRIMITIVES = (type(None), bool, int, float, str)
_NAME = re.compile(r"[A-Za-z0-9_]+\Z")  # one component of a module / parameter path
_PLACEHOLDER = re.compile(r"\*{0,2}[A-Za-z_][A-Za-z0-9_]*\Z")
_FUNCTION_NAMESPACES = {"operator": operator, "math": math, "builtins": builtins, "torch": torch,
                        "torch.nn.functional": F}
_DENIED_FUNCTIONS = {"operator": {"attrgetter", "methodcaller", "call"}, "torch": {"from_file"}}
# torch / torch.nn.functional: the tensor ops (C builtins) and the Python functions of these modules;
# not torch.load / save / compile / vmap / set_* / import_ir_module ... (other modules or C bindings)
_TORCH_FUNCTION_MODULES = ("torch.functional", "torch.nn.functional")
_ALLOWED_BUILTINS = {"getattr"}
GETATTR_NAMES = frozenset({"shape", "dtype", "device", "ndim", "T", "mT", "H", "mH", "is_cuda", "requires_grad",
                           "layout", "real", "imag", "data"})
_DENIED_METHODS = {"numpy", "tolist", "storage", "untyped_storage", "apply_", "map_", "map2_", "register_hook",
                   "register_post_accumulate_grad_hook", "backward", "share_memory_", "pin_memory",
                   "record_stream", "set_", "module_load", "data_ptr"}
# node type annotations kept (they only show in the generated code): the class, or the string
# annotation of a module with ``from __future__ import annotations``; others are dropped
_TYPES = {"torch.Tensor": torch.Tensor, "str:torch.Tensor": "torch.Tensor"}
_TYPE_KEYS = {v: k for k, v in _TYPES.items()}
_MODULE_INTERNALS = frozenset(nn.Module().__dict__) - {"training"}
def _rnn_flat_weights(m: nn.Module) -> list:
    """An RNN's list of its own weights (and of weak references to them), rebuilt by torch's
    ``nn.RNNBase._init_flat_weights``."""
    m._init_flat_weights()
    return m._flat_weights


# State not saved, rebuilt on load from the module (attributes and tensors already in place): calibration /
# cache state, reset; an RNN's list of references to its own weights (a float op kept by float_ops="warn").
_TRANSIENT = {QuantAct: {"_min": lambda m: None, "_max": lambda m: None, "_samples": lambda m: [],
                         "_sampled": lambda m: 0},
              WeightQuant: {"_cache": lambda m: None},
              **{cls: {"_flat_weights": _rnn_flat_weights, "_flat_weight_refs": lambda m: m._flat_weight_refs}
                 for cls in (nn.RNN, nn.LSTM, nn.GRU)}}


def _pyzeroq_classes() -> dict:
    from .models import Normalize
    return {"pyzeroq.QuantAct": QuantAct, "pyzeroq.WeightQuant": WeightQuant, "pyzeroq.QuantConv2d": QuantConv2d,
            "pyzeroq.QuantConv1d": QuantConv1d, "pyzeroq.QuantConvTranspose2d": QuantConvTranspose2d,
            "pyzeroq.QuantChannelAffine": QuantChannelAffine,
            "pyzeroq.QuantLinear": QuantLinear, "pyzeroq.Normalize": Normalize}


# ---------------------------------------------------------------------------- values
def _encode(value, where: str, modules: dict | None = None):
    """``value`` in the tagged encoding of the module docstring; ValueError for anything else."""
    kind = type(value)
    if kind in _PRIMITIVES:
        return value
    if isinstance(value, np.generic):
        return _encode(value.item(), where, modules)
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if isinstance(value, nn.Module) and modules is not None and id(value) in modules:
        return {"module": modules[id(value)]}
    if kind in (list, immutable_list):
        return [_encode(v, where, modules) for v in value]
    if kind is tuple:
        return {"tuple": [_encode(v, where, modules) for v in value]}
    if kind is torch.Size:
        return {"size": [int(v) for v in value]}
    if kind in (dict, immutable_dict):
        return {"dict": [[_encode(k, where, modules), _encode(v, where, modules)] for k, v in value.items()]}
    if kind is slice:
        return {"slice": [_encode(v, where, modules) for v in (value.start, value.stop, value.step)]}
    if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
        return {"torch": str(value).removeprefix("torch.")}
    if kind is torch.device:
        return {"device": str(value)}
    if value is Ellipsis:
        return {"ellipsis": None}
    if kind is CodeFormat:
        return {"code_format": value.to_dict()}
    raise ValueError(f"{where}: a {kind.__module__}.{kind.__qualname__} value cannot be saved "
                     f"(only primitives, tuples, lists, dicts, slices, dtypes, devices and references)")


def _torch_constant(name, where: str):
    value = getattr(torch, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
        raise ValueError(f"{where}: {name!r} is not a torch dtype, layout or memory format")
    return value


def _decode(value, where: str, nodes: dict | None = None, modules: dict | None = None):
    """Inverse of :func:`_encode`; node / module references resolve only through ``nodes`` / ``modules``."""
    kind = type(value)
    if kind in _PRIMITIVES:
        return value
    if kind is list:
        return [_decode(v, where, nodes, modules) for v in value]
    if kind is dict and len(value) == 1:
        (tag, body), = value.items()
        if tag == "tuple" and type(body) is list:
            return tuple(_decode(v, where, nodes, modules) for v in body)
        if tag == "dict" and type(body) is list and all(type(p) is list and len(p) == 2 for p in body):
            out = {}
            for k, v in body:
                k = _decode(k, where, nodes, modules)
                if not isinstance(k, (str, int, float, bool, type(None))):
                    raise ValueError(f"{where}: dict key {k!r:.80} is not a primitive")
                out[k] = _decode(v, where, nodes, modules)
            return out
        if tag == "slice" and type(body) is list and len(body) == 3:
            return slice(*(_decode(v, where, nodes, modules) for v in body))
        if tag == "size" and type(body) is list and all(type(v) is int for v in body):
            return torch.Size(body)
        if tag == "torch":
            return _torch_constant(body, where)
        if tag == "device" and type(body) is str:
            try:
                return torch.device(body)
            except RuntimeError as exc:
                raise ValueError(f"{where}: {body!r:.80} is not a torch device") from exc
        if tag == "ellipsis":
            return Ellipsis
        if tag == "code_format" and type(body) is dict and set(body) == set(CodeFormat().to_dict()) \
                and all(type(v) is bool for v in body.values()):
            return CodeFormat(**body)
        if tag == "node" and nodes is not None and type(body) is str and body in nodes:
            return nodes[body]
        if tag == "module" and modules is not None and type(body) is str and body in modules:
            return modules[body]
    raise ValueError(f"{where}: unexpected value {value!r:.120} in the file")


def _plain(value, where: str):
    """Config / report / selection data as plain Python (numpy scalars and arrays converted);
    on load, the check that the file holds nothing else there."""
    kind = type(value)
    if kind in _PRIMITIVES:
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if kind in (list, tuple):
        return kind(_plain(v, where) for v in value)
    if kind is dict:
        return {_plain(k, where): _plain(v, where) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value), where)
    raise ValueError(f"{where}: a {kind.__qualname__} value is not plain data (primitives, lists, tuples, dicts)")


# ---------------------------------------------------------------------------- graph
def _function_key(fn, where: str) -> str:
    name = getattr(fn, "__name__", None)
    for ns_name, ns in _FUNCTION_NAMESPACES.items():
        if isinstance(name, str) and getattr(ns, name, None) is fn:
            key = f"{ns_name}.{name}"
            _resolve_function(key, where)
            return key
    raise ValueError(f"{where}: function {fn!r:.80} is not in the namespaces pyzeroq.save allows "
                     f"({', '.join(_FUNCTION_NAMESPACES)})")


def _is_tensor_op(fn) -> bool:
    if type(fn).__name__ == "builtin_function_or_method":
        return getattr(fn, "__self__", None) is None or getattr(fn, "__self__", None) is torch._C._nn
    return type(fn).__name__ == "function" and fn.__module__ in _TORCH_FUNCTION_MODULES


def _resolve_function(key, where: str):
    """The function of a whitelisted ``namespace.name`` key; ValueError for anything else."""
    ns_name, _, name = key.rpartition(".") if isinstance(key, str) else ("", "", "")
    ns = _FUNCTION_NAMESPACES.get(ns_name)
    allowed = ns is not None and name.isidentifier() and not name.startswith("_") and \
        (name in _ALLOWED_BUILTINS if ns_name == "builtins" else
         name not in _DENIED_FUNCTIONS.get(ns_name, ()) and not name.startswith("set_"))
    fn = getattr(ns, name, None) if allowed else None
    if ns_name.startswith("torch") and not _is_tensor_op(fn):
        fn = None
    if fn is None or not callable(fn) or isinstance(fn, type) or type(fn).__name__ == "module":
        raise ValueError(f"{where}: function {key!r:.80} is not allowed (call_function targets: public "
                         f"functions of {', '.join(_FUNCTION_NAMESPACES)}; builtins only getattr)")
    return fn


def _check_method(name, where: str) -> str:
    if not (isinstance(name, str) and name.isidentifier() and not name.startswith("_")
            and name not in _DENIED_METHODS and hasattr(torch.Tensor, name)):
        raise ValueError(f"{where}: method {name!r:.80} is not allowed (call_method targets: public "
                         "torch.Tensor methods that stay in torch)")
    return name


def _check_path(root: nn.Module, target, where: str, tensors_ok: bool) -> str:
    """``target`` must name a module (or, for get_attr, a parameter / buffer) of the rebuilt tree."""
    parts = target.split(".") if isinstance(target, str) else [None]
    mod = root
    for i, part in enumerate(parts):
        if not isinstance(part, str) or not _NAME.match(part):
            break
        if i == len(parts) - 1:
            if isinstance(mod._modules.get(part), nn.Module) or \
                    (tensors_ok and (mod._parameters.get(part) is not None or mod._buffers.get(part) is not None)):
                return target
        mod = mod._modules.get(part)
        if not isinstance(mod, nn.Module):
            break
    raise ValueError(f"{where}: target {target!r:.80} is not a {'module, parameter or buffer' if tensors_ok else 'module'} "
                     "of the saved model")


def _check_target(op: str, target, args: tuple, root: nn.Module, where: str):
    """The node target to create (function object for call_function), validated."""
    if op == "placeholder":
        if not isinstance(target, str) or not _PLACEHOLDER.match(target) or keyword.iskeyword(target.lstrip("*")):
            raise ValueError(f"{where}: placeholder name {target!r:.80} is not an identifier")
        return target
    if op == "output":
        if target != "output":
            raise ValueError(f"{where}: output node target must be 'output', got {target!r:.80}")
        return target
    if op in ("call_module", "get_attr"):
        return _check_path(root, target, where, tensors_ok=op == "get_attr")
    if op == "call_method":
        return _check_method(target, where)
    fn = _resolve_function(target, where)
    if fn is builtins.getattr and not (len(args) == 2 and type(args[1]) is str and args[1] in GETATTR_NAMES):
        raise ValueError(f"{where}: getattr only reads the tensor attributes {sorted(GETATTR_NAMES)}")
    return fn


def _graph_record(gm: fx.GraphModule) -> list[dict]:
    if type(gm.graph._codegen) is not fx.graph.CodeGen:
        raise ValueError(f"the graph uses a custom code generator ({type(gm.graph._codegen).__name__}); "
                         "pyzeroq.save supports plain torch.fx graphs")
    records = []
    for node in gm.graph.nodes:
        where = f"graph node {node.name!r}"
        if node.op not in NODE_OPS:
            raise ValueError(f"{where}: op {node.op!r} cannot be saved")
        target = _function_key(node.target, where) if node.op == "call_function" else node.target
        records.append({"op": node.op, "name": node.name, "target": target,
                        "args": _encode(tuple(node.args), where), "kwargs": _encode(dict(node.kwargs), where),
                        "type": _TYPE_KEYS.get(node.type) if isinstance(node.type, (type, str)) else None})
    return records


def _build_graph(records, root: nn.Module) -> fx.Graph:
    """The fx graph of ``records``; arguments may reference earlier nodes only."""
    if type(records) is not list:
        raise ValueError("graph nodes must be a list")
    graph, nodes = fx.Graph(), {}
    for i, rec in enumerate(records):
        if type(rec) is not dict or type(rec.get("name")) is not str or not rec["name"].isidentifier() \
                or rec.get("op") not in NODE_OPS:
            raise ValueError(f"graph node #{i}: malformed record {rec!r:.120}")
        where = f"graph node {rec['name']!r}"
        args = _decode(rec.get("args"), where, nodes)
        kwargs = _decode(rec.get("kwargs"), where, nodes)
        if type(args) is not tuple or type(kwargs) is not dict or \
                not all(type(k) is str and k.isidentifier() and not keyword.iskeyword(k) for k in kwargs):
            raise ValueError(f"{where}: args must be a tuple and kwargs a dict with identifier keys")
        target = _check_target(rec["op"], rec.get("target"), args, root, where)
        if rec["name"] in nodes:
            raise ValueError(f"{where}: duplicate node name")
        nodes[rec["name"]] = graph.create_node(rec["op"], target, args, kwargs, name=rec["name"],
                                               type_expr=_TYPES.get(rec.get("type")))
    graph.lint()
    return graph


# ---------------------------------------------------------------------------- modules
def _check_normalizer(m: nn.Module, name: str) -> None:
    """A user's normalizer is saved as :class:`pyzeroq.models.Normalize`: it must compute exactly that."""
    if set(m.state_dict()) != {"mean", "std"} or list(m.children()):
        raise ValueError(f"module {name!r} ({type(m).__qualname__}): an input normalizer is saved as "
                         "pyzeroq.models.Normalize and may hold only the buffers 'mean' and 'std'")
    shape = list(torch.broadcast_shapes(m.mean.shape, m.std.shape))
    shape = [1] * (4 - len(shape)) + shape
    shape = [(3 if i == 0 else 5) if d == 1 else d for i, d in enumerate(shape)]
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(m.mean.device)
    try:
        with torch.no_grad():
            same = torch.equal(m(x), (x - m.mean) / m.std)
    except Exception:  # a forward that does not take NCHW images is not (x - mean) / std either
        same = False
    if not same:
        raise ValueError(f"module {name!r} ({type(m).__qualname__}) has buffers mean / std but does not compute "
                         "exactly (x - mean) / std; pyzeroq.save rebuilds input normalizers as pyzeroq.models.Normalize")


def _class_key(m: nn.Module, name: str, classes: dict) -> str:
    for key, cls in classes.items():
        if type(m) is cls:
            return key
    cls = type(m)
    if cls.__module__.startswith("torch.nn.") and getattr(nn, cls.__name__, None) is cls:
        return f"torch.nn.{cls.__name__}"
    if is_normalizer(m):
        _check_normalizer(m, name)
        return "pyzeroq.Normalize"
    raise ValueError(f"module {name!r} is a {cls.__module__}.{cls.__qualname__}: pyzeroq.save rebuilds only "
                     "pyzeroq quantizers and quantized layers, the input normalizer and torch.nn built-in modules")


def _resolve_class(key, where: str, classes: dict):
    if key in classes:
        return classes[key]
    name = key.removeprefix("torch.nn.") if isinstance(key, str) and key.startswith("torch.nn.") else ""
    cls = getattr(nn, name, None) if name.isidentifier() and not name.startswith("_") else None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and cls.__module__.startswith("torch.nn.")):
        raise ValueError(f"{where}: class {key!r:.80} is not allowed (pyzeroq.QuantAct / WeightQuant / "
                         "QuantConv2d / QuantLinear / Normalize or a torch.nn built-in module)")
    return cls


def _tensor_spec(t, tensor_names: dict, qualified: str):
    if t is None:
        return None
    if id(t) in tensor_names:
        return {"alias": tensor_names[id(t)]}
    tensor_names[id(t)] = qualified
    return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "requires_grad": t.requires_grad}


def _module_record(name: str, m: nn.Module, key: str, names: dict, tensor_names: dict) -> dict:
    where = f"module {name!r}"
    hooks = [k for k in _MODULE_INTERNALS if "hook" in k and k.endswith("hooks") and getattr(m, k, None)]
    if hooks:
        raise ValueError(f"{where} has hooks ({', '.join(sorted(hooks))}), which pyzeroq.save cannot keep")
    prefix = f"{name}." if name else ""
    attrs = {"training": m.training}
    if name and key != "pyzeroq.Normalize":
        transient = _TRANSIENT.get(type(m), {})
        for k, v in m.__dict__.items():
            if k not in _MODULE_INTERNALS and k not in transient:
                try:
                    attrs[k] = _encode(v, f"{where} attribute {k!r}", names)
                except ValueError as exc:  # e.g. an LSTM kept in float (its weight list): name the module
                    raise ValueError(f"{exc}. pyzeroq.save rebuilds a torch.nn module from plain attributes; "
                                     f"{type(m).__name__} keeps other objects, so a model holding one (a float op "
                                     "kept by QuantConfig(float_ops='warn' / 'allow')) cannot be saved in this "
                                     "format: save the state_dict with torch.save and rebuild the model") from None
    persistent = {k: k not in m._non_persistent_buffers_set for k in m._buffers}
    return {"name": name, "class": key, "attrs": attrs,
            "params": [[k, _tensor_spec(p, tensor_names, prefix + k)] for k, p in m._parameters.items()],
            "buffers": [[k, _tensor_spec(b, tensor_names, prefix + k), persistent[k]] for k, b in m._buffers.items()],
            "nonpersistent": {k: b.detach().cpu().clone() for k, b in m._buffers.items()
                              if b is not None and not persistent[k]}}


def _module_records(gm: fx.GraphModule) -> list[dict]:
    classes, names, tensor_names, records = _pyzeroq_classes(), {}, {}, []
    everything = list(gm.named_modules(remove_duplicate=False))
    for name, m in everything:
        names.setdefault(id(m), name)
    for name, m in everything:
        if names[id(m)] != name:
            records.append({"name": name, "alias": names[id(m)]})
            continue
        key = "torch.fx.GraphModule" if not name else _class_key(m, name, classes)
        records.append(_module_record(name, m, key, names, tensor_names))
    return records


def _make_tensor(spec, where: str, tensors: dict, qualified: str):
    if spec is None:
        return None
    if type(spec) is dict and set(spec) == {"alias"} and spec["alias"] in tensors:
        return tensors[spec["alias"]]
    if type(spec) is not dict or type(spec.get("shape")) is not list or \
            not all(type(d) is int and d >= 0 for d in spec["shape"]):
        raise ValueError(f"{where}: malformed tensor spec {spec!r:.120}")
    dtype = _torch_constant(spec.get("dtype"), where)
    t = torch.empty(spec["shape"], dtype=dtype)
    tensors[qualified] = t
    return t


def _check_name(name, where: str) -> None:
    if type(name) is not str or not _NAME.match(name):
        raise ValueError(f"{where}: parameter / buffer name {name!r:.80} is not allowed")


def _new_module(rec: dict, where: str, classes: dict, root: nn.Module, tensors: dict) -> nn.Module:
    """Module of ``rec`` with its (empty) parameters and buffers; attributes come later."""
    if rec["name"]:
        cls = _resolve_class(rec.get("class"), where, classes)
        m = cls.__new__(cls)
        nn.Module.__init__(m)
    else:
        if rec.get("class") != "torch.fx.GraphModule":
            raise ValueError(f"{where}: the first module must be the torch.fx.GraphModule root")
        m = root
    prefix = f"{rec['name']}." if rec["name"] else ""
    nonpersistent = rec.get("nonpersistent", {})
    for item in rec.get("params", []):
        k, spec = item
        _check_name(k, where)
        t = _make_tensor(spec, where, tensors, prefix + k)
        m.register_parameter(k, None if t is None else t if isinstance(t, nn.Parameter)
                             else nn.Parameter(t, requires_grad=bool(spec.get("requires_grad", True))))
        tensors[prefix + k] = m._parameters[k]
    for item in rec.get("buffers", []):
        k, spec, persistent = item
        _check_name(k, where)
        t = _make_tensor(spec, where, tensors, prefix + k)
        if not persistent and t is not None:
            value = nonpersistent.get(k)
            if not isinstance(value, torch.Tensor) or value.shape != t.shape:
                raise ValueError(f"{where}: non-persistent buffer {k!r} has no value in the file")
            t.copy_(value)
        m.register_buffer(k, t, persistent=bool(persistent))
    return m


def _set_attrs(m: nn.Module, attrs, where: str, modules: dict) -> None:
    if type(attrs) is not dict:
        raise ValueError(f"{where}: attrs must be a dict")
    for k, v in attrs.items():
        if type(k) is not str or not k.isidentifier() or k.startswith("__") or k in _MODULE_INTERNALS \
                or k in m._modules or k in m._parameters or k in m._buffers:
            raise ValueError(f"{where}: attribute name {k!r:.80} is not allowed")
        m.__dict__[k] = _decode(v, f"{where} attribute {k!r}", modules=modules)
    if type(m.__dict__.get("training")) is not bool:
        raise ValueError(f"{where}: 'training' must be a bool")
    for k, make in _TRANSIENT.get(type(m), {}).items():
        m.__dict__[k] = make(m)


def _build_modules(records) -> nn.Module:
    """The module tree of ``records`` under a plain root (the GraphModule's children and tensors)."""
    if type(records) is not list or not records:
        raise ValueError("graph modules must be a non-empty list")
    classes, root, modules, tensors, built = _pyzeroq_classes(), nn.Module(), {}, {}, []
    for i, rec in enumerate(records):
        name = rec.get("name") if type(rec) is dict else None
        if type(name) is not str or (name and not all(_NAME.match(p) for p in name.split("."))) \
                or name in modules or (i == 0) != (name == ""):
            raise ValueError(f"module record #{i}: malformed or duplicate name {name!r:.80}")
        where = f"module {name!r}"
        try:
            if "alias" in rec:
                if rec["alias"] not in modules:
                    raise ValueError(f"{where}: alias of an unknown module {rec['alias']!r:.80}")
                m = modules[rec["alias"]]
            else:
                m = _new_module(rec, where, classes, root, tensors)
                built.append((m, rec, where))
            if name:
                parent, _, child = name.rpartition(".")
                if parent not in modules:
                    raise ValueError(f"{where}: its parent module comes later in the file")
                modules[parent].add_module(child, m)
        except (KeyError, TypeError, RuntimeError) as exc:
            raise ValueError(f"{where}: malformed record ({type(exc).__name__}: {exc})") from exc
        modules[name] = m
    for m, rec, where in built:
        _set_attrs(m, rec.get("attrs", {}), where, modules)
    return root


def _graph_module(record) -> fx.GraphModule:
    if type(record) is not dict:
        raise ValueError("the graph entry must be a dict")
    root = _build_modules(record.get("modules"))
    gm = fx.GraphModule(root, _build_graph(record.get("nodes"), root))
    # fx copies only the graph's targets, in graph order: restore the saved tree and order
    gm._modules = OrderedDict(root._modules)
    gm._parameters, gm._buffers = OrderedDict(root._parameters), OrderedDict(root._buffers)
    gm._non_persistent_buffers_set = set(root._non_persistent_buffers_set)
    gm.training = root.training
    return gm


def encode_graph(gm: fx.GraphModule) -> dict:
    """``{"nodes": [...], "modules": [...]}`` for ``gm``; raises ValueError (naming the node or
    module) for anything :func:`decode_graph` would refuse, so every encoded graph decodes."""
    record = {"modules": _module_records(gm), "nodes": _graph_record(gm)}
    _build_graph(record["nodes"], _build_modules(record["modules"]))
    return record


def decode_graph(record) -> fx.GraphModule:
    """The GraphModule described by ``record`` (CPU tensors, uninitialized values: load a state dict)."""
    return _graph_module(record)


def plain(value, where: str):
    """``value`` checked / converted to plain data (dicts, lists, primitives, tensors); ValueError naming ``where``."""
    return _plain(value, where)
