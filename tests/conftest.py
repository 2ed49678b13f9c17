import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


def fashion_mnist_installed() -> bool:
    from pyzeroq.data import fashion_mnist_available
    return fashion_mnist_available()


requires_fashion_mnist = pytest.mark.skipif(not fashion_mnist_installed(),
                                            reason="Debian package dataset-fashion-mnist not installed")
