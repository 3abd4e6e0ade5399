"""The hot operations of the method, behind one seam.

Two implementations share each signature:

* ``reference``: plain PyTorch, written for clarity; runs anywhere.
* ``fused``: Triton kernels from :mod:`srcid.kernels` (CUDA, or the CPU under
  ``TRITON_INTERPRET=1``).

``impl=None`` uses the process-wide choice: :func:`set_kernels` (the
``--kernels`` flag of every command), else the ``SRCID_KERNELS`` environment
variable, else ``auto`` (fused on CUDA tensors, reference otherwise).
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch

from srcid.errors import SrcidError

IMPLS = ("auto", "fused", "reference")
_process_choice: Optional[str] = None


class NearestCode(NamedTuple):
    indices: torch.Tensor  # [N] int64, nearest code (ties: lowest index)
    sq_dist: torch.Tensor  # [N] squared L2 distance to that code
    counts: Optional[torch.Tensor]  # [L] (or [G, L]) rows assigned to each code
    sums: Optional[torch.Tensor]  # [L, D] (or [G, L, D]) sum of `values` rows per code


class ClubLoglik(NamedTuple):
    positive: torch.Tensor  # [..., N]
    negative: torch.Tensor  # [..., N]
    loglik: torch.Tensor  # [..., N]


def set_kernels(impl: Optional[str]) -> None:
    """Set the process-wide implementation (``None`` returns to the environment's)."""
    global _process_choice
    if impl is not None and impl not in IMPLS:
        raise SrcidError(f"--kernels {impl!r}: choose one of {', '.join(IMPLS)}")
    _process_choice = impl


def current_kernels() -> str:
    choice = _process_choice or os.environ.get("SRCID_KERNELS", "auto") or "auto"
    if choice not in IMPLS:
        raise SrcidError(f"SRCID_KERNELS={choice!r}: choose one of {', '.join(IMPLS)}")
    return choice


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve(impl: Optional[str], device: torch.device) -> str:
    """Return ``"fused"`` or ``"reference"`` for a call on ``device``."""
    choice = impl if impl is not None else current_kernels()
    if choice not in IMPLS:
        raise SrcidError(f"impl {choice!r}: choose one of {', '.join(IMPLS)}")
    if choice == "auto":
        return "fused" if device.type == "cuda" else "reference"
    if choice == "fused" and device.type != "cuda" and not interpreter_active():
        raise SrcidError(
            f"fused kernels need a CUDA device (tensors are on {device.type}); "
            "use --kernels reference, or set TRITON_INTERPRET=1 before start-up to run them in Triton's interpreter"
        )
    return choice


def _fused():
    try:
        from srcid import kernels
    except ImportError as exc:  # triton missing or broken
        raise SrcidError(f"fused kernels are unavailable: {exc}") from None
    return kernels


# ----------------------------------------------------------------------------------------------
# nearest code + EMA statistics
# ----------------------------------------------------------------------------------------------

def _check_nearest_inputs(x, codebook, values, groups):
    if x.dim() != 2 or codebook.dim() != 2 or x.shape[1] != codebook.shape[1]:
        raise SrcidError(f"nearest_code: x {tuple(x.shape)} and codebook {tuple(codebook.shape)} must be [N, D] and [L, D]")
    if values is not None and values.shape != x.shape:
        raise SrcidError(f"nearest_code: values {tuple(values.shape)} must have the shape of x {tuple(x.shape)}")
    if groups < 1 or x.shape[0] % groups:
        raise SrcidError(f"nearest_code: {x.shape[0]} rows cannot be split into {groups} equal groups")


@torch.no_grad()
def nearest_code_reference(x, codebook, *, values=None, stats=False, groups=1) -> NearestCode:
    """Nearest code by squared L2, in plain PyTorch (float32 accumulation).

    With ``groups > 1`` the rows form ``groups`` equal contiguous blocks (for
    example audio, video, text) and the statistics come per block:
    ``counts [G, L]`` and ``sums [G, L, D]``.
    """
    _check_nearest_inputs(x, codebook, values, groups)
    xf = x.float()
    cb = codebook.float()
    # ||x||^2 is the same for every code of a row, so it does not change the argmin.
    scores = (cb * cb).sum(1)[None, :] - 2.0 * (xf @ cb.t())
    best, indices = scores.min(dim=1)  # torch returns the first minimum: ties go to the lowest index
    sq_dist = (best + (xf * xf).sum(1)).clamp_min_(0.0)
    counts = sums = None
    if stats:
        num_codes = cb.shape[0]
        rows_per_group = x.shape[0] // groups
        group_of_row = torch.arange(x.shape[0], device=x.device) // rows_per_group
        slot = indices + group_of_row * num_codes
        counts = torch.bincount(slot, minlength=groups * num_codes).to(torch.float32)
        src = (values if values is not None else x).float()
        sums = torch.zeros(groups * num_codes, x.shape[1], device=x.device, dtype=torch.float32)
        sums.index_add_(0, slot, src)
        if groups == 1:
            counts, sums = counts.view(num_codes), sums.view(num_codes, -1)
        else:
            counts, sums = counts.view(groups, num_codes), sums.view(groups, num_codes, -1)
    return NearestCode(indices, sq_dist, counts, sums)


def nearest_code(x, codebook, *, values=None, stats=False, groups=1, impl=None) -> NearestCode:
    """Nearest code of each row of ``x`` ``[N, D]`` in ``codebook`` ``[L, D]``.

    Returns ``(indices, sq_dist, counts, sums)``; see :class:`NearestCode`.
    ``sq_dist`` comes from the expansion ``||x||^2 - 2 x.c + ||c||^2`` and loses
    digits for rows far from the origin: losses recompute ``||x - c||^2`` directly.
    ``values`` (default ``x``) are the rows summed per assigned code, so MMEMA
    can sum mixed vectors under one modality's assignment. Never builds a
    dense ``N x L`` one-hot.
    """
    if resolve(impl, x.device) == "fused":
        _check_nearest_inputs(x, codebook, values, groups)
        return _fused().nearest_code_fused(x, codebook, values=values, stats=stats, groups=groups)
    return nearest_code_reference(x, codebook, values=values, stats=stats, groups=groups)


def _check_ema_inputs(cluster_size, embed_sum, codebook, counts, sums):
    num_codes, dim = codebook.shape if codebook.dim() == 2 else (-1, -1)
    grouped = counts.dim() == 2
    ok = (
        codebook.dim() == 2
        and cluster_size.shape == (num_codes,)
        and embed_sum.shape == (num_codes, dim)
        and counts.dim() in (1, 2)
        and counts.shape[-1] == num_codes
        and sums.shape == ((counts.shape[0], num_codes, dim) if grouped else (num_codes, dim))
    )
    if not ok:
        raise SrcidError(
            f"ema_update_: codebook {tuple(codebook.shape)} [L, D] needs cluster_size [L], embed_sum [L, D], "
            f"counts [L] or [G, L] and sums [L, D] or [G, L, D]; got cluster_size {tuple(cluster_size.shape)}, "
            f"embed_sum {tuple(embed_sum.shape)}, counts {tuple(counts.shape)}, sums {tuple(sums.shape)}"
        )


@torch.no_grad()
def ema_update_reference(cluster_size, embed_sum, codebook, counts, sums, *, decay: float, eps: float) -> None:
    """In-place EMA codebook update, one group after another (MMEMA order).

    For each group g: ``cluster_size = decay*cluster_size + (1-decay)*counts[g]``;
    ``embed_sum = decay*embed_sum + (1-decay)*sums[g]``; Laplace smoothing
    ``n * (cluster_size + eps) / (n + L*eps)`` with ``n = sum(cluster_size)``;
    ``codebook = embed_sum / smoothed``.
    """
    _check_ema_inputs(cluster_size, embed_sum, codebook, counts, sums)
    if counts.dim() == 1:
        counts, sums = counts[None], sums[None]
    num_codes = codebook.shape[0]
    for g in range(counts.shape[0]):
        cluster_size.mul_(decay).add_(counts[g], alpha=1.0 - decay)
        embed_sum.mul_(decay).add_(sums[g], alpha=1.0 - decay)
        n = cluster_size.sum()
        smoothed = (cluster_size + eps) / (n + num_codes * eps) * n
        codebook.copy_(embed_sum / smoothed[:, None])


def ema_update_(cluster_size, embed_sum, codebook, counts, sums, *, decay: float, eps: float, impl=None) -> None:
    """EMA update of a codebook from assignment statistics (in place, no host sync)."""
    if resolve(impl, codebook.device) == "fused":
        return _fused().ema_update_fused_(cluster_size, embed_sum, codebook, counts, sums, decay=decay, eps=eps)
    return ema_update_reference(cluster_size, embed_sum, codebook, counts, sums, decay=decay, eps=eps)


# ----------------------------------------------------------------------------------------------
# CLUB log-likelihoods
# ----------------------------------------------------------------------------------------------

def _check_club_inputs(mu, logvar, y):
    if not (mu.shape == logvar.shape == y.shape) or mu.dim() < 2:
        raise SrcidError(
            f"club_loglik: mu {tuple(mu.shape)}, logvar {tuple(logvar.shape)} and y {tuple(y.shape)} "
            "must share one shape [..., N, D]"
        )


def club_loglik_reference(mu, logvar, y) -> ClubLoglik:
    """CLUB log-likelihood terms in plain PyTorch, O(N*D) per batch.

    ``negative[i]`` averages over all j of the batch dimension N (dim -2)
    through the moment identity
    ``mean_j (y_j - mu_i)^2 = mean(y^2) - 2 mu_i mean(y) + mu_i^2 = var(y) + (mean(y) - mu_i)^2``.
    """
    _check_club_inputs(mu, logvar, y)
    inv_var = torch.exp(-logvar)
    positive = -0.5 * ((y - mu) ** 2 * inv_var).sum(-1)
    # Centred form of the same identity, mean_j (y_j - mu_i)^2 = var(y) + (mean(y) - mu_i)^2,
    # which does not cancel catastrophically when y and mu share a large offset.
    mean_y = y.mean(dim=-2, keepdim=True)
    var_y = ((y - mean_y) ** 2).mean(dim=-2, keepdim=True)
    negative = -0.5 * ((var_y + (mean_y - mu) ** 2) * inv_var).sum(-1)
    loglik = positive - 0.5 * logvar.sum(-1)
    return ClubLoglik(positive, negative, loglik)


def club_loglik(mu, logvar, y, *, impl=None) -> ClubLoglik:
    """CLUB terms for Gaussian ``q(y|x) = N(mu, exp(logvar))``, shapes ``[..., N, D]``.

    ``positive[i] = sum_d -(y_i - mu_i)^2 / (2 exp(logvar_i))``;
    ``negative[i] = mean_j sum_d -(y_j - mu_i)^2 / (2 exp(logvar_i))`` (all pairs, exact);
    ``loglik[i] = positive[i] - 0.5 sum_d logvar_i``. Differentiable in all inputs.
    """
    if resolve(impl, mu.device) == "fused":
        _check_club_inputs(mu, logvar, y)
        return _fused().club_loglik_fused(mu, logvar, y)
    return club_loglik_reference(mu, logvar, y)
