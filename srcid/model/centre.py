"""Centring of a layer's general features: the batch mean taken out before quantization.

Layer 2's general encoder starts with outputs that differ little from clip to
clip: most of each feature (norm 8 after the encoder's final LayerNorm) is a
component shared by every clip, and in the first optimizer steps after the
warm-start switch that shared component grows until every feature falls on
one code (docs/RESULTS.md). :class:`GeneralCentre` subtracts, per modality and
dimension, the mean over the real steps of the batch (detached; summed across
data-parallel ranks through the quantizer's ``reduce_stats``, so every rank
subtracts the same vector) while training, and keeps an exponential moving
average of it (``momentum``) that evaluation, ``encode`` and export use, so a
clip's code does not depend on the other clips of its batch.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

MOMENTUM = 0.1  # weight of the newest batch mean in the running mean


class GeneralCentre(nn.Module):
    def __init__(self, modalities: tuple, dim: int, momentum: float = MOMENTUM):
        super().__init__()
        self.modalities = tuple(modalities)
        self.momentum = momentum
        self.register_buffer("running_mean", torch.zeros(len(self.modalities), dim))
        self.register_buffer("ready", torch.tensor(0.0))  # 1 once a training batch has set the running mean

    def batch_means(self, general: dict, masks: dict, reduce: Optional[Callable[[list], list]] = None) -> torch.Tensor:
        """``[modalities, dim]`` means over the real steps of the batch (of every rank when ``reduce`` sums)."""
        sums, counts = [], []
        for m in self.modalities:
            z = general[m].detach().float()
            mask = masks.get(m)
            if mask is not None:
                keep = mask.to(z.dtype)[..., None]
                sums.append((z * keep).sum(dim=(0, 1)))
                counts.append(keep.sum().reshape(1))
            else:
                sums.append(z.sum(dim=(0, 1)))
                counts.append(torch.tensor([float(z.shape[0] * z.shape[1])], device=z.device))
        stacked, count = torch.stack(sums), torch.cat(counts)
        if reduce is not None:
            stacked, count = reduce([stacked, count])
        return stacked / count.clamp(min=1.0)[:, None]

    def forward(self, general: dict, masks: dict, *, update: bool,
                reduce: Optional[Callable[[list], list]] = None) -> dict:
        if update:
            means = self.batch_means(general, masks, reduce)
            with torch.no_grad():  # the first batch sets the running mean, later ones move it; no host sync
                means_ = means.to(self.running_mean.dtype)
                self.running_mean.copy_(torch.where(self.ready > 0.5, self.running_mean.lerp(means_, self.momentum),
                                                    means_))
                self.ready.fill_(1.0)
        else:
            means = self.running_mean
        row = {m: i for i, m in enumerate(self.modalities)}
        return {m: z - means[row[m]].to(z.dtype) for m, z in general.items()}
