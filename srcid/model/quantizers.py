"""The quantizer interface shared by VQ (MMEMA), RVQ and FSQ, and the pieces they share.

A quantizer takes the general features of every modality of a step at once
(MMEMA couples them) and returns, per modality, ``(quantized, indices, loss)``:
the straight-through quantized sequence ``[B, T, D]`` (float32), the code
indices, and the commitment loss. Distances and EMA statistics are float32
whatever the surrounding autocast does.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import torch
from torch import nn
import torch.nn.functional as F

from srcid.errors import SrcidError


@dataclasses.dataclass
class QuantizerOutput:
    """What a quantizer returns for one step (all dicts are keyed by modality)."""

    quantized: dict  # [B, T, D] float32, straight-through: forward = codes, gradient = identity to the input
    indices: dict  # [B, T] int64 ([B, T, S] for RVQ: one index per stage)
    loss: dict  # scalar commitment loss per modality
    perplexity: dict  # scalar tensor per modality: exp(entropy of its code usage this step)
    codes_used: torch.Tensor  # scalar: fraction of codes used by any modality this step
    codes: dict  # scalar float tensor per modality: distinct codes it used this step (RVQ: mean over stages)
    codebook: Optional[torch.Tensor] = None  # [L, D] codebook the step was assigned with (for CMCM), or None


class Quantizer(nn.Module):
    """Base class: the data-parallel hook and the interface.

    ``reduce_stats``: set by a distributed trainer to an in-place sum across
    ranks; applied to one flat float32 buffer holding all assignment counts and
    sums of a step, before the EMA update. ``None``: a single process.

    Subclasses implement ``forward(features: dict[str, Tensor [B, T, D]], *,
    update: bool, pool: dict | None = None) -> QuantizerOutput``;
    ``update=True`` (training) runs the codebook EMA and needs every modality
    of the quantizer. ``pool``: the same features over the global batch under
    data parallelism (detached; ``None``: ``features`` themselves), the rows
    that data initialisation and dead-code resets draw from, so every rank
    draws the same ones.
    """

    uses_cmcm: bool = False

    def __init__(self):
        super().__init__()
        self.reduce_stats: Optional[Callable[[torch.Tensor], None]] = None

    def _reduce(self, tensors: list) -> list:
        """Apply ``reduce_stats`` to the tensors packed into one flat buffer; return them unpacked."""
        if self.reduce_stats is None:
            return tensors
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        self.reduce_stats(flat)
        out, start = [], 0
        for t in tensors:
            out.append(flat[start:start + t.numel()].view(t.shape))
            start += t.numel()
        return out


class CodebookQuantizer(Quantizer):
    """A quantizer with EMA codebooks (VQ, RVQ): float32 outside autocast, training or lookup.

    Subclasses hold ``modalities`` and implement ``_train_step(z, names, pool)``
    (assign, reduce statistics, EMA update) and ``_lookup(z, names)``.
    """

    def forward(self, features: dict, *, update: bool, pool: Optional[dict] = None) -> QuantizerOutput:
        names = [m for m in self.modalities if m in features]
        if update and len(names) != len(self.modalities):
            raise SrcidError(f"quantizer update needs every modality ({', '.join(self.modalities)}); got {', '.join(features)}")
        device = next(iter(features.values())).device
        with torch.autocast(device.type, enabled=False):
            z = {m: features[m].float() for m in names}
            if update:
                rows = None if pool is None else {m: pool[m].detach().float() for m in names}
                return self._train_step(z, names, rows)
            return self._lookup(z, names)


def mmema_mix(rows: torch.Tensor, own: float) -> torch.Tensor:
    """MMEMA-mixed vectors ``[M, N, D]``: ``own * x_m + (1 - own) / (M - 1) * sum of the others``.

    Rows of all modalities at the same (clip, time) position are mixed; with
    three modalities and ``own = 0.5`` this is ``0.5 x_m + 0.25 x_a + 0.25 x_b``,
    with two ``0.5 x_m + 0.5 x_other``. One modality is returned unchanged.
    """
    m = rows.shape[0]
    if m == 1:
        return rows
    other = (1.0 - own) / (m - 1)
    return (own - other) * rows + other * rows.sum(0, keepdim=True)


def mmema_commitment(features: dict, codes: dict, beta: float, own: float, cross: float) -> dict:
    """MMEMA-modified commitment per modality m:
    ``own * beta * mse(z_m, sg q_m) + cross * beta * sum_{n != m} mse(z_m, sg q_n)``."""
    losses = {}
    for m, z in features.items():
        loss = own * beta * F.mse_loss(z, codes[m].detach())
        for n, q in codes.items():
            if n != m:
                loss = loss + cross * beta * F.mse_loss(z, q.detach())
        losses[m] = loss
    return losses


def straight_through(z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``z + (q - z).detach()``: the value of ``q``, the gradient of ``z``."""
    return z + (q - z).detach()


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """``exp(-sum p log p)`` of the code-usage distribution in ``counts`` (last dim = codes)."""
    p = counts / counts.sum(-1, keepdim=True).clamp_min(1e-12)
    return torch.exp(-(p * torch.log(p + 1e-10)).sum(-1))


def distinct_codes(counts: torch.Tensor) -> torch.Tensor:
    """Number of codes with a non-zero count (last dim = codes), as float."""
    return (counts > 0).float().sum(-1)


def group_counts(indices: torch.Tensor, groups: int, num_codes: int) -> torch.Tensor:
    """Codes per group ``[G, L]`` from flat indices of ``G`` equal contiguous groups (no one-hot)."""
    rows = indices.shape[0] // groups
    slot = indices + (torch.arange(indices.shape[0], device=indices.device) // rows) * num_codes
    counts = torch.zeros(groups * num_codes, device=indices.device)
    counts.index_add_(0, slot, torch.ones(slot.shape[0], device=indices.device))  # bincount would sync on CUDA
    return counts.view(groups, num_codes)


def codebook_size(quantizer) -> Optional[int]:
    """Codes of a layer's quantizer: ``num_codes`` (VQ; RVQ: of each stage; FSQ: ``prod(levels)``), None if unknown."""
    size = getattr(quantizer, "num_codes", None)
    if size is None and getattr(quantizer, "levels", None) is not None:
        size = math.prod(int(v) for v in quantizer.levels)
    try:
        size = int(size)
    except (TypeError, ValueError):
        return None
    return size if size > 0 else None
