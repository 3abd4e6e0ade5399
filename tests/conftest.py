"""Test-wide setup.

Without a GPU the Triton kernels run in Triton's interpreter, which must be
switched on before any kernel module is imported.
"""
import os

try:
    import torch

    _cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _cuda = False
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _cuda else "cuda")


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from several threads; one keeps the tests quick on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    """The tiny synthetic datasets (all six task folders), written once per test module."""
    from srcid.data.synth import synthesize

    out = tmp_path_factory.mktemp("synth")
    synthesize("tiny", out, seed=0, progress=False)
    return out
