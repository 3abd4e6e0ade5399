"""The fused CLUB kernels against the naive all-pairs formula in float64 and srcid.ops' reference."""
import pytest
import torch

from srcid import ops
from srcid.errors import SrcidError
from srcid.kernels import club_loglik_fused
from srcid.kernels import club as club_module


def club_naive(mu, logvar, y):
    """All N x N pairs materialised: negative[i] = mean_j sum_d -(y_j - mu_i)^2 / (2 exp(logvar_i))."""
    inv_var = torch.exp(-logvar)
    positive = -0.5 * ((y - mu) ** 2 * inv_var).sum(-1)
    pairs = y.unsqueeze(-3) - mu.unsqueeze(-2)  # [..., i, j, D] = y_j - mu_i
    negative = (-0.5 * pairs**2 * inv_var.unsqueeze(-2)).sum(-1).mean(-1)
    return positive, negative, positive - 0.5 * logvar.sum(-1)


def inputs64(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, generator=gen, dtype=torch.float64) * 0.8 + 0.2
    logvar = torch.tanh(torch.randn(shape, generator=gen, dtype=torch.float64))
    y = torch.randn(shape, generator=gen, dtype=torch.float64) * 1.3 - 0.3
    return [t.requires_grad_() for t in (mu, logvar, y)]


def rel_err(got, want):
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def grads(terms, weights, leaves):
    loss = sum((t.double() * w).sum() for t, w in zip(terms, weights))
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("shape", [(37, 19), (3, 2, 37, 19), (2, 300, 24), (1, 530, 8)])
def test_values_and_gradients_match_float64(shape):
    leaves = inputs64(shape, seed=sum(shape))
    fused = club_loglik_fused(*(t.float() for t in leaves))
    want = club_naive(*leaves)
    for got, w in zip(fused, want):
        assert got.shape == shape[:-1] and got.dtype == torch.float32
        assert rel_err(got, w) < 2e-6
    weights = [torch.randn(shape[:-1], dtype=torch.float64) for _ in range(3)]
    for got, w in zip(grads(fused, weights, leaves), grads(want, weights, leaves)):
        assert rel_err(got, w) < 2e-5
    reference = ops.club_loglik_reference(*(t.float() for t in leaves))
    for got, r in zip(fused, reference):
        torch.testing.assert_close(got, r, rtol=1e-5, atol=1e-5)


def test_training_loss_gradient():
    """The MI loss uses positive and negative only: broadcast (stride-0) upstream gradients."""
    leaves = inputs64((2, 3, 45, 21), seed=3)
    fused = club_loglik_fused(*(t.float() for t in leaves))
    want = club_naive(*leaves)
    got_grads = torch.autograd.grad((fused.positive - fused.negative).mean(), leaves)
    want_grads = torch.autograd.grad((want[0] - want[1]).mean(), leaves)
    for got, w in zip(got_grads, want_grads):
        assert rel_err(got, w) < 2e-5
    loglik_grads = torch.autograd.grad(club_loglik_fused(*(t.float() for t in leaves)).loglik.sum(), leaves)
    want_ll = torch.autograd.grad(club_naive(*leaves)[2].sum(), leaves)
    for got, w in zip(loglik_grads, want_ll):
        assert rel_err(got, w) < 2e-5


def test_row_splits_of_the_column_reductions():
    assert club_module._splits(37) == (1, 37)
    splits, rows = club_module._splits(7680)
    assert splits == club_module.MAX_SPLITS and splits * rows >= 7680 and (splits - 1) * rows < 7680


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    leaves = inputs64((2, 40, 24), seed=9)
    low = [t.detach().to(dtype).requires_grad_() for t in leaves]
    fused = club_loglik_fused(*low)
    exact = [t.detach().to(dtype).double().requires_grad_() for t in leaves]
    want = club_naive(*exact)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    for got, w in zip(fused, want):
        assert got.dtype == dtype and rel_err(got, w) < tol
    weights = [torch.randn(2, 40, dtype=torch.float64) for _ in range(3)]
    for got, leaf, w in zip(grads(fused, weights, low), low, grads(want, weights, exact)):
        assert got.dtype == leaf.dtype and rel_err(got, w) < tol


def test_strided_inputs_and_dispatch():
    leaves = inputs64((19, 33, 2), seed=12)  # transposed below to [2, 33, 19]
    views = [t.float().permute(2, 1, 0) for t in leaves]
    assert not views[0].is_contiguous()
    fused = ops.club_loglik(*views, impl="fused")
    want = club_naive(*(t.permute(2, 1, 0) for t in leaves))
    for got, w in zip(fused, want):
        assert got.shape == (2, 33) and rel_err(got, w) < 2e-6
    weights = [torch.randn(2, 33, dtype=torch.float64) for _ in range(3)]
    for got, w in zip(grads(fused, weights, leaves), grads(want, weights, leaves)):
        assert rel_err(got, w) < 2e-5


def test_only_some_inputs_need_gradients():
    mu, logvar, y = inputs64((30, 12), seed=4)
    y_fixed = y.detach().float()
    fused = club_loglik_fused(mu.float(), logvar.float(), y_fixed)
    want = club_naive(mu, logvar, y.detach())
    got = torch.autograd.grad(fused.negative.sum(), (mu, logvar))
    expected = torch.autograd.grad(want[1].sum(), (mu, logvar))
    for g, w in zip(got, expected):
        assert rel_err(g, w) < 2e-5


def test_empty_and_bad_inputs():
    out = club_loglik_fused(torch.zeros(3, 0, 4), torch.zeros(3, 0, 4), torch.zeros(3, 0, 4))
    assert out.positive.shape == (3, 0) and out.loglik.shape == (3, 0)
    with pytest.raises(SrcidError, match=r"mu \(4, 3\), logvar \(4, 3\) and y \(5, 3\)"):
        club_loglik_fused(torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(5, 3))
    with pytest.raises(SrcidError, match="floating-point"):
        club_loglik_fused(torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(4, 3, dtype=torch.int32))


def test_large_common_offset_keeps_float32_accuracy():
    """y and mu far from zero: the shifted moments keep the negative term accurate in float32."""
    leaves = inputs64((2, 70, 16), seed=31)
    offset = torch.linspace(-300.0, 500.0, 16, dtype=torch.float64)
    leaves[0] = (leaves[0].detach() + offset).requires_grad_()
    leaves[2] = (leaves[2].detach() + offset).requires_grad_()
    fused = club_loglik_fused(*(t.float() for t in leaves))
    want = club_naive(*leaves)
    for got, w in zip(fused, want):
        assert rel_err(got, w) < 1e-5
    weights = [torch.randn(2, 70, dtype=torch.float64) for _ in range(3)]
    for got, w in zip(grads(fused, weights, leaves), grads(want, weights, leaves)):
        assert rel_err(got, w) < 1e-4
