"""What class a layer's codes carry: the class read back from the codes and from the features they quantize.

A codebook can use many codes and still lose what the downstream tasks need:
on the realistic synthetic data a linear probe reads AVE's class from layer 1's
general features at 42-45% and from their codes at 14-16% (docs/RESULTS.md),
while ``srcid inspect``'s code count looks healthy. This module measures that
loss on labelled clips, with nothing trained:

* **Step labels.** A step of a modality whose clip carries per-segment labels
  (``Batch.segments[m]``) takes the class of its segment where exactly one
  class is on (background and overlapping events are left out); a step of a
  modality without them (text) takes the clip's class (``Batch.labels``;
  ``-1``, no class, is left out).
* **Held out.** The labelled clips are split by their order: even clips fit,
  odd clips are scored, so nothing is scored on what it was fitted on.
* **From the codes**: each code (an RVQ tuple counts as one) predicts the most
  frequent class of its fitted steps (ties: the smallest class index); a code
  never seen while fitting predicts the fitted steps' most frequent class.
* **From the general features**: the nearest class mean (Euclidean, float64)
  of the pre-quantization general features. Nearest-centroid is a weak reader,
  so a gap between it and the codes is a lower bound on what quantization lost.
* **Most frequent class**: predicting the fitted steps' most frequent class
  for every step; what reading nothing scores.

A text modality whose captions name only the class has nothing else shared
with audio and video, so its general code can use about as many codes as
there are classes (``classes``) and still be right: the class read back from
its codes is then close to 100%.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch


@dataclasses.dataclass
class ClassReading:
    """The class read back from one layer and modality on held-out labelled steps."""

    labelled_steps: int  # labelled real steps, fitted and scored
    classes: int  # distinct classes on those steps
    scored_steps: int  # the steps scored (those of odd clips)
    from_codes: float  # accuracy of the code -> most frequent class map
    from_general: float  # accuracy of the nearest class mean of the general features
    most_frequent: float  # accuracy of predicting the fitted steps' most frequent class


def step_labels(labels: torch.Tensor, segments: Optional[torch.Tensor], steps: int) -> torch.Tensor:
    """``[B, steps]`` int64 class of each step, ``-1`` where it has none (see the module docstring).

    ``labels``: ``[B]`` clip classes (``-1``: none); ``segments``: ``[B, T, C]`` multi-hot per-segment labels of
    the modality, or ``None``. Segments of another length than ``steps`` cannot be aligned with the steps:
    every step then has no class.
    """
    b = labels.shape[0]
    if segments is None:
        return labels.to(torch.int64).reshape(b, 1).expand(b, steps).clone()
    if tuple(segments.shape[:2]) != (b, steps) or segments.shape[-1] == 0:
        return torch.full((b, steps), -1, dtype=torch.int64, device=labels.device)
    on = segments > 0
    single = on.sum(-1) == 1
    return torch.where(single, on.to(torch.int64).argmax(-1), torch.full_like(single, -1, dtype=torch.int64))


class ClassReadingAccumulator:
    """Collects labelled steps batch by batch; :meth:`result` fits and scores."""

    def __init__(self):
        self.general, self.codes, self.labels, self.clips = [], [], [], []

    def add(self, general: torch.Tensor, codes: torch.Tensor, labels: torch.Tensor, clips: torch.Tensor) -> None:
        """Real steps of one batch: general ``[n, D]``, codes ``[n, stages]``, labels ``[n]`` (-1: none), clips ``[n]``.

        ``clips`` numbers each step's clip in reading order (the same number for the steps of one clip).
        """
        keep = labels >= 0
        if not bool(keep.any()):
            return
        self.general.append(general[keep].detach().to("cpu", torch.float64))
        self.codes.append(codes[keep].detach().to("cpu", torch.int64).reshape(int(keep.sum()), -1))
        self.labels.append(labels[keep].detach().to("cpu", torch.int64))
        self.clips.append(clips[keep].detach().to("cpu", torch.int64))

    def result(self) -> Optional[ClassReading]:
        """``None`` when fewer than two classes were seen, or when either half of the clips has no labelled step."""
        if not self.labels:
            return None
        general, labels, clips = torch.cat(self.general), torch.cat(self.labels), torch.cat(self.clips)
        _, codes = torch.unique(torch.cat(self.codes), dim=0, return_inverse=True)
        fit = clips % 2 == 0
        score = ~fit
        classes = int(torch.unique(labels).numel())
        if classes < 2 or not bool(fit.any()) or not bool(score.any()):
            return None
        n_classes = int(labels.max()) + 1
        fit_counts = torch.bincount(labels[fit], minlength=n_classes)
        majority = int(fit_counts.argmax())  # argmax returns the first maximum: ties go to the smallest class

        # codes -> most frequent class of their fitted steps
        table = torch.zeros(int(codes.max()) + 1, n_classes, dtype=torch.int64)
        table.index_put_((codes[fit], labels[fit]), torch.ones_like(labels[fit]), accumulate=True)
        code_class = torch.where(table.sum(1) > 0, table.argmax(1), torch.full_like(table[:, 0], majority))
        from_codes = (code_class[codes[score]] == labels[score]).double().mean()

        # nearest class mean of the general features (classes seen while fitting)
        seen = torch.nonzero(fit_counts > 0).flatten()
        sums = torch.zeros(n_classes, general.shape[1], dtype=torch.float64)
        sums.index_add_(0, labels[fit], general[fit])
        means = sums[seen] / fit_counts[seen].unsqueeze(1).double()
        nearest = seen[torch.cdist(general[score], means).argmin(1)]
        from_general = (nearest == labels[score]).double().mean()

        return ClassReading(
            labelled_steps=int(labels.numel()), classes=classes, scored_steps=int(score.sum()),
            from_codes=float(from_codes), from_general=float(from_general),
            most_frequent=float((labels[score] == majority).double().mean()),
        )
