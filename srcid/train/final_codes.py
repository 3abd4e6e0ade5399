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

Where the clips carry classes, the same pass reads the class back from each
layer's codes on held-out steps (``srcid inspect`` does the same, with the
general features as well; srcid/eval/code_classes.py): the clips whose key has
an even CRC-32 fit each code's most frequent class, the others are scored, and
everything is a per-code class histogram, so it sums across ranks. An RVQ
layer is read from its first stage's codes.
"""
from __future__ import annotations

from typing import Callable, Iterable, NamedTuple, Optional

import torch

from srcid.data.batch import fitting_clips, step_labels
from srcid.model.quantizers import codebook_size


class CodeUse(NamedTuple):
    """What :func:`evaluation_code_use` found, each ``{"L<k>": {modality: value}}``."""

    codes: dict  # distinct codes (RVQ: the mean over stages)
    class_from_codes: dict  # held-out accuracy of each code's most frequent class; only where it could be read
    most_frequent: dict  # held-out accuracy of the most frequent class alone (what reading nothing scores)


def class_from_code_counts(fitted: torch.Tensor, scored: torch.Tensor) -> Optional[tuple]:
    """``(from the codes, most frequent class)`` accuracies from ``[codes, classes]`` step counts of the fitted and
    the scored clips.

    Each code predicts its most frequent fitted class (ties: the smallest class index); a code without fitted
    steps predicts the most frequent fitted class. ``None`` with fewer than two classes, or no step in either half.
    """
    fitted, scored = fitted.double(), scored.double()
    per_class = fitted.sum(0)
    if int(((per_class + scored.sum(0)) > 0).sum()) < 2 or float(per_class.sum()) == 0 or float(scored.sum()) == 0:
        return None
    majority = per_class.argmax()  # the first maximum: ties go to the smallest class index
    choice = torch.where(fitted.sum(1) > 0, fitted.argmax(1), majority)
    total = scored.sum()
    return float(scored.gather(1, choice[:, None]).sum() / total), float(scored[:, majority].sum() / total)


@torch.no_grad()
def evaluation_code_use(model, batches: Iterable, *, reduce: Optional[Callable[[list], list]] = None,
                        classes: int = 0) -> CodeUse:
    """The codes of each layer and modality over ``batches`` in evaluation mode (the model's mode is restored).

    ``reduce`` sums a list of tensors across data-parallel ranks (in place or returned); every rank must call
    with the same number of batches. Codes are distinct indices over real steps (RVQ: the mean over stages).
    ``classes``: the number of classes the clips' labels index (the dataset's class list); with 2 or more the
    class is read back from the codes (the module docstring).
    """
    sizes = [codebook_size(getattr(layer, "quantizer", None)) for layer in model.layers]
    keys = [(k, m) for k, layer in enumerate(model.layers) for m in layer.modalities]
    histograms, by_class = {}, {}
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
                    if classes >= 2:
                        steps = indices.shape[1]
                        labels = step_labels(batch.labels, batch.segments.get(m), steps).to(rows.device)
                        fit = fitting_clips(batch.keys).to(rows.device)[:, None].expand(-1, steps)
                        labels, fit = labels.reshape(-1), fit.reshape(-1)
                        if keep is not None:
                            labels, fit = labels[keep.reshape(-1)], fit[keep.reshape(-1)]
                        counts = by_class.setdefault((k, m), torch.zeros(2, sizes[k], classes, dtype=torch.float64,
                                                                         device=rows.device))
                        # unlabelled steps and the other half add 0 at a clamped index: one pass, no selection by label
                        labelled = ((labels >= 0) & (labels < classes)).to(torch.float64)
                        index = (rows[:, 0].long(), labels.clamp(0, classes - 1))
                        counts[0].index_put_(index, labelled * fit, accumulate=True)
                        counts[1].index_put_(index, labelled * ~fit, accumulate=True)
    finally:
        model.train(was_training)
    present = [key for key in keys if key in histograms]
    read = [key for key in keys if key in by_class]
    tensors = [histograms[key] for key in present] + [by_class[key] for key in read]
    if reduce is not None and tensors:
        tensors = reduce(tensors)
    codes: dict = {}
    for (k, m), hist in zip(present, tensors):
        codes.setdefault(f"L{k + 1}", {})[m] = float((hist > 0).sum(dim=1).double().mean())
    from_codes: dict = {}
    most_frequent: dict = {}
    for (k, m), counts in zip(read, tensors[len(present):]):
        reading = class_from_code_counts(counts[0].cpu(), counts[1].cpu())
        if reading is not None:
            from_codes.setdefault(f"L{k + 1}", {})[m] = reading[0]
            most_frequent.setdefault(f"L{k + 1}", {})[m] = reading[1]
    return CodeUse(codes, from_codes, most_frequent)


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


def class_line(use: CodeUse) -> Optional[str]:
    """One console line: the class read back from the codes (``None`` where it could not be read)."""
    if not use.class_from_codes:
        return None
    parts = [f"layer {layer[1:]} " + " / ".join(f"{m} {100 * v:.0f}%" for m, v in per_modality.items())
             for layer, per_modality in use.class_from_codes.items()]
    chance = [100 * v for per in use.most_frequent.values() for v in per.values()]
    low, high = f"{min(chance):.0f}", f"{max(chance):.0f}"
    return ("class read back from the codes on held-out training clips: " + "; ".join(parts)
            + f" (the most frequent class alone: {low if low == high else f'{low}-{high}'}%)")
