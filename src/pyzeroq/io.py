"""Save and load quantized models: ``qmodel.save(path)`` / :func:`save`, ``pyzeroq.load(path)``.

A saved fake-quantized model is one ``torch.save`` of a dict of primitives and tensors
that ``torch.load(path, weights_only=True)`` reads: nothing in it is unpickled as a
Python object and no code from it is executed (the fx graph is rebuilt from a
whitelisted description, then compiled by torch.fx as usual)::

    {"format": "pyzeroq.quantized_model", "version": 1, "pyzeroq_version": "0.1.0",
     "config": {QuantConfig field: value},     # calibration_data dropped (None; shape in
     "calibration_data": None | {"shape": [..], "dtype": "float32"},   # this entry)
     "bit_widths": {layer: bits}, "act_bits": int | None,
     "report": {QuantReport field: value},     # dataclasses.asdict, numpy -> Python
     "selection": None | {Selection field: value},
     "training": bool,
     "graph": {"nodes": [...], "modules": [...]},   # pyzeroq.graph_codec
     "state_dict": QuantizedModel.state_dict()}   # tensors; quantizers' _extra_state dicts

The graph entry and its whitelists are described in :mod:`pyzeroq.graph_codec`; anything
it does not allow raises ValueError naming the node or module. Tensors load on the CPU
(``pyzeroq.load(path, device=...)`` moves the model). :func:`load` also dispatches to
the loaders of the other pyzeroq formats by their ``"format"`` key (:data:`LOADERS`).
"""


from __future__ import annotations

import dataclasses
import importlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from . import __version__
from ._checks import check_device, output_path, read_torch_file
from .graph_codec import decode_graph, encode_graph, plain
from .quantizers import Quantizer

__all__ = ["FORMAT", "VERSION", "LOADERS", "save", "load", "check_bit_widths"]

FORMAT = "pyzeroq.quantized_model"
VERSION = 1
# format key prefix -> (module, loader(path, device=...)) of the other pyzeroq formats
LOADERS = {
    "pyzeroq.integer_model": ("pyzeroq.integer.convert", "load_integer"),  # IntegerModel.save
    "pyzeroq.detection/": ("pyzeroq.detection", "load_detector"),  # quantized detectors, /1 and /2
}
# ---------------------------------------------------------------------------- public API
def check_bit_widths(model: nn.Module, state_dict, prefix: str = "") -> None:
    """ValueError naming the first layer (or activation quantizer) whose bits in ``state_dict``
    (the quantizers' ``_extra_state``) differ from ``model``'s; ``prefix`` is stripped from names."""
    own_bits = getattr(model, "bit_widths", None) or {}
    for key, value in state_dict.items():
        if not key.endswith("._extra_state") or not isinstance(value, dict) or "bits" not in value:
            continue
        name = key[:-len("._extra_state")]
        try:
            quantizer = model.get_submodule(name)
        except AttributeError:
            continue
        if not isinstance(quantizer, Quantizer):
            continue
        short = name.removeprefix(prefix)
        layer = short.removesuffix(".weight_quant")
        weights = layer != short
        mine = own_bits.get(layer, quantizer.bits) if weights else quantizer.bits
        if value["bits"] != mine:
            what, who = ("weights", "layer") if weights else ("activations", "activation quantizer")
            raise ValueError(f"{who} {layer!r}: the state dict has {value['bits']}-bit {what} where this model has "
                             f"{mine}-bit {what}; a state dict loads only into a model quantized with the same "
                             "bit widths (pyzeroq.load(path) rebuilds a saved model with its own)")


def save(qmodel: nn.Module, path) -> Path:
    """Write ``qmodel`` (a :class:`pyzeroq.pipeline.QuantizedModel`) to ``path`` in the format of the
    module docstring; ValueError (naming the node, module or attribute) for anything the loader
    would refuse. Returns the path."""
    gm = getattr(qmodel, "graph_module", None)
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"save expects a pyzeroq QuantizedModel (from pyzeroq.quantize), got {type(qmodel).__name__}")
    path = output_path(path, "path")
    config = qmodel.config
    data = getattr(config, "calibration_data", None)
    blob = {
        "format": FORMAT, "version": VERSION, "pyzeroq_version": __version__,
        "config": plain({f.name: getattr(config, f.name) for f in dataclasses.fields(config)
                          if f.name != "calibration_data"}, "config"),
        "calibration_data": None if data is None else {"shape": [int(d) for d in np.shape(data)],
                                                       "dtype": str(getattr(data, "dtype", "unknown"))},
        "bit_widths": plain(dict(qmodel.bit_widths), "bit_widths"), "act_bits": plain(qmodel.act_bits, "act_bits"),
        "report": plain(qmodel.report, "report"),
        "selection": plain(getattr(qmodel, "selection", None), "selection"),
        "training": qmodel.training,
        "graph": encode_graph(gm),
        "state_dict": _cpu_state(qmodel),
    }
    torch.save(blob, path)
    return path


def _cpu_state(model: nn.Module) -> OrderedDict:
    state = model.state_dict()
    out = OrderedDict((k, v.detach().cpu() if isinstance(v, torch.Tensor) else plain(v, f"state {k!r}"))
                      for k, v in state.items())
    out._metadata = getattr(state, "_metadata", None)
    if out._metadata is None:
        del out._metadata
    return out


def _read(path) -> dict:
    try:
        return read_torch_file(path, "a pyzeroq file")
    except ValueError as exc:
        raise ValueError(f"{exc}; known formats: {', '.join(_known_formats())}") from exc.__cause__


def _known_formats() -> list[str]:
    return [f"{FORMAT} (version {VERSION})", *(f"{prefix}*" for prefix in LOADERS)]


def load(path, device="cpu"):
    """Load any saved pyzeroq model, read with ``torch.load(weights_only=True)`` and dispatched on its
    ``"format"`` key: a fake-quantized model (:func:`save`; moved to ``device``), an integer model
    (``IntegerModel.save``) or a quantized detector (:data:`LOADERS`). ValueError naming the path
    and the known formats for anything else; ``device`` must exist on this machine (ValueError)."""
    check_device(device, "device")
    blob = _read(path)
    fmt = blob.get("format") if isinstance(blob, dict) else None
    if fmt == FORMAT:
        return _load_quantized(blob, path).to(device)
    for prefix, (module, attr) in LOADERS.items():
        if isinstance(fmt, str) and fmt.startswith(prefix):
            return getattr(importlib.import_module(module), attr)(path, device=device)
    raise ValueError(f"{path}: unknown file format {fmt!r:.80}; pyzeroq.load reads {', '.join(_known_formats())}")


def _config(data) -> tuple:
    """(QuantConfig, notes): unknown fields are dropped with a note; a "real" calibration keeps its
    name without the data (``calibration_data`` None)."""
    from .config import DISTILL_OPTIONS, QuantConfig, ReconstructionConfig

    known = {f.name for f in dataclasses.fields(QuantConfig)}
    kwargs = {k: v for k, v in data.items() if k in known and k != "calibration_data"}
    notes = [f"config fields unknown to pyzeroq {__version__} dropped on load: {sorted(set(data) - known)}"] \
        if set(data) - known else []
    if isinstance(kwargs.get("reconstruction"), dict):  # saved as its fields (a plain dict)
        saved = kwargs["reconstruction"]
        known = {f.name for f in dataclasses.fields(ReconstructionConfig)}
        fields = {k: v for k, v in saved.items() if k in known}
        if fields.get("blocks") is not None:  # tuples of layer names, saved as lists
            fields["blocks"] = tuple(tuple(block) for block in fields["blocks"])
        kwargs["reconstruction"] = ReconstructionConfig(**fields)
        if set(saved) - known:
            notes.append(f"reconstruction fields unknown to pyzeroq {__version__} dropped on load: "
                         f"{sorted(set(saved) - known)}")
    real = kwargs.get("calibration") == "real"
    if real:
        kwargs["calibration"] = "gaussian"
    try:
        config = QuantConfig(**kwargs)
    except ValueError:  # a file from before QuantConfig refused options that do nothing in their combination
        defaults = {k: getattr(QuantConfig, k) for k in (*DISTILL_OPTIONS, "sensitivity_act_quant")}
        dropped = {k: kwargs[k] for k, default in defaults.items() if kwargs.get(k, default) != default}
        if not dropped:
            raise
        config = QuantConfig(**{**kwargs, **{k: defaults[k] for k in dropped}})
        notes.append(f"config options that had no effect in their combination reset on load: {dropped}")
    if real:
        object.__setattr__(config, "calibration", "real")  # the data itself is not saved
    return config, notes


def _load_quantized(blob: dict, path):
    from .pipeline import Frontier, QuantizedModel, QuantReport, Relaxation, Selection

    version = blob.get("version")
    if type(version) is not int or version > VERSION:
        raise ValueError(f"{path}: {FORMAT} version {version!r} (written by pyzeroq {blob.get('pyzeroq_version')}); "
                         f"this pyzeroq {__version__} reads up to version {VERSION}")
    meta = {k: plain(blob.get(k), k) for k in ("config", "bit_widths", "act_bits", "report", "selection")}
    try:
        config, notes = _config(meta["config"])
        report_fields = {f.name for f in dataclasses.fields(QuantReport)}
        report = QuantReport(**{k: v for k, v in meta["report"].items() if k in report_fields})
        report.notes = list(report.notes) + notes
        selection = meta["selection"]
        if selection is not None:
            selection = dict(selection)
            selection["frontier"] = Frontier(**selection["frontier"]) if selection.get("frontier") else None
            selection["relaxation"] = Relaxation(**selection["relaxation"]) if selection.get("relaxation") else None
            selection = Selection(**selection)
    except (AttributeError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: malformed config, report or selection ({type(exc).__name__}: {exc})") from exc
    if not isinstance(meta["bit_widths"], dict):
        raise ValueError(f"{path}: malformed bit_widths (a dict of layer -> bits, got "
                         f"{type(meta['bit_widths']).__name__})")
    gm = decode_graph(blob.get("graph"))
    qmodel = QuantizedModel(gm, dict(meta["bit_widths"]), meta["act_bits"], report, config, selection)
    qmodel.train(bool(blob.get("training", False)))
    state = blob.get("state_dict")
    if not isinstance(state, dict):
        raise ValueError(f"{path}: no state_dict")
    try:
        check_bit_widths(qmodel, state, prefix="graph_module.")
    except ValueError as exc:
        raise type(exc)(f"{path}: {exc}") from None
    try:
        qmodel.load_state_dict(state)
    except RuntimeError as exc:  # missing / unexpected keys, shapes
        raise ValueError(f"{path}: the state dict does not fit the saved graph ({exc})") from exc
    return qmodel
