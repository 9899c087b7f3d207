"""Test-wide setup.

Without CUDA, Triton kernels run through Triton's interpreter. The interpreter reads ``TRITON_INTERPRET``
when ``@triton.jit`` decorates, so it must be set before anything imports ``effdense.kernels``.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
