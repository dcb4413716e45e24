"""Shared test configuration: device parametrisation and the `cuda` marker.

Tests that need a GPU are marked ``cuda`` and skipped when none is visible;
``DEVICES`` (or the ``device`` fixture) runs a test on the CPU and, when a GPU
exists, on CUDA too.
"""

import os
import sys

import pytest
import torch

# Tests import helpers from this folder (e.g. `from conftest import DEVICES`).
sys.path.insert(0, os.path.dirname(__file__))

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]

# CUDA results are compared with the CPU's at float32 tolerances; TensorFloat-32 (on by default for cuDNN's
# convolutions and RNNs) rounds their inputs to 10 mantissa bits, so the CUDA tests run without it.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)


@pytest.fixture(params=DEVICES)
def device(request):
    """Runs a test once per available device type ("cpu", and "cuda" with a GPU)."""
    return request.param


@pytest.fixture
def per_slot_sgd():
    """A stacked ``[5, 3]`` slot tensor under MaskedSGD, and the same rows as separate parameters under
    ``torch.optim.SGD`` (NAO keeps one parameter per slot): ``(stacked, rows, masked_sgd, reference_sgd)``."""
    from bnao.supernet.optim import MaskedSGD

    torch.manual_seed(0)
    stacked = torch.nn.Parameter(torch.randn(5, 3))
    rows = [torch.nn.Parameter(stacked.detach()[i].clone()) for i in range(5)]
    masked = MaskedSGD([stacked], lr=0.1, momentum=0.9, weight_decay=0.01)
    reference = torch.optim.SGD(rows, lr=0.1, momentum=0.9, weight_decay=0.01)
    return stacked, rows, masked, reference


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny nets: OpenMP fork/join dominates such ops, and on a shared
    2-core machine spinning worker threads made files many times slower (test_train: 150 s vs 8 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
