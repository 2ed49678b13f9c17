"""Integer-only detectors: a QAT detector as a :class:`pyzeroq.pipeline.QuantizedModel`.

    qmodel = to_quantized_model(qat_detector, images)   # BN folded, the shared records
    int_model = pyzeroq.to_integer(qmodel); pyzeroq.export_onnx(qmodel, "det.onnx", images[:1])
    as_detector(int_model, qat_detector).predict(images)      # decode / NMS in float, as before

Design (why a conversion, not QAT on the prepared graph). The QAT of
:mod:`pyzeroq.detection.qat` keeps BatchNorm separate and lets every quantized conv own its
input quantizer; ``to_integer`` and ``export_onnx`` read the records of the graph that
:func:`pyzeroq.modules.prepare` makes (BN folded, one quantizer per tensor, shared layers
split per call). Training on that graph would mean a second QAT path and retraining every
committed detector; instead :func:`to_quantized_model` *reuses* the prepared graph and
writes the QAT's learned records into it, so everything downstream (``to_integer``,
``integer_exact``, ``export_onnx``, ``save``) is the shared code, unchanged:

* the detector's float form (each quantized layer's *fake-quantized* weight, its bias, the
  BNs and level scales as trained) goes through :func:`pyzeroq.modules.prepare`;
* each layer of that graph (a copy per call for the level-shared head convs) folds a
  per-output-channel factor ``f`` into the QAT weight (BN ``gamma / sigma``, the level
  ``Scale``); its weight record is the QAT one with step ``s * |f|`` (codes mirrored,
  ``q -> qmin + qmax - q``, where ``f < 0``), so the integer weight codes are the QAT codes;
* the quantizer of each tensor a QAT layer reads takes that layer's learned input step and
  zero point; a tensor read by several QAT layers with different input quantizers (a block
  input read by ``conv1`` and the shortcut, an FPN level read by both towers) gets the union
  of their ranges at the highest of their bits;
* tensors the QAT model keeps in float (conv outputs before a residual or FPN add, the sums,
  the head outputs) are quantized at ``extra_bits`` with min/max (or MSE) ranges observed on
  ``images`` with every QAT quantizer (and the weights) quantizing
  (float [N, 1, H, W]: any unlabeled set, e.g. the synthetic calibration set);
* the int32 biases are fitted as in :func:`pyzeroq.quantize` (``report.bias_adjustments``).

So the converted model is *not* bit-identical to the QAT detector's fake quantization: BN is
folded (weight step ``s * |f|`` rounded to float32, bias rounded at the folded step), the
float tensors above are quantized, shared tensors take one range. The integer model and
onnxruntime are equal to the converted model's integer-exact fake quantization
(``pyzeroq.integer_exact``); ``bench/detection_integer.py`` measures the mAP of every stage
(committed W4A8 / W4A4 seed-0 detectors, min/max ranges on real or synthetic unlabeled images:
integer model within 0.1 mAP of the QAT detector; README, "Integer-only detectors").
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from ..config import ACT_RANGES, QuantConfig
from ..integer.steps import map_output
from ..modules import act_quants, fit_bias_scales, prepare, quant_layers
from ..pipeline import BITS_PER_BYTE, FLOAT_BITS, QuantizedModel, QuantReport, _size_bytes
from ..quantizers import QUANT_LAYER_TYPES, QuantLinear
from .interface import Detector, check_detector

CALIBRATION_BATCH = 64
MIN_FACTOR = 1e-12  # |f| below this: the channel's folded weight is zero, its QAT step is kept
FACTOR_RTOL = 1e-4  # the folded weight must be f * (QAT weight) per channel to this relative error


def _qat_layers(detector: nn.Module) -> dict[str, nn.Module]:
    layers = {n: m for n, m in detector.named_modules() if isinstance(m, QUANT_LAYER_TYPES)}
    if not layers or any(m.act_quant is None for m in layers.values()):
        raise ValueError("qat_detector must be a QAT detector (quantize_detector / load_detector of a quantized "
                         "checkpoint): its quantized layers own their input quantizer")
    floats = [n for n, m in detector.named_modules()
              if isinstance(m, (nn.Conv2d, nn.Linear)) and not isinstance(m, QUANT_LAYER_TYPES)]
    if floats:
        raise ValueError(f"qat_detector keeps float layers {floats} (first_layer_bits / head_bits None); an "
                         "integer-only detector needs every conv quantized")
    for n, m in layers.items():
        if m.weight_quant.mode != "quantize" or m.act_quant.mode != "quantize" or m.act_quant.bits is None:
            raise ValueError(f"qat_detector: layer {n!r} keeps float weights or input (first_layer_bits / head_bits "
                             "None, or not calibrated); an integer-only detector needs every conv quantized")
    return layers


def _float_form(detector: nn.Module, layers: dict) -> nn.Module:
    """A deep copy with every QAT layer replaced by its float conv / linear holding the
    fake-quantized weight (the detector itself is not changed)."""
    model = copy.deepcopy(detector)
    for name, q in layers.items():
        if isinstance(q, QuantLinear):
            fp = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
        elif type(q).__name__ != "QuantConv2d":
            raise ValueError(f"qat_detector: layer {name!r} is a {type(q).__name__}; only Conv2d / Linear convert")
        else:
            fp = nn.Conv2d(q.in_channels, q.out_channels, q.kernel_size, q.stride, q.padding, q.dilation, q.groups,
                           bias=q.bias is not None, padding_mode=q.padding_mode)
        with torch.no_grad():
            fp.weight.copy_(q.quantized_weight().detach())
            if q.bias is not None:
                fp.bias.copy_(q.bias.detach())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, fp)
    for attr in ("qat_config", "quant_info", "save"):
        model.__dict__.pop(attr, None)
    return model


def _source_name(name: str, copies: dict) -> str:
    return copies.get(name, name)


@torch.no_grad()
def _set_weight(layer: nn.Module, qat: nn.Module, name: str) -> None:
    """The QAT weight record, step scaled by the folded per-channel factor (module docstring)."""
    wq = qat.quantized_weight().detach().float().reshape(qat.weight.shape[0], -1)
    w = layer.weight.detach().float().reshape(layer.weight.shape[0], -1)
    norm = (wq * wq).sum(1)
    f = torch.where(norm > 0, (w * wq).sum(1) / norm.clamp(min=1e-30), torch.ones_like(norm))
    err = (w - f[:, None] * wq).abs().max()
    if err > FACTOR_RTOL * max(float(w.abs().max()), 1e-12):
        raise ValueError(f"layer {name!r}: the folded weight is not a per-channel multiple of the QAT weight "
                         f"(max error {float(err):.3g}); only BN / constant scales may be folded")
    src = qat.weight_quant
    layer.weight_quant.calibrate(layer.weight, src.bits)
    scale = src.effective_scale().detach().float().reshape(-1)
    zp = src.zero_point.detach().reshape(-1)
    tiny = f.abs() < MIN_FACTOR
    new_scale = torch.where(tiny, scale, scale * f.abs())
    new_zp = torch.where((f < 0) & ~tiny, src.qmin + src.qmax - zp, zp)
    layer.weight_quant.set_params(new_scale.reshape(layer.weight_quant.scale.shape),
                                  new_zp.reshape(layer.weight_quant.zero_point.shape))


def _union_params(quants: list) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(bits, scale, zero point) of one input quantizer for the QAT quantizers ``quants`` of a tensor."""
    first = quants[0]
    same = all(q.bits == first.bits and torch.equal(q.effective_scale(), first.effective_scale())
               and torch.equal(q.zero_point, first.zero_point) for q in quants)
    if same:
        return first.bits, first.effective_scale().detach().clone(), first.zero_point.clone()
    bits = max(q.bits for q in quants)
    lo = min(float(q.effective_scale().detach()) * (q.qmin - int(q.zero_point)) for q in quants)
    hi = max(float(q.effective_scale().detach()) * (q.qmax - int(q.zero_point)) for q in quants)
    scale, zp = first.fmt.params(np.array([lo, hi], dtype=np.float32), bits)
    return bits, torch.as_tensor(np.asarray(scale), dtype=torch.float32), torch.as_tensor(np.asarray(zp))


@torch.no_grad()
def _observe(gm: nn.Module, quants: list, images: torch.Tensor) -> None:
    """Ranges of ``quants`` on ``images`` (every other quantizer as set), then quantize with them."""
    for q in quants:
        q.reset()
        q.mode = "observe"
    for s in range(0, len(images), CALIBRATION_BATCH):
        gm(images[s:s + CALIBRATION_BATCH])
    for q in quants:
        q.freeze()


def _check_images(images) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise TypeError(f"images must be a float tensor [N, 1, H, W], got {type(images).__name__}")
    if images.dim() != 4 or images.shape[0] == 0 or not bool(torch.isfinite(images).all()):
        raise ValueError(f"images must be finite float images [N, 1, H, W] with N >= 1, got {tuple(images.shape)}")
    return images.float().cpu()


def to_quantized_model(qat_detector: nn.Module, images: torch.Tensor, extra_bits: int = 8,
                       act_range: str = "minmax") -> QuantizedModel:
    """The :class:`~pyzeroq.pipeline.QuantizedModel` of a QAT detector (module docstring), ready
    for ``pyzeroq.to_integer`` / ``integer_exact`` / ``export_onnx``; its forward returns the
    detector's raw output dict. ``images``: float [N, 1, H, W] for the ranges of the tensors the
    QAT model keeps in float, by ``act_range`` ("minmax" or "mse", as ``QuantConfig.act_range``).
    ``qat_detector`` is not changed.

    TypeError / ValueError naming the argument: ``qat_detector`` not a QAT detector or with a
    float layer (``head_bits`` / ``first_layer_bits`` None), ``images`` not finite float
    [N, 1, H, W], ``extra_bits`` not in 2..8, ``act_range`` not one of ``ACT_RANGES``."""
    check_detector(qat_detector)
    if not isinstance(extra_bits, int) or isinstance(extra_bits, bool) or not 2 <= extra_bits <= 8:
        raise ValueError(f"extra_bits must be an integer in 2..8, got {extra_bits!r}")
    if act_range not in ACT_RANGES:
        raise ValueError(f"act_range must be one of {ACT_RANGES}, got {act_range!r}")
    images = _check_images(images)
    _qat_layers(qat_detector)
    device = next(qat_detector.parameters()).device
    qat = copy.deepcopy(qat_detector).cpu().eval()
    layers = _qat_layers(qat)
    gm, info = prepare(_float_form(qat, layers), act_bits=extra_bits, per_channel=True, act_range=act_range)
    if info.float_ops:
        raise ValueError(f"qat_detector: ops without an integer form: {info.float_ops}")
    copies = {c: target for target, cs in info.shared_layers.items() for c in cs}
    glayers = quant_layers(gm)
    readers: dict[int, tuple] = {}
    for name, layer in glayers.items():
        src = _source_name(name, copies)
        if src not in layers:
            raise ValueError(f"qat_detector: graph layer {name!r} has no QAT layer {src!r}")
        _set_weight(layer, layers[src], name)
        readers.setdefault(id(layer.input_quant), (layer.input_quant, []))[1].append(layers[src].act_quant)
    for quant, sources in readers.values():  # the QAT's input quantizers, quantizing while the rest observe
        bits, scale, zp = _union_params(sources)
        quant.bits = bits
        quant.set_params(scale, zp)
        quant.mode = "quantize"
    extra = [q for q in act_quants(gm).values() if id(q) not in readers]
    _observe(gm, extra, images)
    adjustments = fit_bias_scales(gm)
    bit_widths = {n: int(m.weight_quant.bits) for n, m in glayers.items()}
    cfg = getattr(qat_detector, "qat_config", None)
    config = QuantConfig(weight_bits=getattr(cfg, "weight_bits", 8), act_bits=getattr(cfg, "act_bits", extra_bits),
                         act_range=act_range)
    report = QuantReport(layers=list(info.layers), folded_bn=dict(info.folded_bn), bias_adjustments=adjustments,
                         notes=[f"converted from a QAT detector by pyzeroq.detection.to_quantized_model; tensors the "
                                f"QAT model keeps in float quantized at {extra_bits} bits on {len(images)} images",
                                "config holds the bits and act_range only: its calibration fields do not describe "
                                "this model (see the detector's quant_info)"])
    report.params = {n: int(glayers[n].weight.numel()) for n in report.layers}
    report.size_bytes = _size_bytes(gm, report, bit_widths)
    report.fp_size_bytes = int(sum(p.numel() for p in qat_detector.parameters()) * FLOAT_BITS / BITS_PER_BYTE)
    gm.eval()
    return QuantizedModel(gm, bit_widths, config.act_bits, report, config).to(device)


class ConvertedDetector(Detector):
    """A detector protocol object around a raw-output model (a QuantizedModel, an IntegerModel,
    an onnxruntime session) with the decode / loss of the detector it came from."""

    def __init__(self, model, decoder: nn.Module):
        super().__init__()
        self.decoder = copy.deepcopy(decoder).cpu().eval()
        if isinstance(model, nn.Module):
            self.model = model
        else:
            self.model = None
            self.runner = model  # an IntegerModel / onnxruntime runner: a plain attribute

    def forward(self, x: torch.Tensor) -> dict:
        return self.model(x) if self.model is not None else self.runner(x)

    def decode(self, outputs, **kwargs):
        return self.decoder.decode(outputs, **kwargs)

    def loss(self, outputs, targets, **kwargs):
        return self.decoder.loss(outputs, targets, **kwargs)


def onnx_runner(session, output_spec):
    """x -> the output structure ``output_spec`` (``IntegerModel.output``) from an onnxruntime
    session of ``export_onnx``'s file (outputs named as :func:`pyzeroq.export.output_names`)."""
    from ..export import output_names

    names = dict((slot, name) for name, slot in output_names(output_spec))
    input_name = session.get_inputs()[0].name

    def run(x: torch.Tensor):
        outs = dict(zip([o.name for o in session.get_outputs()],
                        session.run(None, {input_name: x.detach().cpu().numpy()})))
        return map_output(output_spec, lambda slot: torch.from_numpy(outs[names[slot]]))

    return run


def as_detector(model, decoder: nn.Module) -> ConvertedDetector:
    """``model`` (QuantizedModel, ``integer_exact`` graph, IntegerModel or a callable x -> raw
    outputs) with ``decoder``'s decode / loss: ``predict`` / ``evaluate_detector`` work on it."""
    check_detector(decoder)
    if not callable(model):
        raise TypeError(f"model must be callable (images -> the detector's raw outputs), got {type(model).__name__}")
    return ConvertedDetector(model, decoder)


__all__ = ["to_quantized_model", "as_detector", "onnx_runner", "ConvertedDetector"]
