"""Batched CLUB log-likelihood terms with exact all-pairs negatives, fused.

For ``q(y|x) = N(mu, exp(logvar))`` with shapes ``[..., N, D]`` (leading dims
flattened into a batch ``B``; one launch covers every estimator of one shape):

* ``positive[i] = -1/2 sum_d (y_id - mu_id)^2 v_id`` with ``v = exp(-logvar)``;
* ``negative[i] = -1/2 sum_d s_id v_id`` with ``s_id = mean_j (y_jd - mu_id)^2``,
  the exact mean over all pairs ``(i, j)`` of the same batch index, in
  ``O(N*D)`` through the column moments of ``y``:
  ``s = m2 - 2 mu m1 + mu^2 = (m2 - m1^2) + (m1 - mu)^2``;
* ``loglik[i] = positive[i] - 1/2 sum_d logvar_id``.

The moments are taken of ``z = y - y[b, 0]`` (shifted by the batch's first
row: the same values in exact arithmetic), so a large common offset in ``y``
and ``mu`` does not cancel away float32 digits.

Forward: ``_moments_kernel`` (grid: batch x row split x dim tile) writes
partial column sums of ``z`` and ``z^2``; ``_rows_kernel`` (grid: batch x row
tile) adds the partials up (fixed order) and computes the three terms.

Backward, by hand, with upstream gradients ``gp, gn, gl`` and ``gP = gp + gl``:

* ``dmu = gP (y - mu) v + gn (m1 - mu) v``;
* ``dlogvar = gP (y - mu)^2 v / 2 + gn s v / 2 - gl / 2``;
* ``dy_j = -gP_j (y_j - mu_j) v_j + (a - y_j c) / N`` with the column sums
  ``a = sum_i gn_i mu_i v_i`` and ``c = sum_i gn_i v_i`` (the path through
  ``m1`` and ``m2`` to every ``y_j``; computed shifted like the moments).

``_grad_moments_kernel`` writes partial ``a, c``; ``_grad_rows_kernel`` writes
the three gradients. Everything is float32 inside; inputs of any float dtype
and strides. No atomics, so results are deterministic; no host sync.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._common import tuning_configs

MAX_SPLITS = 16  # row splits of the column reductions; the row kernels add these partials
MIN_ROWS_PER_SPLIT = 256

# GPU configs that compile without register spills for sm_80 and sm_90 (python -m kernels.compile_check): the row
# kernels hold several [BLOCK_N, BLOCK_D] float32 tiles and their 64-bit addresses at once, so at most 16 elements
# per thread for the forward rows and 8 for the gradient rows
_MOMENT_CONFIGS = tuning_configs(
    [{"BLOCK_N": bn, "BLOCK_D": bd, "num_warps": w}
     for bn, bd, w in [(32, 64, 4), (64, 64, 4), (32, 128, 8), (64, 128, 8)]],
    {"BLOCK_N": 32, "BLOCK_D": 32},
)
_ROW_CONFIGS = tuning_configs(
    [{"BLOCK_N": bn, "BLOCK_D": bd, "num_warps": w}
     for bn, bd, w in [(16, 128, 4), (32, 64, 4), (32, 128, 8), (64, 64, 8), (16, 256, 8)]],
    {"BLOCK_N": 32, "BLOCK_D": 32},
)
_GRAD_ROW_CONFIGS = tuning_configs(
    [{"BLOCK_N": bn, "BLOCK_D": bd, "num_warps": w}
     for bn, bd, w in [(16, 64, 4), (32, 32, 4), (16, 128, 8), (32, 64, 8)]],
    {"BLOCK_N": 32, "BLOCK_D": 32},
)


def _splits(n: int):
    """Row splits for the column reductions: a function of N only."""
    splits = max(1, min(MAX_SPLITS, triton.cdiv(n, MIN_ROWS_PER_SPLIT)))
    return splits, triton.cdiv(n, splits)


@triton.jit
def _load_tile(ptr, b64, rows64, dims, stride_b, stride_n, stride_d, mask):
    """Rows ``rows64`` x dims ``dims`` of batch ``b64`` as float32 (0 outside ``mask``)."""
    offsets = b64 * stride_b + rows64[:, None] * stride_n + dims[None, :] * stride_d
    return tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _column_means(part_ptr, b, which, dims, dim_ok, N, S, D):
    """Sum the S partials of ``part[b, :, which, dims]`` (layout ``[B, S, 2, D]``) and divide by N."""
    total = tl.zeros(dims.shape, dtype=tl.float32)
    base = part_ptr + b.to(tl.int64) * S * 2 * D + which * D
    for s in range(0, S):
        total += tl.load(base + s * 2 * D + dims, mask=dim_ok, other=0.0)
    return total / N


@triton.autotune(configs=_MOMENT_CONFIGS, key=["N", "D"])
@triton.jit
def _moments_kernel(
    y_ptr, part_ptr,
    N, D, S, rows_per_split,
    stride_yb, stride_yn, stride_yd,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``part[b, s] = (sum z, sum z^2)``, ``z = y - y[b, 0]``, over the rows of split ``s``."""
    b = tl.program_id(0)
    s = tl.program_id(1)
    dims = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    b64 = b.to(tl.int64)
    row_end = tl.minimum((s + 1) * rows_per_split, N)
    shift = tl.load(y_ptr + b64 * stride_yb + dims * stride_yd, mask=dim_ok, other=0.0).to(tl.float32)  # row 0
    acc1 = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for r0 in range(s * rows_per_split, row_end, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        mask = (rows < row_end)[:, None] & dim_ok[None, :]
        yt = _load_tile(y_ptr, b64, rows.to(tl.int64), dims, stride_yb, stride_yn, stride_yd, mask)
        yt = tl.where(mask, yt - shift[None, :], 0.0)
        acc1 += yt
        acc2 += yt * yt
    out = part_ptr + (b64 * S + s) * 2 * D
    tl.store(out + dims, tl.sum(acc1, axis=0), mask=dim_ok)
    tl.store(out + D + dims, tl.sum(acc2, axis=0), mask=dim_ok)


@triton.autotune(configs=_ROW_CONFIGS, key=["N", "D"])
@triton.jit
def _rows_kernel(
    mu_ptr, lv_ptr, y_ptr, part_ptr, pos_ptr, neg_ptr, ll_ptr,
    N, D, S,
    stride_mb, stride_mn, stride_md, stride_lb, stride_ln, stride_ld, stride_yb, stride_yn, stride_yd,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """positive, negative and loglik of a tile of rows of one batch index."""
    pid = tl.program_id(0)
    row_tiles = tl.cdiv(N, BLOCK_N)
    b = pid // row_tiles
    rows = (pid % row_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    b64 = b.to(tl.int64)
    pos = tl.zeros([BLOCK_N], dtype=tl.float32)
    neg = tl.zeros([BLOCK_N], dtype=tl.float32)
    lv_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        dim_ok = dims < D
        mask = row_ok[:, None] & dim_ok[None, :]
        mu = _load_tile(mu_ptr, b64, rows64, dims, stride_mb, stride_mn, stride_md, mask)
        lv = _load_tile(lv_ptr, b64, rows64, dims, stride_lb, stride_ln, stride_ld, mask)
        y = _load_tile(y_ptr, b64, rows64, dims, stride_yb, stride_yn, stride_yd, mask)
        shift = tl.load(y_ptr + b64 * stride_yb + dims * stride_yd, mask=dim_ok, other=0.0).to(tl.float32)
        m1 = _column_means(part_ptr, b, 0, dims, dim_ok, N, S, D)
        m2 = _column_means(part_ptr, b, 1, dims, dim_ok, N, S, D)
        inv_var = tl.exp(-lv)
        diff = y - mu
        pos += tl.sum(diff * diff * inv_var, axis=1)
        gap = m1[None, :] - (mu - shift[None, :])  # mean(y) - mu
        spread = (m2 - m1 * m1)[None, :] + gap * gap  # mean_j (y_j - mu)^2
        neg += tl.sum(tl.where(mask, spread * inv_var, 0.0), axis=1)
        lv_sum += tl.sum(lv, axis=1)
    out = b64 * N + rows64
    tl.store(pos_ptr + out, (-0.5 * pos).to(pos_ptr.dtype.element_ty), mask=row_ok)
    tl.store(neg_ptr + out, (-0.5 * neg).to(neg_ptr.dtype.element_ty), mask=row_ok)
    tl.store(ll_ptr + out, (-0.5 * pos - 0.5 * lv_sum).to(ll_ptr.dtype.element_ty), mask=row_ok)


@triton.autotune(configs=_MOMENT_CONFIGS, key=["N", "D"])
@triton.jit
def _grad_moments_kernel(
    mu_ptr, lv_ptr, y_ptr, gn_ptr, part_ptr,
    N, D, S, rows_per_split,
    stride_mb, stride_mn, stride_md, stride_lb, stride_ln, stride_ld, stride_yb, stride_yd, stride_gb, stride_gn,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``part[b, s] = (sum gn (mu - y[b, 0]) v, sum gn v)`` over the rows of split ``s``."""
    b = tl.program_id(0)
    s = tl.program_id(1)
    b64 = b.to(tl.int64)
    dims = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    row_end = tl.minimum((s + 1) * rows_per_split, N)
    shift = tl.load(y_ptr + b64 * stride_yb + dims * stride_yd, mask=dim_ok, other=0.0).to(tl.float32)
    acc_a = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for r0 in range(s * rows_per_split, row_end, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        row_ok = rows < row_end
        rows64 = rows.to(tl.int64)
        mask = row_ok[:, None] & dim_ok[None, :]
        mu = _load_tile(mu_ptr, b64, rows64, dims, stride_mb, stride_mn, stride_md, mask)
        lv = _load_tile(lv_ptr, b64, rows64, dims, stride_lb, stride_ln, stride_ld, mask)
        gn = tl.load(gn_ptr + b64 * stride_gb + rows64 * stride_gn, mask=row_ok, other=0.0).to(tl.float32)
        weight = tl.where(mask, gn[:, None] * tl.exp(-lv), 0.0)
        acc_a += weight * (mu - shift[None, :])
        acc_b += weight
    out = part_ptr + (b64 * S + s) * 2 * D
    tl.store(out + dims, tl.sum(acc_a, axis=0), mask=dim_ok)
    tl.store(out + D + dims, tl.sum(acc_b, axis=0), mask=dim_ok)


@triton.autotune(configs=_GRAD_ROW_CONFIGS, key=["N", "D"])
@triton.jit
def _grad_rows_kernel(
    mu_ptr, lv_ptr, y_ptr, gp_ptr, gn_ptr, gl_ptr, part_ptr, gpart_ptr, dmu_ptr, dlv_ptr, dy_ptr,
    N, D, S,
    stride_mb, stride_mn, stride_md, stride_lb, stride_ln, stride_ld, stride_yb, stride_yn, stride_yd,
    stride_gpb, stride_gpn, stride_gnb, stride_gnn, stride_glb, stride_gln,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Gradients for mu, logvar and y of a tile of rows (outputs contiguous ``[B, N, D]``)."""
    pid = tl.program_id(0)
    row_tiles = tl.cdiv(N, BLOCK_N)
    b = pid // row_tiles
    rows = (pid % row_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    b64 = b.to(tl.int64)
    gp = tl.load(gp_ptr + b64 * stride_gpb + rows64 * stride_gpn, mask=row_ok, other=0.0).to(tl.float32)
    gn = tl.load(gn_ptr + b64 * stride_gnb + rows64 * stride_gnn, mask=row_ok, other=0.0).to(tl.float32)
    gl = tl.load(gl_ptr + b64 * stride_glb + rows64 * stride_gln, mask=row_ok, other=0.0).to(tl.float32)
    g_pos = (gp + gl)[:, None]
    g_neg = gn[:, None]
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        dim_ok = dims < D
        mask = row_ok[:, None] & dim_ok[None, :]
        mu = _load_tile(mu_ptr, b64, rows64, dims, stride_mb, stride_mn, stride_md, mask)
        lv = _load_tile(lv_ptr, b64, rows64, dims, stride_lb, stride_ln, stride_ld, mask)
        y = _load_tile(y_ptr, b64, rows64, dims, stride_yb, stride_yn, stride_yd, mask)
        shift = tl.load(y_ptr + b64 * stride_yb + dims * stride_yd, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
        m1 = _column_means(part_ptr, b, 0, dims, dim_ok, N, S, D)[None, :]
        m2 = _column_means(part_ptr, b, 1, dims, dim_ok, N, S, D)[None, :]
        a = _column_means(gpart_ptr, b, 0, dims, dim_ok, N, S, D)[None, :]  # sum_i gn (mu - shift) v / N
        c = _column_means(gpart_ptr, b, 1, dims, dim_ok, N, S, D)[None, :]  # sum_i gn v / N
        inv_var = tl.exp(-lv)
        diff = y - mu
        gap = m1 - (mu - shift)  # mean(y) - mu
        spread = m2 - m1 * m1 + gap * gap  # mean_j (y_j - mu)^2
        d_mu = g_pos * diff * inv_var + g_neg * gap * inv_var
        d_lv = 0.5 * g_pos * diff * diff * inv_var + 0.5 * g_neg * spread * inv_var - 0.5 * gl[:, None]
        d_y = -g_pos * diff * inv_var + a - (y - shift) * c
        out = b64 * N * D + rows64[:, None] * D + dims[None, :]
        tl.store(dmu_ptr + out, d_mu.to(dmu_ptr.dtype.element_ty), mask=mask)
        tl.store(dlv_ptr + out, d_lv.to(dlv_ptr.dtype.element_ty), mask=mask)
        tl.store(dy_ptr + out, d_y.to(dy_ptr.dtype.element_ty), mask=mask)


def _split_grid(batch, splits, d):
    return lambda meta: (batch, splits, triton.cdiv(d, meta["BLOCK_D"]))


def _row_grid(batch, n):
    return lambda meta: (batch * triton.cdiv(n, meta["BLOCK_N"]),)


def _strides3(t):
    return t.stride(0), t.stride(1), t.stride(2)


class ClubLoglikFunction(torch.autograd.Function):
    """Autograd wrapper: inputs ``[B, N, D]``, outputs ``(positive, negative, loglik)`` ``[B, N]``."""

    @staticmethod
    def forward(ctx, mu, logvar, y):
        batch, n, d = mu.shape
        out_dtype = torch.promote_types(torch.promote_types(mu.dtype, logvar.dtype), y.dtype)
        splits, rows_per_split = _splits(n)
        part = torch.empty(batch, splits, 2, d, dtype=torch.float32, device=mu.device)
        _moments_kernel[_split_grid(batch, splits, d)](y, part, n, d, splits, rows_per_split, *_strides3(y))
        positive, negative, loglik = (torch.empty(batch, n, dtype=out_dtype, device=mu.device) for _ in range(3))
        _rows_kernel[_row_grid(batch, n)](
            mu, logvar, y, part, positive, negative, loglik,
            n, d, splits, *_strides3(mu), *_strides3(logvar), *_strides3(y),
        )
        ctx.save_for_backward(mu, logvar, y, part)
        return positive, negative, loglik

    @staticmethod
    @once_differentiable
    def backward(ctx, g_pos, g_neg, g_ll):
        mu, logvar, y, part = ctx.saved_tensors
        batch, n, d = mu.shape
        splits, rows_per_split = _splits(n)
        gpart = torch.empty(batch, splits, 2, d, dtype=torch.float32, device=mu.device)
        _grad_moments_kernel[_split_grid(batch, splits, d)](
            mu, logvar, y, g_neg, gpart, n, d, splits, rows_per_split,
            *_strides3(mu), *_strides3(logvar), y.stride(0), y.stride(2), g_neg.stride(0), g_neg.stride(1),
        )
        d_mu = torch.empty(batch, n, d, dtype=mu.dtype, device=mu.device)
        d_lv = torch.empty(batch, n, d, dtype=logvar.dtype, device=mu.device)
        d_y = torch.empty(batch, n, d, dtype=y.dtype, device=mu.device)
        _grad_rows_kernel[_row_grid(batch, n)](
            mu, logvar, y, g_pos, g_neg, g_ll, part, gpart, d_mu, d_lv, d_y,
            n, d, splits, *_strides3(mu), *_strides3(logvar), *_strides3(y),
            g_pos.stride(0), g_pos.stride(1), g_neg.stride(0), g_neg.stride(1), g_ll.stride(0), g_ll.stride(1),
        )
        return d_mu, d_lv, d_y


def club_loglik_fused(mu, logvar, y) -> tuple:
    """Fused :func:`srcid.ops.club_loglik_reference`: shapes ``[..., N, D]``, differentiable in all three; the
    terms as a plain tuple ``(positive, negative, loglik)`` (:func:`srcid.ops.club_loglik` names them
    ``ClubLoglik``). Computes only: :func:`srcid.ops.club_loglik` checks the inputs first (one shape, one
    device, floating point)."""
    *lead, n, d = mu.shape
    if mu.numel() == 0:  # nothing to launch: every term is -1/2 times a sum of no elements (empty, or all zero)
        terms = -0.5 * (mu.sum(-1) + logvar.sum(-1) + y.sum(-1))  # the inputs' dtype and autograd graph
        return terms, terms.clone(), terms.clone()
    batch = mu.numel() // (n * d)
    flat = (t.reshape(batch, n, d) for t in (mu, logvar, y))
    positive, negative, loglik = ClubLoglikFunction.apply(*flat)
    shape = tuple(lead) + (n,)
    return positive.view(shape), negative.view(shape), loglik.view(shape)
