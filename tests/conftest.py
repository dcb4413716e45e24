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
