import numpy as np
import pytest
import torch
from torch import nn

from pyzeroq import evaluate


class _Oracle(nn.Module):
    """Predicts class = mean pixel bucket, so accuracy is known in advance."""

    def forward(self, x):
        bucket = (x.mean(dim=(1, 2, 3)) * 10).clamp(0, 9).long()
        return nn.functional.one_hot(bucket, 10).float()


def test_top1_and_per_class_against_hand_count():
    images = np.zeros((6, 28, 28), np.uint8)
    for i, v in enumerate([0, 30, 60, 90, 120, 250]):
        images[i] = v
    predicted = [0, 1, 2, 3, 4, 9]
    labels = np.array([0, 1, 2, 0, 4, 9])
    result = evaluate(_Oracle(), images, labels, batch_size=4)
    assert result.predictions.tolist() == predicted
    assert result.top1 == pytest.approx(5 / 6)
    assert result.per_class["T-shirt/top"] == 0.5 and result.per_class["Ankle boot"] == 1.0
    assert "Trouser" in result.table()


def test_bad_inputs():
    with pytest.raises(ValueError, match="labels"):
        evaluate(_Oracle(), np.zeros((3, 28, 28), np.uint8), [0, 1])
    with pytest.raises(TypeError, match="images"):
        evaluate(_Oracle(), [[0]], [0])
    with pytest.raises(TypeError, match="images"):
        evaluate(_Oracle(), torch.zeros(2, 28, 28, dtype=torch.int32), [0, 1])


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(device="bogus"), ValueError, "device 'bogus' is not a torch device"),
    (dict(device="meta"), ValueError, "device 'meta': pyzeroq runs on"),
    (dict(class_names=None), TypeError, "class_names must be a non-empty sequence"),
    (dict(class_names="abc"), TypeError, "class_names must be a non-empty sequence"),
    (dict(class_names=()), TypeError, "class_names must be a non-empty sequence"),
], ids=repr)
def test_bad_device_and_class_names_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        evaluate(_Oracle(), np.zeros((2, 28, 28), np.uint8), [0, 1], **kwargs)


def test_ragged_labels_named():
    images = np.zeros((2, 28, 28), np.uint8)
    with pytest.raises(ValueError, match="labels must be a 1-D array of class indices"):
        evaluate(_Oracle(), images, (images, [0, 1]))


def test_default_batch_predicts_as_one_batch():
    """The default batch (evaluation.DEFAULT_BATCH, chosen for speed) does not change a prediction."""
    from pyzeroq.data import load_fashion_mnist
    from pyzeroq.evaluation import DEFAULT_BATCH
    from pyzeroq.models import load_pretrained

    images, labels = load_fashion_mnist("embedded")
    images, labels = images[:2 * DEFAULT_BATCH + 37], labels[:2 * DEFAULT_BATCH + 37]  # a short last batch
    model = load_pretrained("resnet20")
    batched = evaluate(model, images, labels)
    whole = evaluate(model, images, labels, batch_size=len(images))
    assert np.array_equal(batched.predictions, whole.predictions) and batched.top1 == whole.top1


def test_predict_checks_its_model():
    from pyzeroq.evaluation import predict

    images = np.zeros((3, 28, 28), np.uint8)
    with pytest.raises(TypeError, match="model must be an nn.Module or a callable"):
        predict("m", images)
    with pytest.raises(ValueError, match=r"logits \[N, classes\], got shape \(3,\)"):
        predict(lambda x: x.sum((1, 2, 3)), images)
    assert predict(lambda x: x.flatten(1)[:, :4], images).tolist() == [0, 0, 0]
