"""Nearest code by squared L2, with per-code statistics: the result type, the input checks, the PyTorch
reference and the dispatch to the fused kernel (``kernels/nearest_code.py``, :mod:`srcid.kernels.nearest_code`)."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from srcid.errors import SrcidError

from .dispatch import check_device, check_floating, fused_kernels, resolve

OP = "nearest_code"


class NearestCode(NamedTuple):
    indices: torch.Tensor  # [N] int64, nearest code (ties: lowest index)
    sq_dist: torch.Tensor  # [N] squared L2 distance to that code
    counts: Optional[torch.Tensor]  # [L] (or [G, L]) rows assigned to each code
    sums: Optional[torch.Tensor]  # [L, D] (or [G, L, D]) sum of `values` rows per code


def _check_inputs(x, codebook, values, groups):
    if x.dim() != 2 or codebook.dim() != 2 or x.shape[1] != codebook.shape[1]:
        raise SrcidError(f"{OP}: x {tuple(x.shape)} and codebook {tuple(codebook.shape)} must be [N, D] and [L, D]")
    if values is not None and values.shape != x.shape:
        raise SrcidError(f"{OP}: values {tuple(values.shape)} must have the shape of x {tuple(x.shape)}")
    if groups < 1 or x.shape[0] % groups:
        raise SrcidError(f"{OP}: {x.shape[0]} rows cannot be split into {groups} equal groups")


def _check_fused_inputs(x, codebook, values, interpreting: bool):
    """What the kernel needs beyond :func:`_check_inputs`: at least one code, one device, floating point."""
    if codebook.shape[0] == 0:
        raise SrcidError(f"{OP}: the codebook {tuple(codebook.shape)} has no codes")
    src = x if values is None else values
    check_device(OP, interpreting, x=x, codebook=codebook, values=src)
    check_floating(OP, x=x, codebook=codebook, values=src)


@torch.no_grad()
def nearest_code_reference(x, codebook, *, values=None, stats=False, groups=1) -> NearestCode:
    """Nearest code by squared L2, in plain PyTorch (float32 accumulation).

    With ``groups > 1`` the rows form ``groups`` equal contiguous blocks (for
    example audio, video, text) and the statistics come per block:
    ``counts [G, L]`` and ``sums [G, L, D]``.
    """
    _check_inputs(x, codebook, values, groups)
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
    if resolve(impl, x.device) == "reference":
        return nearest_code_reference(x, codebook, values=values, stats=stats, groups=groups)
    _check_inputs(x, codebook, values, groups)
    kernels = fused_kernels()
    _check_fused_inputs(x, codebook, values, kernels.INTERPRETING)
    return NearestCode(*kernels.nearest_code_fused(x, codebook, values=values, stats=stats, groups=groups))
