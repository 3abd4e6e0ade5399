"""EMA codebook update from assignment statistics: the input checks, the PyTorch reference and the dispatch to
the fused kernels (``kernels/ema.py``, :mod:`srcid.kernels.ema`)."""
from __future__ import annotations

import torch

from srcid.errors import SrcidError

from .dispatch import check_device, fused_kernels, resolve

OP = "ema_update_"


def _check_inputs(cluster_size, embed_sum, codebook, counts, sums):
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
            f"{OP}: codebook {tuple(codebook.shape)} [L, D] needs cluster_size [L], embed_sum [L, D], "
            f"counts [L] or [G, L] and sums [L, D] or [G, L, D]; got cluster_size {tuple(cluster_size.shape)}, "
            f"embed_sum {tuple(embed_sum.shape)}, counts {tuple(counts.shape)} and sums {tuple(sums.shape)}"
        )


def _check_fused_inputs(cluster_size, embed_sum, codebook, counts, sums, interpreting: bool):
    """What the kernels need beyond :func:`_check_inputs`: float32 everywhere (the state is updated in place), one
    device."""
    for name, t in (("cluster_size", cluster_size), ("embed_sum", embed_sum), ("codebook", codebook),
                    ("counts", counts), ("sums", sums)):
        if t.dtype != torch.float32:
            raise SrcidError(f"{OP}: {name} must be float32, got {t.dtype}")
    check_device(OP, interpreting, codebook=codebook, cluster_size=cluster_size, embed_sum=embed_sum, counts=counts,
                 sums=sums)


@torch.no_grad()
def ema_update_reference(cluster_size, embed_sum, codebook, counts, sums, *, decay: float, eps: float) -> None:
    """In-place EMA codebook update, one group after another (MMEMA order).

    For each group g: ``cluster_size = decay*cluster_size + (1-decay)*counts[g]``;
    ``embed_sum = decay*embed_sum + (1-decay)*sums[g]``; Laplace smoothing
    ``n * (cluster_size + eps) / (n + L*eps)`` with ``n = sum(cluster_size)``;
    ``codebook = embed_sum / smoothed``.
    """
    _check_inputs(cluster_size, embed_sum, codebook, counts, sums)
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
    """EMA update of a codebook from assignment statistics (in place, no host sync).

    ``counts`` is ``[L]`` or ``[G, L]``, ``sums`` ``[L, D]`` or ``[G, L, D]``; groups apply in order.
    """
    if resolve(impl, codebook.device) == "reference":
        return ema_update_reference(cluster_size, embed_sum, codebook, counts, sums, decay=decay, eps=eps)
    _check_inputs(cluster_size, embed_sum, codebook, counts, sums)
    kernels = fused_kernels()
    _check_fused_inputs(cluster_size, embed_sum, codebook, counts, sums, kernels.INTERPRETING)
    return kernels.ema_update_fused_(cluster_size, embed_sum, codebook, counts, sums, decay=decay, eps=eps)
