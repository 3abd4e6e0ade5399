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

The mean itself is invisible to every loss once it is taken out, so nothing
holds it in place: it drifts from step to step, and a running mean of the
last few batches lags the final weights' mean by several times the features'
spread across clips (measured: 1.2 against 0.2, which puts every evaluated
clip on a handful of codes). :func:`calibrate_centres` therefore sets the
running mean once more at the end of training, as the plain mean over
training batches under the final weights in evaluation mode.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

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
        stacked, count = self.sums_and_counts(general, masks)
        if reduce is not None:
            stacked, count = reduce([stacked, count])
        return stacked / count.clamp(min=1.0)[:, None]

    def sums_and_counts(self, general: dict, masks: dict) -> tuple:
        """``([modalities, dim] sums, [modalities] counts)`` over the real steps of this batch (zero for a
        modality the batch lacks)."""
        sums, counts = [], []
        for m in self.modalities:
            if m not in general:
                sums.append(self.running_mean.new_zeros(self.running_mean.shape[1]))
                counts.append(self.running_mean.new_zeros(1))
                continue
            z = general[m].detach().float()
            mask = masks.get(m)
            if mask is not None:
                keep = mask.to(z.dtype)[..., None]
                sums.append((z * keep).sum(dim=(0, 1)))
                counts.append(keep.sum().reshape(1))
            else:
                sums.append(z.sum(dim=(0, 1)))
                counts.append(torch.tensor([float(z.shape[0] * z.shape[1])], device=z.device))
        return torch.stack(sums), torch.cat(counts)

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


@torch.no_grad()
def calibrate_centres(model: nn.Module, batches: Iterable, *, reduce: Optional[Callable[[list], list]] = None) -> dict:
    """Set every :class:`GeneralCentre` of ``model`` to the mean over ``batches`` under the current weights.

    The batches run through ``model`` in evaluation mode (no codebook or
    running-mean updates, no dropout), as evaluation will see them; each
    centre's input is summed over the real steps, ``reduce`` sums the totals
    across data-parallel ranks (so every rank ends with the same mean), and
    the running mean becomes their plain average. A modality no batch carried
    keeps its running mean. Returns ``{centre name: {modality: distance moved}}``
    (empty when the model has no centre); the model's mode is restored.
    """
    centres = {name: module for name, module in model.named_modules() if isinstance(module, GeneralCentre)}
    if not centres:
        return {}
    totals = {name: [torch.zeros_like(c.running_mean, dtype=torch.float64),
                     torch.zeros(len(c.modalities), dtype=torch.float64, device=c.running_mean.device)]
              for name, c in centres.items()}

    def collect(name):
        def hook(module, args, kwargs, output):
            general, masks = args[0], (args[1] if len(args) > 1 else kwargs.get("masks", {}))
            sums, counts = module.sums_and_counts(general, masks)
            totals[name][0] += sums.double()
            totals[name][1] += counts.double()
        return hook

    handles = [c.register_forward_hook(collect(name), with_kwargs=True) for name, c in centres.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    moved = {}
    for name, c in centres.items():
        sums, counts = totals[name]
        if reduce is not None:
            sums, counts = reduce([sums, counts])
        seen = counts > 0
        new = torch.where(seen[:, None], sums / counts.clamp(min=1.0)[:, None], c.running_mean.double())
        moved[name] = {m: float((new[i] - c.running_mean.double()[i]).norm()) for i, m in enumerate(c.modalities)
                       if bool(seen[i])}
        c.running_mean.copy_(new.to(c.running_mean.dtype))
        if bool(seen.any()):
            c.ready.fill_(1.0)
    return moved
