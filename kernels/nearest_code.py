"""Nearest code by squared L2 plus per-code statistics, fused.

One launch covers every row of a step (the rows of all modalities
concatenated, ``groups`` equal contiguous blocks, one shared codebook). The
grid runs over row tiles; each program walks the code tiles, computing
``||c||^2 - 2 x.c`` with ``tl.dot`` in IEEE float32 and keeping a running
minimum and argmin, so the ``N x L`` distance matrix never reaches memory.
Inside a tile the argmin takes the lowest index among equal minima and a
later tile replaces the running best only when strictly smaller, so ties go
to the lowest code index, as ``torch.min`` does in the reference. NaN scores
(a NaN in a row or in a code) count as smaller than any number, also as in
``torch.min``: such a row takes the first NaN code (code 0 for a NaN row) and
a NaN distance.

Statistics (``counts [G, L]``, ``sums [G, L, D]`` of ``values``) come in two
accumulation modes:

* ``atomic`` (default): the same kernel adds each row into its code's slot
  with float atomics. One launch; counts are exact (integers below 2**24),
  sums vary in their last bits from run to run with the order of additions.
* ``deterministic``: the kernel writes only the indices; the rows are then
  stably sorted by slot (``torch.sort``), slot boundaries found with
  ``torch.searchsorted``, and a segment-sum kernel adds each slot's rows in a
  fixed order. Bitwise reproducible, three extra small launches.

The deterministic mode is used when ``SRCID_DETERMINISTIC=1``, or when it is
unset and ``torch.are_deterministic_algorithms_enabled()``; ``=0`` forces
atomics. The default is atomics because the statistics feed an EMA with decay
0.99 where last-bit differences do not matter, and it keeps the whole
operation in one launch. Neither mode synchronises with the host, so a step
can be captured in a CUDA graph (after the first call at a size, which tunes).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from srcid.errors import SrcidError
from srcid.ops import NearestCode

from ._common import check_device, check_floating, tuning_configs

_NEAREST_CONFIGS = tuning_configs(
    [
        {"BLOCK_N": bn, "BLOCK_L": bl, "BLOCK_D": bd, "num_warps": w, "num_stages": s}
        for bn, bl, bd, w, s in [
            (32, 64, 32, 4, 2),
            (32, 128, 32, 4, 2),
            (64, 64, 32, 4, 2),
            (64, 64, 64, 4, 3),
            (64, 128, 32, 8, 2),
            (128, 64, 32, 8, 2),
            (128, 128, 32, 8, 3),
            (16, 64, 64, 4, 2),
        ]
    ],
    {"BLOCK_N": 32, "BLOCK_L": 32, "BLOCK_D": 32},
)

_SEGMENT_CONFIGS = tuning_configs(
    [
        {"BLOCK_R": br, "BLOCK_D": bd, "num_warps": w}
        for br, bd, w in [(16, 64, 2), (32, 64, 4), (32, 128, 4), (64, 128, 4), (64, 256, 8)]
    ],
    {"BLOCK_R": 16, "BLOCK_D": 32},
)


@triton.autotune(configs=_NEAREST_CONFIGS, key=["N", "L", "D", "STATS"], reset_to_zero=["counts_ptr", "sums_ptr"])
@triton.jit
def _nearest_code_kernel(
    x_ptr, cb_ptr, val_ptr,
    idx_ptr, dist_ptr, counts_ptr, sums_ptr,
    N, L, D, rows_per_group,
    stride_xn, stride_xd, stride_cl, stride_cd, stride_vn, stride_vd,
    STATS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    dim_offs = tl.arange(0, BLOCK_D)

    x_norm = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + dim_offs
        x_mask = row_ok[:, None] & (dims < D)[None, :]
        xt = tl.load(x_ptr + rows64[:, None] * stride_xn + dims[None, :] * stride_xd, mask=x_mask, other=0.0)
        xt = xt.to(tl.float32)
        x_norm += tl.sum(xt * xt, axis=1)

    best = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_N], dtype=tl.int32)
    for l0 in range(0, L, BLOCK_L):
        codes = l0 + tl.arange(0, BLOCK_L)
        code_ok = codes < L
        dots = tl.zeros([BLOCK_N, BLOCK_L], dtype=tl.float32)
        c_norm = tl.zeros([BLOCK_L], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + dim_offs
            dim_ok = dims < D
            xt = tl.load(
                x_ptr + rows64[:, None] * stride_xn + dims[None, :] * stride_xd,
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0,
            ).to(tl.float32)
            ct = tl.load(
                cb_ptr + codes[:, None] * stride_cl + dims[None, :] * stride_cd,
                mask=code_ok[:, None] & dim_ok[None, :], other=0.0,
            ).to(tl.float32)
            dots = tl.dot(xt, tl.trans(ct), dots, input_precision="ieee")
            c_norm += tl.sum(ct * ct, axis=1)
        scores = c_norm[None, :] - 2.0 * dots
        # a NaN score (NaN in the row or the code) ranks below every number, as in torch.min: it becomes -inf,
        # so the first NaN code wins, and a -inf best marks the row's distance NaN below
        scores = tl.where(scores == scores, scores, float("-inf"))
        scores = tl.where(code_ok[None, :], scores, float("inf"))
        tile_best, tile_idx = tl.min(scores, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_best < best  # strict: an equal score in a later tile keeps the lower index
        best = tl.where(better, tile_best, best)
        best_idx = tl.where(better, tile_idx + l0, best_idx)

    tl.store(idx_ptr + rows, best_idx.to(tl.int64), mask=row_ok)
    sq_dist = tl.where(best == float("-inf"), float("nan"), tl.maximum(best + x_norm, 0.0))
    tl.store(dist_ptr + rows, sq_dist, mask=row_ok)

    if STATS:
        slot = (rows // rows_per_group).to(tl.int64) * L + best_idx
        ones = tl.full([BLOCK_N], 1.0, dtype=tl.float32)
        tl.atomic_add(counts_ptr + slot, ones, mask=row_ok, sem="relaxed")
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + dim_offs
            v_mask = row_ok[:, None] & (dims < D)[None, :]
            vt = tl.load(val_ptr + rows64[:, None] * stride_vn + dims[None, :] * stride_vd, mask=v_mask, other=0.0)
            tl.atomic_add(sums_ptr + slot[:, None] * D + dims[None, :], vt.to(tl.float32), mask=v_mask, sem="relaxed")


@triton.autotune(configs=_SEGMENT_CONFIGS, key=["S", "D"])
@triton.jit
def _segment_sum_kernel(
    val_ptr, order_ptr, bounds_ptr, counts_ptr, sums_ptr,
    S, D, stride_vn, stride_vd,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Slot ``s`` sums the rows ``order[bounds[s]:bounds[s+1]]``, in that order."""
    slot = tl.program_id(0)
    pid_d = tl.program_id(1)
    start = tl.load(bounds_ptr + slot)
    end = tl.load(bounds_ptr + slot + 1)
    dims = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        pos = r0 + tl.arange(0, BLOCK_R)
        pos_ok = pos < end
        rows = tl.load(order_ptr + pos, mask=pos_ok, other=0)
        mask = pos_ok[:, None] & dim_ok[None, :]
        acc += tl.load(val_ptr + rows[:, None] * stride_vn + dims[None, :] * stride_vd, mask=mask, other=0.0).to(tl.float32)
    tl.store(sums_ptr + slot.to(tl.int64) * D + dims, tl.sum(acc, axis=0), mask=dim_ok)
    if pid_d == 0:
        tl.store(counts_ptr + slot, (end - start).to(tl.float32))


def deterministic_stats() -> bool:
    """Whether statistics use the deterministic (sort + segment-sum) mode."""
    flag = os.environ.get("SRCID_DETERMINISTIC", "").strip().lower()
    if flag in ("1", "true", "yes", "on"):
        return True
    if flag in ("0", "false", "no", "off"):
        return False
    if flag:
        raise SrcidError(f"SRCID_DETERMINISTIC={flag!r}: use 1 or 0")
    return torch.are_deterministic_algorithms_enabled()


def nearest_code_fused(x, codebook, *, values=None, stats=False, groups=1, deterministic: Optional[bool] = None) -> NearestCode:
    """Fused :func:`srcid.ops.nearest_code_reference` (same arguments and results).

    ``deterministic`` picks the statistics' accumulation mode; ``None`` follows
    :func:`deterministic_stats`.
    """
    op = "nearest_code"
    if x.dim() != 2 or codebook.dim() != 2 or x.shape[1] != codebook.shape[1]:
        raise SrcidError(f"{op}: x {tuple(x.shape)} and codebook {tuple(codebook.shape)} must be [N, D] and [L, D]")
    if values is not None and values.shape != x.shape:
        raise SrcidError(f"{op}: values {tuple(values.shape)} must have the shape of x {tuple(x.shape)}")
    if groups < 1 or x.shape[0] % groups:
        raise SrcidError(f"{op}: {x.shape[0]} rows cannot be split into {groups} equal groups")
    if codebook.shape[0] == 0:
        raise SrcidError(f"{op}: the codebook {tuple(codebook.shape)} has no codes")
    src = x if values is None else values
    device = check_device(op, x=x, codebook=codebook, values=src)
    check_floating(op, x=x, codebook=codebook, values=src)

    n, d = x.shape
    num_codes = codebook.shape[0]
    cb = codebook.to(torch.float32)
    indices = torch.empty(n, dtype=torch.int64, device=device)
    sq_dist = torch.empty(n, dtype=torch.float32, device=device)
    counts = sums = None
    if stats:
        counts = torch.zeros(groups * num_codes, dtype=torch.float32, device=device)
        sums = torch.zeros(groups * num_codes, d, dtype=torch.float32, device=device)
    if n == 0:
        return _shaped(indices, sq_dist, counts, sums, groups, num_codes)

    if deterministic is None:
        deterministic = deterministic_stats()
    atomic_stats = stats and not deterministic
    if atomic_stats:
        counts_arg, sums_arg = counts, sums
    else:  # unused by the kernel; real buffers so the tuner may zero them
        counts_arg = sums_arg = torch.empty(1, dtype=torch.float32, device=device)

    rows_per_group = n // groups
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)
    _nearest_code_kernel[grid](
        x, cb, src, indices, sq_dist, counts_arg, sums_arg,
        n, num_codes, d, rows_per_group,
        x.stride(0), x.stride(1), cb.stride(0), cb.stride(1), src.stride(0), src.stride(1),
        STATS=atomic_stats,
    )
    if stats and deterministic:
        _segment_stats(indices, src, counts, sums, groups, num_codes, rows_per_group)
    return _shaped(indices, sq_dist, counts, sums, groups, num_codes)


def _segment_stats(indices, src, counts, sums, groups, num_codes, rows_per_group):
    """Deterministic counts and sums: stable sort by slot, then one segment-sum launch."""
    n, d = src.shape
    num_slots = groups * num_codes
    slot = indices + torch.arange(n, device=indices.device) // rows_per_group * num_codes
    sorted_slot, order = torch.sort(slot, stable=True)
    bounds = torch.searchsorted(sorted_slot, torch.arange(num_slots + 1, device=indices.device))
    grid = lambda meta: (num_slots, triton.cdiv(d, meta["BLOCK_D"]))
    _segment_sum_kernel[grid](src, order, bounds, counts, sums, num_slots, d, src.stride(0), src.stride(1))


def _shaped(indices, sq_dist, counts, sums, groups, num_codes) -> NearestCode:
    if counts is not None:
        if groups == 1:
            counts, sums = counts.view(num_codes), sums.view(num_codes, -1)
        else:
            counts, sums = counts.view(groups, num_codes), sums.view(groups, num_codes, -1)
    return NearestCode(indices, sq_dist, counts, sums)
