"""The hot ops written out the slow and obvious way: one copy for the tests and the benchmarks.

* Oracles, in float64: :func:`float64_distances`,
  :func:`first_minimum`, :func:`float64_stats` and :func:`brute_nearest` (nearest
  code and its statistics), :func:`ema_float64` (the EMA update, code by code),
  :func:`club_naive` (CLUB terms with all ``N x N`` pairs materialised; in the
  inputs' dtype, so float64 leaves give float64 autograd).
* Naive baselines for the benchmarks, written the way common VQ and CLUB code
  does it, in the inputs' precision: :func:`nearest_code_naive` (dense
  ``N x L`` distances and one-hot), :func:`ema_update_naive` (lerp),
  :func:`club_sample` (CLUBSample: one shuffled negative per row, a sampled
  rather than exact bound); :func:`club_naive` serves as the naive all-pairs
  CLUB too, and :func:`club_all_pairs_bytes` says how large its pair tensor is.

``srcid.ops`` holds the references the library runs; these are what they are
checked against, so nothing here imports ``srcid``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


# -- nearest code + statistics -------------------------------------------------------------------------------------

def float64_distances(x, codebook, chunk=128):
    """``||x_i - c_l||^2`` in float64 from the differences (rows in chunks), where the inputs are."""
    x64, cb64 = x.double(), codebook.double()
    parts = [((x64[i : i + chunk, None, :] - cb64[None]) ** 2).sum(-1) for i in range(0, x64.shape[0], chunk)]
    return torch.cat(parts) if parts else x64.new_zeros(0, cb64.shape[0])


def first_minimum(dist):
    """Lowest index among each row's minima (integer min: no tie rule of a float argmin involved)."""
    best = dist.min(1).values
    codes = torch.arange(dist.shape[1], device=dist.device)
    return best, torch.where(dist == best[:, None], codes, dist.shape[1]).min(1).values


def float64_stats(indices, values, groups, num_codes):
    """Counts ``[G, L]`` and sums ``[G, L, D]`` of ``values`` per (group, code) of the given assignment, in float64."""
    n, dim = values.shape
    slot = indices.to(values.device) + torch.arange(n, device=values.device) // (n // groups) * num_codes
    counts = torch.zeros(groups * num_codes, dtype=torch.float64, device=values.device)
    counts.index_add_(0, slot, torch.ones(n, dtype=torch.float64, device=values.device))
    sums = torch.zeros(groups * num_codes, dim, dtype=torch.float64, device=values.device)
    sums.index_add_(0, slot, values.double())
    return counts.view(groups, num_codes), sums.view(groups, num_codes, dim)


def brute_nearest(x, codebook, values, groups):
    """``(indices, sq_dist, counts [G, L], sums [G, L, D])`` of the float64 first minimum."""
    best, indices = first_minimum(float64_distances(x, codebook))
    counts, sums = float64_stats(indices, values, groups, codebook.shape[0])
    return indices, best, counts, sums


# -- EMA update ----------------------------------------------------------------------------------------------------

def ema_float64(cluster_size, embed_sum, counts, sums, decay, eps):
    """``(cluster_size, embed_sum, codebook)`` after the update, group after group in float64 (on CPU); Laplace
    smoothing written out code by code. ``counts`` ``[L]`` or ``[G, L]``, ``sums`` ``[L, D]`` or ``[G, L, D]``."""
    size = cluster_size.detach().cpu().double().clone()
    embed = embed_sum.detach().cpu().double().clone()
    num_codes, dim = embed.shape
    counts = counts.detach().cpu().double().reshape(-1, num_codes)
    sums = sums.detach().cpu().double().reshape(-1, num_codes, dim)
    codebook = None
    for g in range(counts.shape[0]):
        size = decay * size + (1.0 - decay) * counts[g]
        embed = decay * embed + (1.0 - decay) * sums[g]
        n = float(size.sum())
        smoothed = [(float(size[k]) + eps) / (n + num_codes * eps) * n for k in range(num_codes)]
        codebook = embed / torch.tensor(smoothed, dtype=torch.float64)[:, None]
    return size, embed, codebook


# -- CLUB ----------------------------------------------------------------------------------------------------------

def club_naive(mu, logvar, y):
    """``(positive, negative, loglik)`` with the ``[..., N, N, D]`` pair tensor materialised:
    ``negative[i] = mean_j sum_d -(y_j - mu_i)^2 / (2 exp(logvar_i))``."""
    inv_var = torch.exp(-logvar)
    positive = -0.5 * ((y - mu) ** 2 * inv_var).sum(-1)
    pairs = y.unsqueeze(-3) - mu.unsqueeze(-2)  # [..., i, j, D] = y_j - mu_i
    negative = (-0.5 * pairs**2 * inv_var.unsqueeze(-2)).sum(-1).mean(-1)
    return positive, negative, positive - 0.5 * logvar.sum(-1)


def club_all_pairs_bytes(shape, element_size=4):
    """Bytes of one ``[..., N, N, D]`` pair tensor for inputs of ``shape`` ``[..., N, D]``."""
    *lead, n, d = shape
    count = n * n * d
    for size in lead:
        count *= size
    return count * element_size


# -- naive baselines (benchmarks) ----------------------------------------------------------------------------------

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


def club_sample(mu, logvar, y, generator=None):
    """(positive, negative) with one shuffled negative ``y_perm(i)`` per row (CLUBSample)."""
    n = y.shape[-2]
    perm = torch.randperm(n, generator=generator, device=y.device)
    inv_var = torch.exp(-logvar)
    positive = -0.5 * ((y - mu) ** 2 * inv_var).sum(-1)
    negative = -0.5 * ((y.index_select(-2, perm) - mu) ** 2 * inv_var).sum(-1)
    return positive, negative
