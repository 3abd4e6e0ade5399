"""The reference ops of srcid.ops against float64 brute force, and the impl dispatch.

The dispatch tests that run the fused kernels build their inputs on the
``device`` fixture: the GPU where CUDA is present (compiled kernels), else the
CPU (Triton's interpreter).
"""
import os
import subprocess
import sys

import pytest
import torch

import srcid.kernels
from srcid import ops
from srcid.errors import SrcidError
from testing.oracles import brute_nearest, club_naive, ema_float64


@pytest.fixture(autouse=True)
def _no_process_choice(monkeypatch):
    monkeypatch.delenv("SRCID_KERNELS", raising=False)
    ops.set_kernels(None)
    yield
    ops.set_kernels(None)


def integer_grid(rows, codes, dim, generator):
    """Small-integer data: every float32 distance is exact and equal distances are common."""
    x = torch.randint(-2, 3, (rows, dim), generator=generator).float()
    codebook = torch.randint(-1, 2, (codes, dim), generator=generator).float()
    return x, codebook


@pytest.mark.parametrize("rows,codes,dim,groups", [(37, 53, 19, 1), (39, 53, 19, 3), (120, 200, 48, 3)])
def test_nearest_reference_matches_brute_force(rows, codes, dim, groups):
    gen = torch.Generator().manual_seed(rows * 1000 + codes)
    x = torch.randn(rows, dim, generator=gen)
    codebook = torch.randn(codes, dim, generator=gen)
    values = torch.randn(rows, dim, generator=gen)
    out = ops.nearest_code_reference(x, codebook, values=values, stats=True, groups=groups)
    indices, sq_dist, counts, sums = brute_nearest(x, codebook, values, groups)
    assert torch.equal(out.indices, indices)
    torch.testing.assert_close(out.sq_dist.double(), sq_dist, rtol=1e-5, atol=1e-4)
    shape = (codes,) if groups == 1 else (groups, codes)
    assert out.counts.shape == shape and out.sums.shape == shape + (dim,)
    assert torch.equal(out.counts.double().reshape(groups, codes), counts)
    torch.testing.assert_close(out.sums.double().reshape(groups, codes, dim), sums, rtol=1e-5, atol=1e-5)


def test_nearest_reference_ties_go_to_lowest_index():
    gen = torch.Generator().manual_seed(3)
    x, codebook = integer_grid(90, 40, 5, gen)
    codebook[33] = codebook[2]  # duplicated rows: the lower index must win
    codebook[20] = codebook[7]
    out = ops.nearest_code_reference(x, codebook, stats=True)
    indices, sq_dist, counts, _ = brute_nearest(x, codebook, x, 1)
    assert torch.equal(out.indices, indices)
    assert torch.equal(out.sq_dist, sq_dist.float())
    assert out.counts[33] == 0 and out.counts[20] == 0
    dist = ((x[:, None, :] - codebook[None]) ** 2).sum(-1)
    assert ((dist == dist.min(1, keepdim=True).values).sum(1) > 1).sum() > 10  # the data really has ties


def test_nearest_reference_half_input_and_no_stats():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(30, 16, generator=gen).half()
    codebook = torch.randn(25, 16, generator=gen)
    out = ops.nearest_code_reference(x, codebook)
    indices, sq_dist, _, _ = brute_nearest(x, codebook, x, 1)
    assert torch.equal(out.indices, indices)
    torch.testing.assert_close(out.sq_dist.double(), sq_dist, rtol=1e-5, atol=1e-4)
    assert out.counts is None and out.sums is None


def test_nearest_rejects_bad_shapes():
    with pytest.raises(SrcidError, match="codebook"):
        ops.nearest_code(torch.zeros(4, 3), torch.zeros(5, 2))
    with pytest.raises(SrcidError, match="values"):
        ops.nearest_code(torch.zeros(4, 3), torch.zeros(5, 3), values=torch.zeros(4, 2))
    with pytest.raises(SrcidError, match="3 equal groups"):
        ops.nearest_code(torch.zeros(4, 3), torch.zeros(5, 3), groups=3)


@pytest.mark.parametrize("groups", [1, 3])
def test_ema_reference_matches_float64(groups):
    gen = torch.Generator().manual_seed(11 + groups)
    codes, dim = 53, 19
    cluster_size = torch.rand(codes, generator=gen) * 4
    embed_sum = torch.randn(codes, dim, generator=gen)
    counts = torch.randint(0, 6, (groups, codes), generator=gen).float()
    counts[:, :5] = 0  # codes no row picked
    sums = torch.randn(groups, codes, dim, generator=gen)
    if groups == 1:
        counts, sums = counts[0], sums[0]
    state = [cluster_size.clone(), embed_sum.clone(), torch.zeros(codes, dim)]
    ops.ema_update_reference(*state, counts, sums, decay=0.99, eps=1e-5)
    expected = ema_float64(cluster_size, embed_sum, counts, sums, 0.99, 1e-5)
    for got, want in zip(state, expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def club_inputs(shape, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, generator=gen, dtype=torch.float64)
    logvar = 0.7 * torch.randn(shape, generator=gen, dtype=torch.float64)
    y = torch.randn(shape, generator=gen, dtype=torch.float64) * 1.5 + 0.4
    return [t.to(dtype).requires_grad_() for t in (mu, logvar, y)]


@pytest.mark.parametrize("shape", [(37, 19), (3, 2, 23, 11), (1, 64, 40)])
def test_club_reference_matches_all_pairs(shape):
    mu, logvar, y = club_inputs(shape, seed=sum(shape))
    got = ops.club_loglik_reference(mu, logvar, y)
    want = club_naive(mu, logvar, y)
    for g, w in zip(got, want):
        assert g.shape == shape[:-1]
        rel = ((g - w).abs().max() / w.abs().max()).item()
        assert rel < 1e-9
    weights = [torch.randn(shape[:-1], dtype=torch.float64) for _ in range(3)]
    grads_got = torch.autograd.grad(sum((g * w).sum() for g, w in zip(got, weights)), (mu, logvar, y))
    grads_want = torch.autograd.grad(sum((g * w).sum() for g, w in zip(want, weights)), (mu, logvar, y))
    for g, w in zip(grads_got, grads_want):
        assert ((g - w).abs().max() / w.abs().max()).item() < 1e-9


def test_club_reference_gradcheck():
    inputs = club_inputs((2, 5, 3), seed=7)
    assert torch.autograd.gradcheck(lambda *t: tuple(ops.club_loglik_reference(*t)), inputs)


def test_club_rejects_mismatched_shapes():
    with pytest.raises(SrcidError, match="one shape"):
        ops.club_loglik(torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(SrcidError, match="one shape"):
        ops.club_loglik(torch.zeros(3), torch.zeros(3), torch.zeros(3))


# -- dispatch -----------------------------------------------------------------------------------

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
