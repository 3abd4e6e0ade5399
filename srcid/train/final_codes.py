"""Codes used in evaluation mode at the end of training: what ``eval``, ``encode`` and ``inspect`` will see.

The per-step counts the trainer logs (``L<k>/codes/<m>``) are of training-mode
features, dropout noise included. Layer 2's clean general features fall in a
few tight groups, so its codebook spends codes on that noise and evaluation
finds about half of the codes a training step uses (docs/RESULTS.md). After
the last step (and the centre calibration) the trainer therefore runs the
first ``centre_clips`` training clips through the model in evaluation mode and
counts, per layer and modality, the codes of every real step (every rank's
clips: the histograms are summed across ranks). An RVQ layer counts each
stage's codes and reports their mean, as the per-step metric does; FSQ counts
its grid points.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch

from srcid.model.quantizers import codebook_size


@torch.no_grad()
def evaluation_code_use(model, batches: Iterable, *, reduce: Optional[Callable[[list], list]] = None) -> dict:
    """``{"L<k>": {modality: codes}}`` over ``batches`` in evaluation mode (the model's mode is restored).

    ``reduce`` sums a list of tensors across data-parallel ranks (in place or returned); every rank must call
    with the same number of batches. Codes are distinct indices over real steps (RVQ: the mean over stages).
    """
    sizes = [codebook_size(getattr(layer, "quantizer", None)) for layer in model.layers]
    keys = [(k, m) for k, layer in enumerate(model.layers) for m in layer.modalities]
    histograms = {}
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            output = model(batch)
            for k, layer in enumerate(output.layers):
                if sizes[k] is None:
                    continue
                for m in output.modalities:
                    indices = layer.indices[m]
                    stages = indices.shape[-1] if indices.dim() == 3 else 1
                    rows = indices.reshape(indices.shape[0] * indices.shape[1], stages)
                    keep = layer.masks.get(m)
                    if keep is not None:
                        rows = rows[keep.reshape(-1)]
                    hist = histograms.setdefault((k, m), torch.zeros(stages, sizes[k], dtype=torch.float64,
                                                                     device=rows.device))
                    for s in range(stages):
                        hist[s] += torch.bincount(rows[:, s].long(), minlength=sizes[k]).to(hist)
    finally:
        model.train(was_training)
    present = [key for key in keys if key in histograms]
    tensors = [histograms[key] for key in present]
    if reduce is not None and tensors:
        tensors = reduce(tensors)
    codes: dict = {}
    for (k, m), hist in zip(present, tensors):
        codes.setdefault(f"L{k + 1}", {})[m] = float((hist > 0).sum(dim=1).double().mean())
    return codes


def collapsed(codes: dict, bound: Callable[[int], float]) -> list:
    """``[(layer number, modality, codes, bound)]`` of every entry at or below ``bound(layer number)``."""
    found = []
    for layer, per_modality in codes.items():
        k = int(layer[1:])
        for m, value in per_modality.items():
            if value <= bound(k):
                found.append((k, m, value, bound(k)))
    return found


def summary_line(codes: dict, clips: int) -> str:
    """One console line: the codes per layer and modality."""
    parts = [f"layer {layer[1:]} " + " / ".join(f"{m} {v:.0f}" for m, v in per_modality.items())
             for layer, per_modality in codes.items()]
    return f"codes used on {clips} training clips in evaluation mode: " + "; ".join(parts)
