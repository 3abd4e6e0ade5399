"""Nearest code by squared L2 plus per-code statistics, fused.

One launch covers every row of a step (the rows of all modalities
concatenated, ``groups`` equal contiguous blocks, one shared codebook). The
grid runs over row tiles; each program walks the code tiles and keeps a
running minimum and argmin of the score ``||c||^2 - 2 x.c``, so the ``N x L``
distance matrix never reaches memory. Ties go to the lowest code index and
NaN scores (a NaN in a row or in a code) count as smaller than any number, as
``torch.min`` does in the reference: such a row takes the first NaN code
(code 0 for a NaN row) and a NaN distance.

Two precisions compute the scores (``precision=``, else
``SRCID_NEAREST_PRECISION``, else ``tf32x3``):

* ``ieee`` (``_nearest_code_kernel``): ``tl.dot(..., input_precision="ieee")``
  in float32, which lowers to FMAs on the CUDA cores (no tensor cores).
* ``tf32x3`` (``_nearest_code_tc_kernel``, the default): tensor cores find the
  candidates and float32 decides among them, so the answer is still exact.
  Each float32 input ``v`` is split into ``v_hi = tf32(v)`` (mantissa
  truncated to tf32's 10 explicit bits) and ``v_lo = tf32(v - v_hi)``; three
  tf32 products ``x_hi.c_hi`` and ``x_hi.c_lo + x_lo.c_hi`` (two float32
  accumulators) approximate ``x.c``. Every product of tf32 numbers is exact
  in float32, so Triton's interpreter on a CPU computes the same numbers as
  the tensor cores up to the order of the float32 additions. Per row the
  kernel keeps the two lowest approximate scores (with their codes) and the
  third lowest. With ``Bnd`` a proven bound on ``|approximate - exact score|``
  (:func:`tf32x3_score_bound`, derived there), every code whose approximate
  score exceeds the lowest by more than ``2 Bnd`` cannot be the float32
  argmin, not even tied. When the third lowest is that far, the two kept
  codes are rescored in float32 (gathered rows, exact tie rule: lower score,
  then lower index). Otherwise (more than two candidates: near-ties of three
  or more codes, rows of very large norm, duplicated codes, NaN or huge
  inputs, tiny inputs near underflow) the whole row tile takes the ``ieee``
  sweep over all codes. Either way the index is the first minimum of float32
  scores and ``sq_dist`` comes from a float32 score.

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

import math
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from srcid.errors import SrcidError

from ._common import tuning_configs

PRECISIONS = ("ieee", "tf32x3")
DEFAULT_PRECISION = "tf32x3"

# ieee (opt-in since tf32x3 is the default): the FMA dot holds whole operand tiles in registers and most tiles sit
# at the 255-register limit. Four of the eight earlier configs are left out to keep the compile check short,
# among them the two 3-stage ones that spilled most (up to 1,844 bytes).
_NEAREST_CONFIGS = tuning_configs(
    [
        {"BLOCK_N": bn, "BLOCK_L": bl, "BLOCK_D": bd, "num_warps": w, "num_stages": s}
        for bn, bl, bd, w, s in [
            (32, 64, 32, 4, 2),
            (64, 128, 32, 8, 2),
            (128, 64, 32, 8, 2),
            (16, 64, 64, 4, 2),
        ]
    ],
    {"BLOCK_N": 32, "BLOCK_L": 32, "BLOCK_D": 32},
)

# tf32x3: 64-row tiles or more for the tensor cores (a warpgroup's wgmma covers 64 rows on sm_90), 16-wide dim
# chunks: each chunk holds four split operand tiles and two accumulators, and 32-wide chunks spill. FB_L and FB_D
# are the tiles of the IEEE fallback sweep, small so that its FMA dot fits beside them. None of these spills on
# sm_80 or sm_90 (python -m kernels.compile_check).
_TC_CONFIGS = tuning_configs(
    [
        {"BLOCK_N": bn, "BLOCK_L": bl, "BLOCK_D": bd, "FB_L": 32, "FB_D": 16, "num_warps": w, "num_stages": s}
        for bn, bl, bd, w, s in [
            (64, 64, 16, 8, 2),
            (128, 64, 16, 8, 2),
            (64, 32, 16, 4, 2),
        ]
    ],
    {"BLOCK_N": 32, "BLOCK_L": 32, "BLOCK_D": 32, "FB_L": 32, "FB_D": 32},
)

_SEGMENT_CONFIGS = tuning_configs(
    [
        {"BLOCK_R": br, "BLOCK_D": bd, "num_warps": w}
        for br, bd, w in [(16, 64, 2), (32, 64, 4), (32, 128, 4), (64, 128, 4), (64, 256, 8)]
    ],
    {"BLOCK_R": 16, "BLOCK_D": 32},
)


# -- the error bound of the tf32x3 scores -----------------------------------------------------------------------------

_U = 2.0 ** -24  # float32 unit roundoff, round to nearest (CUDA cores, the interpreter)
_U_TC = 2.0 ** -23  # tensor-core float32 accumulation, which may truncate instead of rounding
_SPLIT = 3 * 2.0 ** -20  # per |x_k c_k|: the dropped x_lo c_lo and the truncation of both low parts
_SAFETY = 2.0
_MAX_DIM = 2 ** 20  # beyond this the bound is not claimed: every row takes the IEEE sweep
REL_MARGIN = tl.constexpr(2.0 ** -21)  # in the kernel: the bound's own float32 arithmetic, relative to the scores compared


class ScoreBound(NamedTuple):
    """``|approx - exact| <= xc ||x|| cmax + cc cmax^2 + absolute (1 + ||x|| + cmax)`` for every code of a row
    (``cmax`` the largest code norm), where ``approx`` is the tf32x3 score and ``exact`` any float32 evaluation of
    ``||c||^2 - 2 x.c`` (summed in any order, with or without FMA)."""

    xc: float
    cc: float
    absolute: float


def _gamma(n: int, u: float) -> float:
    return n * u / (1.0 - n * u)


def tf32x3_score_bound(dim: int) -> ScoreBound:
    """The bound the ``tf32x3`` kernel uses to rule codes out, for dimension ``dim``. Derivation, per row ``x``
    and code ``c`` (``P = sum_k |x_k c_k| <= ||x|| ||c||`` by Cauchy-Schwarz, ``u = 2^-24``):

    * Split: ``x_hi = tf32(x)`` (truncated: ``|x - x_hi| < 2^-10 |x|``), ``x_lo = x - x_hi`` (exact in float32),
      ``x_lo' = tf32(x_lo)``, ``|x_lo - x_lo'| < 2^-10 |x_lo| < 2^-20 |x|``; the same for ``c``. Then
      ``x c = x_hi c_hi + x_hi c_lo + x_lo c_hi + x_lo c_lo`` exactly, and the three products kept differ from it
      by ``|x_hi (c_lo - c_lo') + (x_lo - x_lo') c_hi + x_lo c_lo| < 3 * 2^-20 |x c|``: ``3 * 2^-20 P`` in all.
    * Every product of two tf32 numbers (11-bit significands) is exact in float32. The float32 accumulation of
      ``sum x_hi c_hi`` (``D`` terms of size at most ``|x_k c_k|``) errs by at most ``gamma_D P`` and that of
      ``sum x_hi c_lo' + x_lo' c_hi`` (``2D`` terms below ``2^-10 |x_k c_k|``) by ``gamma_2D 2^-9 P``, with
      ``gamma_n = n u' / (1 - n u')`` and ``u' = 2^-23``: tensor cores may truncate where IEEE rounds. Adding
      the two accumulators: ``u (1 + 2^-8) P``.
    * The float32 ``x.c`` the exact score uses (any summation order): ``gamma_D P`` with ``u``.
    * Scores are ``||c||^2 - 2 x.c``: twice the dot errors, plus ``2 gamma_D ||c||^2`` for the two float32
      evaluations of ``||c||^2`` (in the code tile and in the rescoring, which may sum in different orders), plus
      the rounding of both subtractions, ``u (||c||^2 + 2 |x.c|)`` each.
    * Safety factor 2: covers the float32 ``||x||`` and ``cmax`` (sums of squares, relative error below
      ``gamma_D`` <= 1/15 here, so below the true norms by less than 7% each) and the rounding of the bound's
      own products. The kernel also widens each comparison by ``2^-21 |score|`` for the rounding of
      ``score +- bound``.
    * ``absolute``: underflow. A subnormal input is not truncated relatively, tensor cores may flush subnormal
      inputs and results, and every float32 product or partial sum below ``2^-126`` may lose up to ``2^-126``:
      at most ``16 (D + 1)`` such steps per score, each below ``2^-126 (1 + ||x|| + cmax)``; doubled for the
      score and for safety. And the float32 sums of squares lose the squares that underflow, so the true norms
      exceed the kernel's by up to ``f = sqrt(D) 2^-63``: with ``(||x|| + f)`` and ``(cmax + f)`` in the two
      terms above, the extra is below ``(2 xc + 3 cc) f (1 + ||x|| + cmax)`` for ``f < 1``.

    For ``D = 256``: ``xc ~ 2.0e-4``, ``cc ~ 6.1e-5``. The truncation alone (``3 * 2^-20 ~ 2.9e-6``) is small
    against the worst-case accumulation terms, which grow with ``D``. Above ``D = 2^20`` all three are ``inf``
    and every row takes the IEEE sweep.
    """
    d = max(int(dim), 1)
    if d > _MAX_DIM:
        return ScoreBound(math.inf, math.inf, math.inf)
    g_tc, g_tc2, g = _gamma(d, _U_TC), _gamma(2 * d, _U_TC), _gamma(d, _U)
    dot_size = (1.0 + 2.0 ** -8) * (1.0 + g_tc2) ** 2  # |x_hi.c_hi| + |small| and |x.c| computed, per P
    dot_err = _SPLIT + g_tc + g_tc2 * 2.0 ** -9 + _U * dot_size + g
    xc = _SAFETY * (2.0 * dot_err + 4.0 * _U * dot_size)
    cc = _SAFETY * (2.0 * g + 2.0 * _U * (1.0 + g))
    absolute = _SAFETY * 2.0 * 16 * (d + 1) * 2.0 ** -126 + (2.0 * xc + 3.0 * cc) * math.sqrt(d) * 2.0 ** -63
    up = 1.0 + 2.0 ** -20  # the float32 the kernel receives is not below these
    return ScoreBound(xc * up, cc * up, absolute * up)


# -- kernels ------------------------------------------------------------------------------------------------------------


@triton.jit
def _row_sq_norms(x_ptr, rows64, row_ok, D, stride_xn, stride_xd, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    dim_offs = tl.arange(0, BLOCK_D)
    x_norm = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + dim_offs
        x_mask = row_ok[:, None] & (dims < D)[None, :]
        xt = tl.load(x_ptr + rows64[:, None] * stride_xn + dims[None, :] * stride_xd, mask=x_mask, other=0.0)
        xt = xt.to(tl.float32)
        x_norm += tl.sum(xt * xt, axis=1)
    return x_norm


@triton.jit
def _ieee_sweep(x_ptr, cb_ptr, rows64, row_ok, L, D, stride_xn, stride_xd, stride_cl, stride_cd,
                BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """Running minimum and first argmin of ``||c||^2 - 2 x.c`` over all codes, IEEE float32 dots.
    A NaN score ranks below every number (it becomes -inf: the first NaN code wins)."""
    dim_offs = tl.arange(0, BLOCK_D)
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
        scores = tl.where(scores == scores, scores, float("-inf"))
        scores = tl.where(code_ok[None, :], scores, float("inf"))
        tile_best, tile_idx = tl.min(scores, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_best < best  # strict: an equal score in a later tile keeps the lower index
        best = tl.where(better, tile_best, best)
        best_idx = tl.where(better, tile_idx + l0, best_idx)
    return best, best_idx


@triton.jit
def _store_results(idx_ptr, dist_ptr, counts_ptr, sums_ptr, val_ptr, rows, rows64, row_ok, best, best_idx, x_norm,
                   L, D, rows_per_group, stride_vn, stride_vd,
                   STATS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    tl.store(idx_ptr + rows, best_idx.to(tl.int64), mask=row_ok)
    sq_dist = tl.where(best == float("-inf"), float("nan"), tl.maximum(best + x_norm, 0.0))
    tl.store(dist_ptr + rows, sq_dist, mask=row_ok)
    if STATS:
        dim_offs = tl.arange(0, BLOCK_D)
        slot = (rows // rows_per_group).to(tl.int64) * L + best_idx
        ones = tl.full([BLOCK_N], 1.0, dtype=tl.float32)
        tl.atomic_add(counts_ptr + slot, ones, mask=row_ok, sem="relaxed")
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + dim_offs
            v_mask = row_ok[:, None] & (dims < D)[None, :]
            vt = tl.load(val_ptr + rows64[:, None] * stride_vn + dims[None, :] * stride_vd, mask=v_mask, other=0.0)
            tl.atomic_add(sums_ptr + slot[:, None] * D + dims[None, :], vt.to(tl.float32), mask=v_mask, sem="relaxed")


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
    """``precision="ieee"``: IEEE float32 scores for every code."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    x_norm = _row_sq_norms(x_ptr, rows64, row_ok, D, stride_xn, stride_xd, BLOCK_N, BLOCK_D)
    best, best_idx = _ieee_sweep(x_ptr, cb_ptr, rows64, row_ok, L, D, stride_xn, stride_xd, stride_cl, stride_cd,
                                 BLOCK_N, BLOCK_L, BLOCK_D)
    _store_results(idx_ptr, dist_ptr, counts_ptr, sums_ptr, val_ptr, rows, rows64, row_ok, best, best_idx, x_norm,
                   L, D, rows_per_group, stride_vn, stride_vd, STATS, BLOCK_N, BLOCK_D)


@triton.jit
def _exact_scores(x_ptr, cb_ptr, rows64, code, live, D, stride_xn, stride_xd, stride_cl, stride_cd,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Float32 ``||c||^2 - 2 x.c`` of each row with its own code ``code`` (a gathered code row per row)."""
    dim_offs = tl.arange(0, BLOCK_D)
    dots = tl.zeros([BLOCK_N], dtype=tl.float32)
    c_norm = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + dim_offs
        mask = live[:, None] & (dims < D)[None, :]
        xt = tl.load(x_ptr + rows64[:, None] * stride_xn + dims[None, :] * stride_xd, mask=mask, other=0.0)
        ct = tl.load(cb_ptr + code[:, None] * stride_cl + dims[None, :] * stride_cd, mask=mask, other=0.0)
        xt = xt.to(tl.float32)
        ct = ct.to(tl.float32)
        dots += tl.sum(xt * ct, axis=1)
        c_norm += tl.sum(ct * ct, axis=1)
    return c_norm - 2.0 * dots


@triton.autotune(configs=_TC_CONFIGS, key=["N", "L", "D", "STATS"], reset_to_zero=["counts_ptr", "sums_ptr"])
@triton.jit
def _nearest_code_tc_kernel(
    x_ptr, cb_ptr, val_ptr,
    idx_ptr, dist_ptr, counts_ptr, sums_ptr, path_ptr,
    N, L, D, rows_per_group,
    stride_xn, stride_xd, stride_cl, stride_cd, stride_vn, stride_vd,
    bound_xc, bound_cc, bound_abs,
    STATS: tl.constexpr, ROW_PATHS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    FB_L: tl.constexpr, FB_D: tl.constexpr,
):
    """``precision="tf32x3"``: tensor-core candidates, float32 rescoring, IEEE sweep where that cannot decide."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    dim_offs = tl.arange(0, BLOCK_D)
    x_norm = _row_sq_norms(x_ptr, rows64, row_ok, D, stride_xn, stride_xd, BLOCK_N, BLOCK_D)

    # per row: the two lowest approximate scores (v1 <= v2, ties in index order) with their codes, and the third
    inf = float("inf")
    v1 = tl.full([BLOCK_N], inf, dtype=tl.float32)
    v2 = tl.full([BLOCK_N], inf, dtype=tl.float32)
    v3 = tl.full([BLOCK_N], inf, dtype=tl.float32)
    i1 = tl.zeros([BLOCK_N], dtype=tl.int32)
    i2 = tl.zeros([BLOCK_N], dtype=tl.int32)
    c_max2 = tl.zeros([BLOCK_L], dtype=tl.float32)  # running max of ||c||^2 per tile position; NaN counts as inf
    tile_pos = tl.arange(0, BLOCK_L)[None, :]
    for l0 in range(0, L, BLOCK_L):
        codes = l0 + tl.arange(0, BLOCK_L)
        code_ok = codes < L
        big = tl.zeros([BLOCK_N, BLOCK_L], dtype=tl.float32)
        small = tl.zeros([BLOCK_N, BLOCK_L], dtype=tl.float32)
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
            # tf32(v): the mantissa truncated to tf32's 10 explicit bits (-8192 == 0xFFFFE000); written out, not
            # a helper, because each helper call costs the interpreter a few milliseconds
            x_hi = (xt.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
            c_hi = (ct.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
            x_lo = ((xt - x_hi).to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
            c_lo = ((ct - c_hi).to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
            big = tl.dot(x_hi, tl.trans(c_hi), big, input_precision="tf32")
            small = tl.dot(x_hi, tl.trans(c_lo), small, input_precision="tf32")
            small = tl.dot(x_lo, tl.trans(c_hi), small, input_precision="tf32")
            c_norm += tl.sum(ct * ct, axis=1)
        c_max2 = tl.maximum(c_max2, tl.where(code_ok & (c_norm == c_norm), c_norm, tl.where(code_ok, inf, 0.0)))
        approx = c_norm[None, :] - 2.0 * (big + small)
        approx = tl.where(approx == approx, approx, float("-inf"))  # NaN: such rows fall back below
        approx = tl.where(code_ok[None, :], approx, inf)
        m1, j1 = tl.min(approx, axis=1, return_indices=True, return_indices_tie_break_left=True)
        approx = tl.where(tile_pos == j1[:, None], inf, approx)
        m2, j2 = tl.min(approx, axis=1, return_indices=True, return_indices_tie_break_left=True)
        approx = tl.where(tile_pos == j2[:, None], inf, approx)
        m3 = tl.min(approx, axis=1)
        j1 += l0
        j2 += l0
        # merge the sorted (v1, v2, v3) with the tile's (m1, m2, m3); on equal scores the running ones (lower
        # codes) come first
        r_first = v1 <= m1
        n1 = tl.where(r_first, v1, m1)
        n1_idx = tl.where(r_first, i1, j1)
        r_head = tl.where(r_first, v2, v1)
        r_head_idx = tl.where(r_first, i2, i1)
        t_head = tl.where(r_first, m1, m2)
        t_head_idx = tl.where(r_first, j1, j2)
        r_next = tl.where(r_first, v3, v2)
        t_next = tl.where(r_first, m2, m3)
        r_second = r_head <= t_head
        n2 = tl.where(r_second, r_head, t_head)
        n2_idx = tl.where(r_second, r_head_idx, t_head_idx)
        v3 = tl.where(r_second, tl.minimum(r_next, t_head), tl.minimum(r_head, t_next))
        v1, i1, v2, i2 = n1, n1_idx, n2, n2_idx

    # The exact minimum is at most top; a code whose approximate score minus the bound exceeds top is ruled out.
    # Rows out of range (NaN or inf anywhere, norms that could overflow a score) fall back; their numbers are
    # replaced by 0 first so that no inf - inf arises.
    x_len = tl.sqrt(x_norm)
    c_max = tl.sqrt(tl.max(c_max2, axis=0))
    in_range = (x_len + c_max < 1.0e18) & (v1 > float("-inf"))  # false for NaN too
    x_len = tl.where(in_range, x_len, 0.0)
    c_max = tl.where(c_max < 1.0e18, c_max, 0.0)
    bound = bound_xc * x_len * c_max + bound_cc * (c_max * c_max) + bound_abs * (1.0 + x_len + c_max)
    w1 = tl.where(in_range, v1, 0.0)
    w2 = tl.where(v2 < inf, v2, 0.0)
    w3 = tl.where(v3 < inf, v3, 0.0)
    top = w1 + REL_MARGIN * tl.abs(w1) + bound
    low2 = w2 - REL_MARGIN * tl.abs(w2) - bound
    low3 = w3 - REL_MARGIN * tl.abs(w3) - bound
    decided = in_range & ((v3 == inf) | (low3 > top))
    second = decided & (v2 < inf) & (low2 <= top)

    # float32 rescoring of the (at most) two candidates: lower score, then lower index
    live = row_ok & decided
    s1 = _exact_scores(x_ptr, cb_ptr, rows64, i1, live, D, stride_xn, stride_xd, stride_cl, stride_cd,
                       BLOCK_N, BLOCK_D)
    s2 = _exact_scores(x_ptr, cb_ptr, rows64, i2, live & second, D, stride_xn, stride_xd, stride_cl, stride_cd,
                       BLOCK_N, BLOCK_D)
    take2 = second & ((s2 < s1) | ((s2 == s1) & (i2 < i1)))
    best = tl.where(take2, s2, s1)
    best_idx = tl.where(take2, i2, i1)

    fallback = row_ok & (decided == 0)
    if tl.max(fallback.to(tl.int32), axis=0) > 0:
        fb_best, fb_idx = _ieee_sweep(x_ptr, cb_ptr, rows64, row_ok, L, D, stride_xn, stride_xd, stride_cl, stride_cd,
                                      BLOCK_N, FB_L, FB_D)
        best = tl.where(fallback, fb_best, best)
        best_idx = tl.where(fallback, fb_idx, best_idx)
    if ROW_PATHS:  # 0: one candidate, 1: two rescored, 2: the IEEE sweep
        tl.store(path_ptr + rows, tl.where(fallback, 2, tl.where(second, 1, 0)), mask=row_ok)
    _store_results(idx_ptr, dist_ptr, counts_ptr, sums_ptr, val_ptr, rows, rows64, row_ok, best, best_idx, x_norm,
                   L, D, rows_per_group, stride_vn, stride_vd, STATS, BLOCK_N, BLOCK_D)


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


def nearest_precision() -> str:
    """The score precision in force when ``precision`` is not given: ``SRCID_NEAREST_PRECISION`` (``ieee`` or
    ``tf32x3``), else ``tf32x3``."""
    flag = os.environ.get("SRCID_NEAREST_PRECISION", "").strip().lower()
    if not flag:
        return DEFAULT_PRECISION
    if flag not in PRECISIONS:
        raise SrcidError(f"SRCID_NEAREST_PRECISION={flag!r}: use one of {', '.join(PRECISIONS)}")
    return flag


def nearest_code_fused(x, codebook, *, values=None, stats=False, groups=1, deterministic: Optional[bool] = None,
                       precision: Optional[str] = None) -> tuple:
    """Fused :func:`srcid.ops.nearest_code_reference`: the same arguments, the same results as a plain tuple
    ``(indices, sq_dist, counts, sums)`` (:func:`srcid.ops.nearest_code` names them ``NearestCode``).

    Computes only: :func:`srcid.ops.nearest_code` checks the inputs first (shapes, groups, at least one code, one
    device, floating point). ``deterministic`` picks the statistics' accumulation mode; ``None`` follows
    :func:`deterministic_stats`. ``precision`` (``"ieee"`` or ``"tf32x3"``) picks how the scores are computed;
    ``None`` follows :func:`nearest_precision`. Both return the first minimum of float32 scores.
    """
    return _nearest_code(x, codebook, values=values, stats=stats, groups=groups, deterministic=deterministic,
                         precision=precision)


def _nearest_code(x, codebook, *, values=None, stats=False, groups=1, deterministic=None, precision=None,
                  row_paths: Optional[torch.Tensor] = None) -> tuple:
    """:func:`nearest_code_fused`. ``row_paths`` (int32 ``[N]``, tf32x3 only; a diagnostic for tests and
    benchmarks) receives how each row was decided: 0 one candidate (its float32 score gives ``sq_dist``),
    1 two candidates rescored in float32, 2 the IEEE sweep over all codes (with the whole row tile)."""
    op = "nearest_code"
    if precision is None:
        precision = nearest_precision()
    elif precision not in PRECISIONS:
        raise SrcidError(f"{op}: precision={precision!r}: use one of {', '.join(PRECISIONS)}")
    src = x if values is None else values
    device = x.device

    n, d = x.shape
    num_codes = codebook.shape[0]
    cb = codebook.to(torch.float32)
    indices = torch.empty(n, dtype=torch.int64, device=device)
    sq_dist = torch.empty(n, dtype=torch.float32, device=device)
    counts = sums = None
    if stats:
        counts = torch.zeros(groups * num_codes, dtype=torch.float32, device=device)
        sums = torch.zeros(groups * num_codes, d, dtype=torch.float32, device=device)
    if row_paths is not None and (precision != "tf32x3" or row_paths.shape != (n,) or row_paths.dtype != torch.int32
                                  or row_paths.device != device):
        raise SrcidError(f"{op}: row_paths must be int32 [{n}] on {device}, with precision tf32x3")
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
    strides = (x.stride(0), x.stride(1), cb.stride(0), cb.stride(1), src.stride(0), src.stride(1))
    if precision == "ieee":
        _nearest_code_kernel[grid](
            x, cb, src, indices, sq_dist, counts_arg, sums_arg,
            n, num_codes, d, rows_per_group, *strides,
            STATS=atomic_stats,
        )
    else:
        bound = tf32x3_score_bound(d)
        paths = row_paths if row_paths is not None else torch.empty(1, dtype=torch.int32, device=device)
        _nearest_code_tc_kernel[grid](
            x, cb, src, indices, sq_dist, counts_arg, sums_arg, paths,
            n, num_codes, d, rows_per_group, *strides,
            bound.xc, bound.cc, bound.absolute,
            STATS=atomic_stats, ROW_PATHS=row_paths is not None,
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


def _shaped(indices, sq_dist, counts, sums, groups, num_codes) -> tuple:
    if counts is not None:
        if groups == 1:
            counts, sums = counts.view(num_codes), sums.view(num_codes, -1)
        else:
            counts, sums = counts.view(groups, num_codes), sums.view(groups, num_codes, -1)
    return indices, sq_dist, counts, sums
