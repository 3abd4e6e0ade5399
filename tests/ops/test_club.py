"""CLUB log-likelihoods: srcid.ops' reference, and the fused kernels, against the naive all-pairs formula in
float64 (and the fused kernels against the reference).

Inputs live on the ``device`` fixture (the GPU where CUDA is present, else the
CPU under Triton's interpreter); float64 leaves stay on the CPU, so the
gradients of the fused path flow back through ``.to(device)`` and are compared
with float64 autograd of the naive form. The tests taking ``cuda_device`` run
only on a GPU: every autotune config of the four kernels and bfloat16 inputs
at the paper's size (N = 2400, D = 256).
"""
import functools

import pytest
import torch

from srcid import ops
from srcid.errors import SrcidError
from srcid.kernels import club as club_module
from testing.oracles import club_naive


def club_fused(mu, logvar, y) -> ops.ClubLoglik:
    """The fused path through its op (inputs checked, then the kernels), whatever ``SRCID_KERNELS`` says."""
    return ops.club_loglik(mu, logvar, y, impl="fused")


def inputs64(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, generator=gen, dtype=torch.float64) * 0.8 + 0.2
    logvar = torch.tanh(torch.randn(shape, generator=gen, dtype=torch.float64))
    y = torch.randn(shape, generator=gen, dtype=torch.float64) * 1.3 - 0.3
    return [t.requires_grad_() for t in (mu, logvar, y)]


def on(device, leaves, dtype=torch.float32):
    """The fused path's inputs: the float64 CPU leaves cast and moved (differentiable)."""
    return [t.to(dtype).to(device) for t in leaves]


def rel_err(got, want):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return ((got - want).abs().max() / want.abs().max()).item()


def grads(terms, weights, leaves):
    loss = sum((t.double().to(w.device) * w).sum() for t, w in zip(terms, weights))
    return torch.autograd.grad(loss, leaves)


def random_weights(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3)]


# -- the PyTorch reference against float64 ----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(37, 19), (3, 2, 23, 11), (1, 64, 40)])
def test_club_reference_matches_all_pairs(shape):
    mu, logvar, y = inputs64(shape, seed=sum(shape))
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
    inputs = inputs64((2, 5, 3), seed=7)
    assert torch.autograd.gradcheck(lambda *t: tuple(ops.club_loglik_reference(*t)), inputs)


def test_club_rejects_mismatched_shapes():
    with pytest.raises(SrcidError, match="one shape"):
        ops.club_loglik(torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(SrcidError, match="one shape"):
        ops.club_loglik(torch.zeros(3), torch.zeros(3), torch.zeros(3))


# -- the fused kernels ------------------------------------------------------------------------------------------------

# (2, 289, 24): two row splits of the column reductions (145 and 144 rows, neither a multiple of the tiles) for
# each of two batch indices
@pytest.mark.parametrize("shape", [(37, 19), (3, 2, 37, 19), (2, 289, 24)])
def test_values_and_gradients_match_float64(shape, device):
    leaves = inputs64(shape, seed=sum(shape))
    fused = club_fused(*on(device, leaves))
    want = club_naive(*leaves)
    for got, w in zip(fused, want):
        assert got.shape == shape[:-1] and got.dtype == torch.float32 and got.device.type == device.type
        assert rel_err(got, w) < 2e-6
    weights = random_weights(shape[:-1], seed=1)
    for got, w in zip(grads(fused, weights, leaves), grads(want, weights, leaves)):
        assert rel_err(got, w) < 2e-5
    reference = ops.club_loglik_reference(*on(device, leaves))
    for got, r in zip(fused, reference):
        torch.testing.assert_close(got, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 19), (3, 1, 7), (2, 2, 1, 33), (1, 1)], ids=["N1", "N1-batch3", "N1-batch2x2", "N1-D1"])
def test_single_row_batches(shape, device):
    """N = 1: the only pair is (i, i), so negative equals positive; gradients as float64 autograd."""
    leaves = inputs64(shape, seed=100 + sum(shape))
    fused = club_fused(*on(device, leaves))
    want = club_naive(*leaves)
    for got, w in zip(fused, want):
        assert got.shape == shape[:-1]
        torch.testing.assert_close(got.cpu().double(), w.detach(), rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(fused.negative, fused.positive, rtol=2e-6, atol=1e-6)
    weights = random_weights(shape[:-1], seed=2)
    for got, w in zip(grads(fused, weights, leaves), grads(want, weights, leaves)):
        torch.testing.assert_close(got, w, rtol=2e-5, atol=2e-6)


def test_training_loss_gradient(device):
    """The MI loss uses positive and negative only: broadcast (stride-0) upstream gradients."""
    leaves = inputs64((2, 3, 45, 21), seed=3)
    fused = club_fused(*on(device, leaves))
    want = club_naive(*leaves)
    got_grads = torch.autograd.grad((fused.positive - fused.negative).mean(), leaves)
    want_grads = torch.autograd.grad((want[0] - want[1]).mean(), leaves)
    for got, w in zip(got_grads, want_grads):
        assert rel_err(got, w) < 2e-5
    loglik_grads = torch.autograd.grad(club_fused(*on(device, leaves)).loglik.sum(), leaves)
    want_ll = torch.autograd.grad(club_naive(*leaves)[2].sum(), leaves)
    for got, w in zip(loglik_grads, want_ll):
        assert rel_err(got, w) < 2e-5


def test_row_splits_of_the_column_reductions():
    assert club_module._splits(1) == (1, 1)
    assert club_module._splits(37) == (1, 37)
    splits, rows = club_module._splits(7680)
    assert splits == club_module.MAX_SPLITS and splits * rows >= 7680 and (splits - 1) * rows < 7680


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype, device):
    leaves = inputs64((2, 40, 24), seed=9)
    low = [t.detach().to(device=device, dtype=dtype).requires_grad_() for t in leaves]
    fused = club_fused(*low)
    exact = [t.detach().to(dtype).double().requires_grad_() for t in leaves]
    want = club_naive(*exact)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    for got, w in zip(fused, want):
        assert got.dtype == dtype and rel_err(got, w) < tol
    weights = random_weights((2, 40), seed=3)
    for got, leaf, w in zip(grads(fused, weights, low), low, grads(want, weights, exact)):
        assert got.dtype == leaf.dtype and rel_err(got, w) < tol


def test_strided_inputs_and_dispatch(device):
    leaves = inputs64((19, 33, 2), seed=12)  # transposed below to [2, 33, 19]
    views = [t.permute(2, 1, 0) for t in on(device, leaves)]
    assert not views[0].is_contiguous()
    fused = ops.club_loglik(*views, impl="fused")
    want = club_naive(*(t.permute(2, 1, 0) for t in leaves))
    for got, w in zip(fused, want):
        assert got.shape == (2, 33) and rel_err(got, w) < 2e-6
    weights = random_weights((2, 33), seed=4)
    for got, w in zip(grads(fused, weights, leaves), grads(want, weights, leaves)):
        assert rel_err(got, w) < 2e-5


def test_sliced_and_expanded_inputs(device):
    """mu a stepped, offset window of a wider tensor; logvar one row per dim for every (b, i) (stride 0);
    y the same rows for every batch index (stride 0). Gradients reach the underlying leaves."""
    batch, n, dim = 3, 29, 17
    gen = torch.Generator().manual_seed(13)
    wide = (torch.randn(batch, 2 * n, dim + 3, generator=gen, dtype=torch.float64) * 0.8).requires_grad_()
    lv_row = torch.tanh(torch.randn(dim, generator=gen, dtype=torch.float64)).requires_grad_()
    y_rows = torch.randn(n, dim, generator=gen, dtype=torch.float64).requires_grad_()
    leaves = (wide, lv_row, y_rows)

    def views(w, lv, y):
        return w[:, ::2, 1 : 1 + dim], lv.expand(batch, n, dim), y.expand(batch, n, dim)

    mu, logvar, y = views(*on(device, leaves))
    assert not mu.is_contiguous() and logvar.stride()[:2] == (0, 0) and y.stride(0) == 0
    fused = club_fused(mu, logvar, y)
    want = club_naive(*views(*leaves))
    for got, w in zip(fused, want):
        assert got.shape == (batch, n) and rel_err(got, w) < 2e-6
    weights = random_weights((batch, n), seed=5)
    for got, w in zip(grads(fused, weights, leaves), grads(want, weights, leaves)):
        assert rel_err(got, w) < 2e-5


def test_only_some_inputs_need_gradients(device):
    mu, logvar, y = inputs64((30, 12), seed=4)
    y_fixed = y.detach().float().to(device)
    fused = club_fused(mu.float().to(device), logvar.float().to(device), y_fixed)
    want = club_naive(mu, logvar, y.detach())
    got = torch.autograd.grad(fused.negative.sum(), (mu, logvar))
    expected = torch.autograd.grad(want[1].sum(), (mu, logvar))
    for g, w in zip(got, expected):
        assert rel_err(g, w) < 2e-5


def test_empty_and_bad_inputs(device):
    def zeros(*shape, dtype=torch.float32):
        return torch.zeros(*shape, dtype=dtype, device=device)

    out = club_fused(zeros(3, 0, 4), zeros(3, 0, 4), zeros(3, 0, 4))
    assert out.positive.shape == (3, 0) and out.loglik.shape == (3, 0)
    with pytest.raises(SrcidError, match=r"mu \(4, 3\), logvar \(4, 3\) and y \(5, 3\)"):
        club_fused(zeros(4, 3), zeros(4, 3), zeros(5, 3))
    with pytest.raises(SrcidError, match="floating-point"):
        club_fused(zeros(4, 3), zeros(4, 3), zeros(4, 3, dtype=torch.int32))


def test_large_common_offset_keeps_float32_accuracy(device):
    """y and mu far from zero: the shifted moments keep the negative term accurate in float32."""
    leaves = inputs64((2, 70, 16), seed=31)
    offset = torch.linspace(-300.0, 500.0, 16, dtype=torch.float64)
    leaves[0] = (leaves[0].detach() + offset).float().double().requires_grad_()
    leaves[2] = (leaves[2].detach() + offset).float().double().requires_grad_()
    fused = club_fused(*on(device, leaves))
    want = club_naive(*leaves)
    for got, w in zip(fused, want):
        assert rel_err(got, w) < 1e-5
    weights = random_weights((2, 70), seed=6)
    for got, w in zip(grads(fused, weights, leaves), grads(want, weights, leaves)):
        assert rel_err(got, w) < 1e-4


def test_offset_of_1e4_in_y_and_mu_against_float64_pairs(device):
    """A common offset of +1e4 (batch 0) and -1e4 (batch 1) on y and mu, the values rounded to float32
    first (ulp 1e-3 there), against float64 sums over all pairs (i, j) written out below. Unshifted
    float32 moments (mean(y^2) - mean(y)^2 ~ 1e8 - 1e8) would lose every digit of the spread."""
    batch, n, dim = 2, 45, 21
    gen = torch.Generator().manual_seed(44)
    shift = torch.tensor([1e4, -1e4], dtype=torch.float64)[:, None, None]
    mu = (torch.randn(batch, n, dim, generator=gen, dtype=torch.float64) * 0.7 + shift).float().double()
    y = (torch.randn(batch, n, dim, generator=gen, dtype=torch.float64) * 1.2 + 0.1 + shift).float().double()
    logvar = (torch.randn(batch, n, dim, generator=gen, dtype=torch.float64) * 0.5).float().double()
    leaves = [t.requires_grad_() for t in (mu, logvar, y)]
    fused = club_fused(*on(device, leaves))

    inv_var = torch.exp(-logvar)
    positive = -0.5 * ((y - mu) ** 2 * inv_var).sum(-1)
    # negative[b, i] = -1/2 * (1/n) * sum_j sum_d (y[b, j, d] - mu[b, i, d])^2 / exp(logvar[b, i, d])
    negative = torch.stack([
        torch.stack([-0.5 * ((y[b] - mu[b, i]) ** 2 * inv_var[b, i]).sum() / n for i in range(n)])
        for b in range(batch)
    ])
    loglik = positive - 0.5 * logvar.sum(-1)
    want = (positive, negative, loglik)
    for got, w in zip(fused, want):
        assert rel_err(got, w) < 1e-5
    assert rel_err(fused.negative, negative) < 1e-5 and float(negative.detach().abs().min()) < 1e3  # spread, not offset
    weights = random_weights((batch, n), seed=7)
    for got, w in zip(grads(fused, weights, leaves), grads(want, weights, leaves)):
        assert rel_err(got, w) < 1e-4


# -- compiled kernels only (CUDA) -----------------------------------------------------------------

CLUB_KERNELS = ("_moments_kernel", "_rows_kernel", "_grad_moments_kernel", "_grad_rows_kernel")
PAPER_SHAPES = [(2, 2400, 256), (3, 1001, 250)]  # the paper's N and D, and a ragged shape (4 row splits of 251)


def _config_params():
    return [
        pytest.param(name, i, id=name.strip("_") + "-" + "-".join(f"{k}{v}" for k, v in c.all_kwargs().items()))
        for name in CLUB_KERNELS
        for i, c in enumerate(getattr(club_module, name).configs)
    ]


def club_pairs_float64(mu, logvar, y, weights, chunk=32):
    """float64 terms over all pairs, rows i in chunks (the pair tensor never whole), and the gradients of
    ``sum_k weights[k] * term_k`` by autograd, chunk by chunk, where the inputs are."""
    mu, logvar, y = (t.detach().double().requires_grad_() for t in (mu, logvar, y))
    w_pos, w_neg, w_ll = (w.to(mu.device) for w in weights)
    positive = -0.5 * ((y - mu) ** 2 * torch.exp(-logvar)).sum(-1)
    loglik = positive - 0.5 * logvar.sum(-1)
    (positive * w_pos + loglik * w_ll).sum().backward()
    negative = []
    for i0 in range(0, mu.shape[-2], chunk):
        pairs = y.unsqueeze(-3) - mu[..., i0 : i0 + chunk, :].unsqueeze(-2)  # [B, c, N, D]
        inv_var = torch.exp(-logvar[..., i0 : i0 + chunk, :]).unsqueeze(-2)
        part = (-0.5 * pairs**2 * inv_var).sum(-1).mean(-1)
        (part * w_neg[..., i0 : i0 + chunk]).sum().backward()
        negative.append(part.detach())
    values = (positive.detach(), torch.cat(negative, -1), loglik.detach())
    return values, (mu.grad, logvar.grad, y.grad)


@functools.lru_cache(maxsize=None)
def _paper_case(shape, device_type):
    leaves = inputs64(shape, seed=sum(shape))
    inputs = [t.detach().float().to(device_type) for t in leaves]
    weights = random_weights(shape[:-1], seed=8)
    return inputs, weights, club_pairs_float64(*inputs, weights)


@pytest.mark.parametrize("kernel,config_index", _config_params())
def test_every_gpu_config_of_the_club_kernels_at_paper_sizes(kernel, config_index, cuda_device, forced_config):
    tuner = getattr(club_module, kernel)
    with forced_config(tuner, tuner.configs[config_index]):
        for shape in PAPER_SHAPES:
            inputs, weights, (want, want_grads) = _paper_case(shape, cuda_device.type)
            leaves = [t.clone().requires_grad_() for t in inputs]
            fused = club_fused(*leaves)
            for got, w in zip(fused, want):
                assert rel_err(got, w) < 1e-5, shape
            for got, w in zip(grads(fused, weights, leaves), want_grads):
                assert rel_err(got, w) < 1e-4, shape


def test_bfloat16_inputs_at_paper_size(cuda_device):
    shape = (2, 2400, 256)
    gen = torch.Generator().manual_seed(2400)
    leaves = [torch.randn(shape, generator=gen) * s + m for s, m in ((0.8, 0.2), (0.5, 0.0), (1.3, -0.3))]
    low = [t.to(device=cuda_device, dtype=torch.bfloat16).requires_grad_() for t in leaves]
    # upstream gradients reach the kernels in bfloat16: weights on the bfloat16 grid keep them exact
    weights = [w.to(torch.bfloat16).double() for w in random_weights(shape[:-1], seed=9)]
    fused = club_fused(*low)
    # float64 of the bfloat16 numbers themselves; the outputs are rounded to bfloat16 (2^-9 relative)
    want, want_grads = club_pairs_float64(*(t.detach() for t in low), weights)
    for got, w in zip(fused, want):
        assert got.dtype == torch.bfloat16 and rel_err(got, w) < 1e-2
    for got, w in zip(grads(fused, weights, low), want_grads):
        assert got.dtype == torch.bfloat16 and rel_err(got, w) < 1e-2
