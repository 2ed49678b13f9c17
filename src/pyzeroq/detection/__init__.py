"""Task-specific zero-shot QAT for object detection (ICCV 2025), on Fashion-MNIST scenes.

    from pyzeroq import detection as det
    images, coco = det.make_scenes("test", 2000, seed=0)
    fp = det.load_pretrained_detector()
    qdet = det.quantize_detector(fp, det.DetectionQuantConfig(qat=det.QATConfig(weight_bits=4, act_bits=8)))
    det.evaluate_detector(qdet, images, coco)      # {"map", "map50", "map75"} by pycocotools
    qdet.save("detector_w4a8.pt"); det.load_detector("detector_w4a8.pt")

Modules: scenes (data), model (FCOS detector), interface (detector protocol, predict),
nms, metrics (pycocotools), sampling (seed labels, box refinement), synthesis
(stage 1; label_quality), qat (stage 2, on the shared quantizers of pyzeroq.quantizers:
learned-step LSQ mode), kd (stage 2's distillation targets: every call of shared modules,
EMA of the weights), api (quantize_detector, save/load), integer (to_quantized_model: a QAT
detector as a QuantizedModel for to_integer / export_onnx; as_detector), train, cli.
"""

from .api import load_detector, load_pretrained_detector, quantize_detector, save_detector
from .config import DetectionQuantConfig, QATConfig, SynthesisConfig
from .integer import as_detector, to_quantized_model
from .interface import Detector, DetectorProtocol, predict
from .metrics import coco_map, evaluate_detector
from .model import FCOSDetector
from .nms import batched_nms, box_iou, nms
from .sampling import refine_labels, seed_labels
from .scenes import make_scenes
from .synthesis import distilled_set, gaussian_set, label_quality, plot_samples, save_synthetic, synthesize

__all__ = ["make_scenes", "FCOSDetector", "Detector", "DetectorProtocol", "predict", "load_pretrained_detector",
           "load_detector", "save_detector", "quantize_detector", "DetectionQuantConfig", "QATConfig",
           "SynthesisConfig", "coco_map", "evaluate_detector", "nms", "batched_nms", "box_iou", "seed_labels",
           "refine_labels", "synthesize", "label_quality", "distilled_set", "gaussian_set", "save_synthetic", "plot_samples",
           "to_quantized_model", "as_detector"]
