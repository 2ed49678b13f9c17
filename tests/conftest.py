import numpy as np
import pytest
import torch


def pytest_report_header(config):
    from pyzeroq.integer import available_impls

    return f"pyzeroq integer simulator impls on this CPU: {', '.join(available_impls())}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture
def one_thread():
    """torch at one intra-op thread for the test (tiny tensors: more threads only add overhead and
    spin on a loaded machine; float reductions also follow the thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fashion_mnist_installed() -> bool:
    from pyzeroq.data import fashion_mnist_available
    return fashion_mnist_available()


requires_fashion_mnist = pytest.mark.skipif(not fashion_mnist_installed(),
                                            reason="Debian package dataset-fashion-mnist not installed")
