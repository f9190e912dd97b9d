"""Test set-up: the Triton interpreter on machines without CUDA, poisoned kernel outputs.

TRITON_INTERPRET must be set before any @triton.jit function is defined, i.e. before
opensora_fast.kernels is imported, so it happens here at conftest import time.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # tiny CPU shapes: one thread is many times faster than two fighting over 2 shared cores
    torch.set_num_threads(1)
os.environ["OPENSORA_FAST_POISON"] = "1"  # kernel outputs start as NaN: unwritten elements fail

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA (bf16 at real shapes); skipped without a GPU")
    config.addinivalue_line("markers", "slow: minutes on CPU")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def triton_backend(monkeypatch):
    """Force the Triton kernels (interpreter on CPU) for the duration of a test."""
    monkeypatch.setenv("OPENSORA_FAST_BACKEND", "triton")


@pytest.fixture
def reference_backend(monkeypatch):
    monkeypatch.setenv("OPENSORA_FAST_BACKEND", "reference")


@pytest.fixture
def device():
    return "cuda" if HAS_CUDA else "cpu"
