"""Naive baselines, written the way common VQ and CLUB code does it.

* Nearest code + EMA statistics: the dense ``N x L`` distance matrix
  (``torch.cdist``), a dense one-hot ``[N, L]`` and ``one_hot.T @ values``.
* EMA update: the usual lerp + Laplace smoothing, one group after another.
* CLUB all-pairs: the ``N x N x D`` tensor of ``y_j - mu_i`` materialised.
* CLUBSample: one shuffled negative per row (the estimator of the CLUB
  authors' code), a sampled rather than exact bound.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def nearest_code_naive(x, codebook, values, groups):
    """Indices, counts ``[G, L]`` and sums ``[G, L, D]`` through dense ``N x L`` tensors."""
    dist = torch.cdist(x.float(), codebook.float()) ** 2
    indices = dist.argmin(dim=1)
    one_hot = F.one_hot(indices, codebook.shape[0]).float()  # [N, L]
    one_hot = one_hot.view(groups, -1, codebook.shape[0])
    counts = one_hot.sum(dim=1)
    sums = one_hot.transpose(1, 2) @ values.float().view(groups, -1, values.shape[1])
    return indices, counts, sums


@torch.no_grad()
def ema_update_naive(cluster_size, embed_sum, codebook, counts, sums, decay, eps):
    """EMA update with lerp and Laplace smoothing, group by group, in place."""
    num_codes = codebook.shape[0]
    for g in range(counts.shape[0]):
        cluster_size.lerp_(counts[g], 1.0 - decay)
        embed_sum.lerp_(sums[g], 1.0 - decay)
        n = cluster_size.sum()
        smoothed = (cluster_size + eps) / (n + num_codes * eps) * n
        codebook.copy_(embed_sum / smoothed.unsqueeze(1))


def club_all_pairs_naive(mu, logvar, y):
    """(positive, negative) with the ``[..., N, N, D]`` pair tensor materialised."""
    inv_var = torch.exp(-logvar)
    positive = -0.5 * ((y - mu) ** 2 * inv_var).sum(-1)
    pairs = y.unsqueeze(-3) - mu.unsqueeze(-2)  # [..., i, j, D] = y_j - mu_i
    negative = (-0.5 * pairs**2 * inv_var.unsqueeze(-2)).sum(-1).mean(-1)
    return positive, negative


def club_all_pairs_bytes(shape, element_size=4):
    """Bytes of one ``[..., N, N, D]`` pair tensor for inputs of ``shape`` ``[..., N, D]``."""
    *lead, n, d = shape
    count = n * n * d
    for size in lead:
        count *= size
    return count * element_size


def club_sample(mu, logvar, y, generator=None):
    """(positive, negative) with one shuffled negative ``y_perm(i)`` per row (CLUBSample)."""
    n = y.shape[-2]
    perm = torch.randperm(n, generator=generator, device=y.device)
    inv_var = torch.exp(-logvar)
    positive = -0.5 * ((y - mu) ** 2 * inv_var).sum(-1)
    negative = -0.5 * ((y.index_select(-2, perm) - mu) ** 2 * inv_var).sum(-1)
    return positive, negative
