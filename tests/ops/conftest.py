"""Setup of the op tests (the ``device`` and ``cuda_device`` fixtures are the root conftest.py's)."""
import contextlib

import pytest

from srcid import ops


@pytest.fixture(autouse=True)
def _no_process_choice(monkeypatch):
    """Every op test starts from the default choice (``auto``): no ``SRCID_KERNELS``, no ``set_kernels``."""
    monkeypatch.delenv("SRCID_KERNELS", raising=False)
    ops.set_kernels(None)
    yield
    ops.set_kernels(None)


@contextlib.contextmanager
def _only_config(tuner, config):
    saved = tuner.configs
    tuner.configs = [config]  # one config: the autotuner launches it without benchmarking
    tuner.cache.clear()
    try:
        yield config
    finally:
        tuner.configs = saved
        tuner.cache.clear()


@pytest.fixture(scope="session")
def forced_config():
    """``with forced_config(autotuner, config):`` every launch of that kernel uses ``config`` alone."""
    return _only_config
