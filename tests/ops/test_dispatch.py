"""The choice between srcid.ops' references and the fused kernels (srcid/ops/dispatch.py).

The tests that run the fused kernels build their inputs on the ``device``
fixture: the GPU where CUDA is present (compiled kernels), else the CPU
(Triton's interpreter).
"""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import srcid.kernels
from srcid import ops
from srcid.errors import SrcidError

KERNELS = Path(__file__).resolve().parents[2] / "kernels"


@pytest.fixture
def fused_calls(monkeypatch):
    """Record which fused functions ran, still running them."""
    calls = []
    for name in ("nearest_code_fused", "ema_update_fused_", "club_loglik_fused"):
        real = getattr(srcid.kernels, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(srcid.kernels, name, spy)
    return calls


def _small_calls(device, impl=None):
    """One call of each op on ``device``; returns the results, to compare implementations."""
    gen = torch.Generator().manual_seed(17)
    x, codebook = torch.randn(8, 4, generator=gen).to(device), torch.randn(5, 4, generator=gen).to(device)
    out = ops.nearest_code(x, codebook, stats=True, impl=impl)
    state = [torch.ones(5, device=device), torch.zeros(5, 4, device=device), codebook.clone()]
    ops.ema_update_(*state, out.counts, out.sums, decay=0.9, eps=1e-5, impl=impl)
    mu, logvar, y = (torch.randn(6, 4, generator=gen).to(device) for _ in range(3))
    club = ops.club_loglik(mu, logvar, y, impl=impl)
    return out, state, club


def test_auto_uses_reference_on_cpu(fused_calls):
    assert ops.current_kernels() == "auto"
    assert ops.resolve(None, torch.device("cpu")) == "reference"
    assert ops.resolve(None, torch.device("cuda")) == "fused"
    _small_calls(torch.device("cpu"))
    assert fused_calls == []


def test_auto_uses_fused_on_cuda(fused_calls, cuda_device):
    _small_calls(cuda_device)
    assert fused_calls == ["nearest_code_fused", "ema_update_fused_", "club_loglik_fused"]


def test_impl_argument_selects_fused(fused_calls, device):
    fused = _small_calls(device, impl="fused")
    assert fused_calls == ["nearest_code_fused", "ema_update_fused_", "club_loglik_fused"]
    fused_calls.clear()
    reference = _small_calls(device, impl="reference")
    assert fused_calls == []
    # the same numbers both ways
    assert torch.equal(fused[0].indices, reference[0].indices) and torch.equal(fused[0].counts, reference[0].counts)
    for got, want in zip((fused[0].sq_dist, fused[0].sums, *fused[1], *fused[2]),
                         (reference[0].sq_dist, reference[0].sums, *reference[1], *reference[2])):
        assert got.device.type == device.type
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_environment_variable_selects_fused(fused_calls, monkeypatch, device):
    monkeypatch.setenv("SRCID_KERNELS", "fused")
    _small_calls(device)
    assert len(fused_calls) == 3
    monkeypatch.setenv("SRCID_KERNELS", "bogus")
    with pytest.raises(SrcidError, match="SRCID_KERNELS='bogus'"):
        _small_calls(device)


def test_set_kernels_overrides_environment(fused_calls, monkeypatch, device):
    monkeypatch.setenv("SRCID_KERNELS", "reference")
    ops.set_kernels("fused")
    assert ops.current_kernels() == "fused"
    _small_calls(device)
    assert len(fused_calls) == 3
    ops.set_kernels(None)
    assert ops.current_kernels() == "reference"
    with pytest.raises(SrcidError, match="--kernels 'gpu'"):
        ops.set_kernels("gpu")
    with pytest.raises(SrcidError, match="impl 'gpu'"):
        ops.nearest_code(torch.zeros(2, 2), torch.zeros(2, 2), impl="gpu")


def test_fused_on_cpu_without_interpreter_is_a_clear_error():
    script = (
        "import torch\n"
        "from srcid import ops\n"
        "from srcid.errors import SrcidError\n"
        "try:\n"
        "    ops.nearest_code(torch.zeros(4, 3), torch.zeros(5, 3), impl='fused')\n"
        "except SrcidError as exc:\n"
        "    print('SrcidError:', exc)\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="0", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("SrcidError: fused kernels need a CUDA device")
    assert "TRITON_INTERPRET=1" in lines[0]


def test_kernels_import_nothing_of_srcid_ops():
    """The ops check the inputs and call the kernels, never the other way round: no module of kernels/ imports
    srcid.ops (the kernels return plain tuples, which the ops name)."""
    for path in sorted(KERNELS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                module = node.module or ""
                names = [module] + [f"{module}.{alias.name}" for alias in node.names]
            else:
                continue
            assert not any(name == "srcid.ops" or name.startswith("srcid.ops.") for name in names), (path.name, names)
