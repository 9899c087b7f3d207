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


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 results are compared in fp32: cuDNN's convolutions take TF32 by default on Ampere and later (a
    10-bit mantissa), so naive's and a strategy's differently ordered sums differed by ~3e-4 of the largest
    gradient, above the tests' 1e-4 (seen on an H200 at 4c8a7e5). No effect without CUDA. (Tests that run
    effdense in a subprocess, the CLI's and DDP's, keep PyTorch's defaults there; none compares fp32 on CUDA.)"""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
