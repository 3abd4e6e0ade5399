"""The fused EMA codebook update against srcid.ops' reference and a float64 formula."""
import pytest
import torch

from srcid import ops
from srcid.errors import SrcidError
from srcid.kernels import ema_update_fused_, nearest_code_fused


def ema_float64(cluster_size, embed_sum, counts, sums, decay, eps):
    """Group after group in float64; Laplace smoothing written out code by code."""
    size = cluster_size.double().clone()
    embed = embed_sum.double().clone()
    num_codes, dim = embed.shape
    counts, sums = counts.double().reshape(-1, num_codes), sums.double().reshape(-1, num_codes, dim)
    codebook = None
    for g in range(counts.shape[0]):
        size = decay * size + (1.0 - decay) * counts[g]
        embed = decay * embed + (1.0 - decay) * sums[g]
        n = float(size.sum())
        smoothed = [(float(size[k]) + eps) / (n + num_codes * eps) * n for k in range(num_codes)]
        codebook = embed / torch.tensor(smoothed, dtype=torch.float64)[:, None]
    return size, embed, codebook


def random_state(codes, dim, groups, seed):
    gen = torch.Generator().manual_seed(seed)
    cluster_size = torch.rand(codes, generator=gen) * 5.0
    embed_sum = torch.randn(codes, dim, generator=gen)
    counts = torch.randint(0, 9, (groups, codes), generator=gen).float()
    counts[:, ::7] = 0.0  # codes no row picked this step
    sums = torch.randn(groups, codes, dim, generator=gen) * counts[..., None]
    return cluster_size, embed_sum, counts, sums


@pytest.mark.parametrize("codes,dim,groups", [(53, 19, 1), (53, 19, 3), (400, 64, 3), (17, 70, 2)])
def test_matches_reference_and_float64(codes, dim, groups):
    cluster_size, embed_sum, counts, sums = random_state(codes, dim, groups, seed=codes + dim + groups)
    if groups == 1:
        counts, sums = counts[0], sums[0]
    fused = [cluster_size.clone(), embed_sum.clone(), torch.full((codes, dim), 7.0)]
    ref = [cluster_size.clone(), embed_sum.clone(), torch.full((codes, dim), 7.0)]
    ema_update_fused_(*fused, counts, sums, decay=0.99, eps=1e-5)
    ops.ema_update_reference(*ref, counts, sums, decay=0.99, eps=1e-5)
    want = ema_float64(cluster_size, embed_sum, counts, sums, 0.99, 1e-5)
    for got, expected, w in zip(fused, ref, want):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.double(), w, rtol=1e-5, atol=1e-6)


def test_after_nearest_code_statistics_and_repeated_steps():
    """Three steps of fused nearest code + update, the fused update against the reference."""
    gen = torch.Generator().manual_seed(4)
    codes, dim, rows = 40, 24, 90
    codebook = torch.randn(codes, dim, generator=gen)
    state_f = [torch.zeros(codes), codebook.clone(), codebook.clone()]
    state_r = [torch.zeros(codes), codebook.clone(), codebook.clone()]
    for _ in range(3):
        x = torch.randn(rows, dim, generator=gen)
        stats = nearest_code_fused(x, state_r[2], stats=True, groups=3)
        ema_update_fused_(*state_f, stats.counts, stats.sums, decay=0.9, eps=1e-5)
        ops.ema_update_reference(*state_r, stats.counts, stats.sums, decay=0.9, eps=1e-5)
        for got, expected in zip(state_f, state_r):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        state_f[2].copy_(state_r[2])  # keep both paths on the same assignments next step


def test_strided_state_and_dispatch():
    codes, dim, groups = 30, 20, 3
    cluster_size, embed_sum, counts, sums = random_state(codes, dim, groups, seed=5)
    embed_t = embed_sum.t().contiguous().t()  # column-major, same values
    book_t = torch.zeros(dim, codes).t()
    size_strided = torch.zeros(codes * 2)[::2]
    size_strided.copy_(cluster_size)
    assert not embed_t.is_contiguous() and not book_t.is_contiguous() and not size_strided.is_contiguous()
    ops.ema_update_(size_strided, embed_t, book_t, counts, sums.transpose(1, 2).contiguous().transpose(1, 2),
                    decay=0.95, eps=1e-3, impl="fused")
    want = ema_float64(cluster_size, embed_sum, counts, sums, 0.95, 1e-3)
    for got, w in zip((size_strided, embed_t, book_t), want):
        torch.testing.assert_close(got.double(), w, rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_clear_errors():
    size, embed, book = torch.zeros(5), torch.zeros(5, 3), torch.zeros(5, 3)
    with pytest.raises(SrcidError, match=r"counts \(4,\) and sums \(4, 3\)"):
        ema_update_fused_(size, embed, book, torch.zeros(4), torch.zeros(4, 3), decay=0.9, eps=1e-5)
    with pytest.raises(SrcidError, match=r"cluster_size \(6,\)"):
        ema_update_fused_(torch.zeros(6), embed, book, torch.zeros(5), torch.zeros(5, 3), decay=0.9, eps=1e-5)
    with pytest.raises(SrcidError, match="counts must be float32"):
        ema_update_fused_(size, embed, book, torch.zeros(5, dtype=torch.int64), torch.zeros(5, 3), decay=0.9, eps=1e-5)
    with pytest.raises(SrcidError, match=r"codebook \(5,\)"):
        ema_update_fused_(size, embed, torch.zeros(5), torch.zeros(5), torch.zeros(5, 3), decay=0.9, eps=1e-5)
