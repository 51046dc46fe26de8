"""Shared fixtures. `device` runs a test on "cpu" always and on "cuda" where CuPy sees a GPU (shown as
skipped elsewhere, never silently dropped)."""
import os

import pytest

from tinymoe.engine.backend import cuda_available

os.environ.setdefault("MPLBACKEND", "Agg")

CUDA = pytest.param(
    "cuda",
    id="cuda",
    marks=[pytest.mark.cuda, pytest.mark.skipif(not cuda_available(), reason="needs CuPy and a CUDA device")],
)
DEVICES = [pytest.param("cpu", id="cpu"), CUDA]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
