"""Setup shared by the tests (tests/) and the benchmarks (bench/).

Without a GPU the Triton kernels run in Triton's interpreter, which must be
switched on before any kernel module is imported: pytest imports this file
before any test or benchmark module. The kernel tests build their inputs on
``DEVICE`` (the ``device`` fixture): the GPU where CUDA is present, so the
compiled kernels run there, else the CPU and the interpreter.

The repository root goes on ``sys.path`` (pytest's default import mode puts
it there too), so that tests and benchmarks share ``testing.oracles``.
"""
import os
import sys
from pathlib import Path

try:
    import torch

    _cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _cuda = False
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _cuda else "cuda")

# Where the kernel tests put their inputs (float64 references may still run on CPU copies).
DEVICE = "cuda" if _cuda else "cpu"

ROOT = str(Path(__file__).resolve().parent)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def device():
    """The device the kernel tests run on: ``cuda`` (compiled kernels) when available, else ``cpu`` (interpreter)."""
    import torch

    return torch.device(DEVICE)


@pytest.fixture(scope="session")
def cuda_device():
    """The GPU, for tests of the compiled kernels only (autotune configs, bf16 at paper sizes, CUDA graphs)."""
    if DEVICE != "cuda":
        pytest.skip("needs a CUDA device: checks the compiled kernels (no GPU here; the interpreter runs the rest)")
    import torch

    return torch.device("cuda")
