"""FSQ: finite scalar quantization of a low-dimensional projection (a DCID baseline of the paper's Table I)."""
from __future__ import annotations

import math

import torch
from torch import nn

from srcid.model.quantizers import Quantizer, QuantizerOutput, distinct_codes, group_counts, perplexity


def fsq_bound(h: torch.Tensor, levels: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Squash each channel so that rounding gives exactly ``levels[i]`` values:
    ``tanh(h + shift) * half - offset`` with ``half = (L - 1)(1 + eps)/2``, ``offset = 0.5`` for even ``L``."""
    half = (levels - 1) * (1.0 + eps) / 2.0
    offset = torch.where(levels % 2 == 0, 0.5, 0.0).to(h.dtype)
    shift = torch.atanh(offset / half)
    return torch.tanh(h + shift) * half - offset


def fsq_round(h: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Bounded, rounded (straight-through) and normalised codes: each channel in ``[-1, 1]``."""
    bounded = fsq_bound(h, levels)
    rounded = bounded + (torch.round(bounded) - bounded).detach()
    return rounded / (levels // 2)


def fsq_codes_to_indices(codes: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Normalised codes ``[..., C]`` -> integer indices in ``[0, prod(levels))`` (mixed radix, first channel least significant)."""
    half = levels // 2
    digits = torch.round(codes * half + half).long()
    basis = torch.cumprod(torch.cat([levels.new_ones(1), levels[:-1]]), 0).long()
    return (digits * basis).sum(-1)


def fsq_indices_to_codes(indices: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`fsq_codes_to_indices`."""
    basis = torch.cumprod(torch.cat([levels.new_ones(1), levels[:-1]]), 0).long()
    digits = (indices[..., None] // basis) % levels.long()
    half = levels // 2
    return (digits - half).float() / half


class FSQQuantizer(Quantizer):
    """``Linear(D -> C)``, FSQ with ``levels`` (``C = len(levels)``), ``Linear(C -> D)``.

    No codebook, no EMA and no commitment loss (the loss is 0). The implicit
    codebook has ``prod(levels)`` codes; modalities are quantized independently.
    Bounding and rounding run in float32; the projections in their own dtype.
    """

    uses_cmcm = False

    def __init__(self, modalities, dim: int, levels):
        super().__init__()
        self.modalities = tuple(modalities)
        self.register_buffer("levels", torch.tensor(list(levels), dtype=torch.int64), persistent=False)
        self.num_codes = math.prod(levels)
        self.project_in = nn.Linear(dim, len(levels))
        self.project_out = nn.Linear(len(levels), dim)

    def forward(self, features: dict, *, update: bool, pool=None) -> QuantizerOutput:
        names = [m for m in self.modalities if m in features]
        device = next(iter(features.values())).device
        quantized, indices, counts, loss = {}, {}, [], {}
        with torch.autocast(device.type, enabled=False):
            dtype = self.project_in.weight.dtype
            for m in names:
                codes = fsq_round(self.project_in(features[m].to(dtype)).float(), self.levels)
                quantized[m] = self.project_out(codes.to(dtype)).float()
                indices[m] = fsq_codes_to_indices(codes.detach(), self.levels)
                counts.append(group_counts(indices[m].reshape(-1), 1, self.num_codes)[0])
                loss[m] = codes.new_zeros(())
        counts = torch.stack(counts)
        return QuantizerOutput(
            quantized=quantized, indices=indices, loss=loss,
            perplexity={m: perplexity(counts[i]) for i, m in enumerate(names)},
            codes_used=(counts.sum(0) > 0).float().mean(), codebook=None,
            codes={m: distinct_codes(counts[i]) for i, m in enumerate(names)},
        )
