"""Test-wide setup.

The repository root's conftest.py, shared with the benchmarks, comes first:
Triton's interpreter without a GPU, DeepSpeed's accelerator, and the
``device`` and ``cuda_device`` fixtures of the kernel tests (tests/ops/conftest.py
has the rest of theirs).
"""
import os

import pytest


# Variables of a distributed launch. DeepSpeed writes them into os.environ when a test trains in this process, and
# the process group it starts keeps MASTER_PORT bound; a later test's subprocess that inherited them would try to
# join that group (a missing RANK, or EADDRINUSE on the port).
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "CROSS_RANK", "CROSS_SIZE",
              "MASTER_ADDR", "MASTER_PORT")


_LAUNCH_ENV_AT_START = {name: os.environ.get(name) for name in LAUNCH_ENV}


@pytest.fixture(autouse=True)
def launch_env_restored():
    """After every test the launch variables are what they were when the session started (a module fixture that
    trained in this process has set them by the time its first test starts)."""
    yield
    for name, value in _LAUNCH_ENV_AT_START.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


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
