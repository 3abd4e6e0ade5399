"""EMA codebook update from assignment statistics, fused over all groups.

Per group ``g`` in order (as :func:`srcid.ops.ema_update_reference`):
``cluster_size = decay*cluster_size + (1-decay)*counts[g]``,
``embed_sum = decay*embed_sum + (1-decay)*sums[g]``, and the codebook becomes
``embed_sum / smoothed`` with ``smoothed = (cluster_size + eps) / (n + L*eps) * n``,
``n = sum(cluster_size)``. Each group's codebook overwrites the previous one,
so only the last group's ``n`` reaches the result.

``n`` is a reduction over all codes, so the update takes two launches and no
host synchronisation:

1. ``_cluster_size_kernel`` (one program): runs the recurrence over the groups
   for every code, writes ``cluster_size`` and the final ``n`` into a
   one-element buffer on the device.
2. ``_embed_kernel`` (a grid over code x dim tiles): runs the recurrence over
   the groups for its tile of ``embed_sum`` and writes the codebook tile.

Both are elementwise in a fixed order, hence deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import tuning_configs

_SIZE_CONFIGS = tuning_configs(
    [{"BLOCK_L": 512, "num_warps": 4}, {"BLOCK_L": 1024, "num_warps": 4}, {"BLOCK_L": 2048, "num_warps": 8}],
    {"BLOCK_L": 32},
)
_EMBED_CONFIGS = tuning_configs(
    [
        {"BLOCK_L": bl, "BLOCK_D": bd, "num_warps": w}
        for bl, bd, w in [(16, 64, 2), (16, 128, 4), (32, 64, 4), (32, 128, 4), (64, 128, 8), (32, 256, 8)]
    ],
    {"BLOCK_L": 16, "BLOCK_D": 32},
)


@triton.autotune(configs=_SIZE_CONFIGS, key=["L", "G"], restore_value=["size_ptr"])
@triton.jit
def _cluster_size_kernel(
    size_ptr, counts_ptr, n_ptr,
    L, G, stride_size, stride_cg, stride_cl,
    decay, one_minus_decay,
    BLOCK_L: tl.constexpr,
):
    """Update ``cluster_size`` over all groups and store the final ``n``."""
    offs = tl.arange(0, BLOCK_L)
    total = tl.zeros([BLOCK_L], dtype=tl.float32)
    for l0 in range(0, L, BLOCK_L):
        codes = l0 + offs
        ok = codes < L
        size = tl.load(size_ptr + codes * stride_size, mask=ok, other=0.0)
        for g in range(0, G):
            counts = tl.load(counts_ptr + g * stride_cg + codes * stride_cl, mask=ok, other=0.0)
            size = size * decay + counts * one_minus_decay
        tl.store(size_ptr + codes * stride_size, size, mask=ok)
        total += tl.where(ok, size, 0.0)
    tl.store(n_ptr, tl.sum(total, axis=0))


@triton.autotune(configs=_EMBED_CONFIGS, key=["L", "D", "G"], restore_value=["embed_ptr"])
@triton.jit
def _embed_kernel(
    embed_ptr, code_ptr, size_ptr, sums_ptr, n_ptr,
    L, D, G,
    stride_size, stride_el, stride_ed, stride_cbl, stride_cbd, stride_sg, stride_sl, stride_sd,
    decay, one_minus_decay, eps, codes_eps,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Update a tile of ``embed_sum`` over all groups; write ``codebook = embed_sum / smoothed``."""
    codes = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    code_ok = codes < L
    mask = code_ok[:, None] & (dims < D)[None, :]
    embed = tl.load(embed_ptr + codes[:, None] * stride_el + dims[None, :] * stride_ed, mask=mask, other=0.0)
    for g in range(0, G):
        sums = tl.load(
            sums_ptr + g * stride_sg + codes[:, None] * stride_sl + dims[None, :] * stride_sd, mask=mask, other=0.0
        )
        embed = embed * decay + sums * one_minus_decay
    tl.store(embed_ptr + codes[:, None] * stride_el + dims[None, :] * stride_ed, embed, mask=mask)
    n = tl.load(n_ptr)
    size = tl.load(size_ptr + codes * stride_size, mask=code_ok, other=1.0)
    smoothed = (size + eps) / (n + codes_eps) * n
    tl.store(code_ptr + codes[:, None] * stride_cbl + dims[None, :] * stride_cbd, embed / smoothed[:, None], mask=mask)


def ema_update_fused_(cluster_size, embed_sum, codebook, counts, sums, *, decay: float, eps: float) -> None:
    """Fused :func:`srcid.ops.ema_update_reference`: in place, two launches, no host sync.

    ``counts`` is ``[L]`` or ``[G, L]``, ``sums`` ``[L, D]`` or ``[G, L, D]``
    (float32); groups apply in order. Computes only: :func:`srcid.ops.ema_update_`
    checks the inputs first (shapes, float32, one device).
    """
    num_codes, dim = codebook.shape
    if counts.dim() == 1:
        counts, sums = counts[None], sums[None]
    groups = counts.shape[0]
    device = codebook.device
    if num_codes == 0 or groups == 0:
        return

    n_buffer = torch.empty(1, dtype=torch.float32, device=device)
    decay, one_minus_decay = float(decay), 1.0 - float(decay)
    _cluster_size_kernel[(1,)](
        cluster_size, counts, n_buffer, num_codes, groups, cluster_size.stride(0), counts.stride(0), counts.stride(1),
        decay, one_minus_decay,
    )
    if dim == 0:
        return
    grid = lambda meta: (triton.cdiv(num_codes, meta["BLOCK_L"]), triton.cdiv(dim, meta["BLOCK_D"]))
    _embed_kernel[grid](
        embed_sum, codebook, cluster_size, sums, n_buffer,
        num_codes, dim, groups,
        cluster_size.stride(0), embed_sum.stride(0), embed_sum.stride(1), codebook.stride(0), codebook.stride(1),
        sums.stride(0), sums.stride(1), sums.stride(2),
        decay, one_minus_decay, float(eps), num_codes * float(eps),
    )
