"""What class a layer's codes carry: the class read back from the codes and from the features they quantize.

A codebook can use many codes and still lose what the downstream tasks need:
on the realistic synthetic data layer 1 uses 72-103 codes while its codes read
the class a few points above what the most frequent class alone scores
(docs/RESULTS.md). This module measures that on labelled clips, with nothing
trained:

* **Step labels** (``srcid.data.batch.step_labels``). A step of a modality
  whose clip carries per-segment labels (``Batch.segments[m]``) takes the
  class of its segment where exactly one class is on (background and
  overlapping events are left out); a step of a modality without them (text)
  takes the clip's class (``Batch.labels``; ``-1``, no class, is left out).
* **Held out** (``srcid.data.batch.fitting_clips``). Clips whose key has an
  even CRC-32 fit, the others are scored, so nothing is scored on what it was
  fitted on, and the split depends neither on the order nor on the batching.
* **From the codes** (``srcid.train.final_codes.class_from_code_counts``, which
  the trainer's end-of-training reading also uses): each code (an RVQ tuple
  counts as one) predicts the most frequent class of its fitted steps (ties:
  the smallest class index); a code never seen while fitting predicts the
  fitted steps' most frequent class.
* **From the general features**: the nearest class mean (Euclidean, float64)
  of the pre-quantization general features. Nearest-centroid is a weak reader,
  so a gap between it and the codes is a lower bound on what quantization lost.
* **Most frequent class**: predicting the fitted steps' most frequent class
  for every step; what reading nothing scores.

Text whose captions name only their class shares nothing else with audio and
video, so about one code per class (``classes``) would be enough for it, and
such codes would read the class back at nearly 100%.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from srcid.train.final_codes import class_from_code_counts


@dataclasses.dataclass
class ClassReading:
    """The class read back from one layer and modality on held-out labelled steps."""

    labelled_steps: int  # labelled real steps, fitted and scored
    classes: int  # distinct classes on those steps
    scored_steps: int  # the steps of the scored clips
    from_codes: float  # accuracy of the code -> most frequent class map
    from_general: float  # accuracy of the nearest class mean of the general features
    most_frequent: float  # accuracy of predicting the fitted steps' most frequent class


class ClassReadingAccumulator:
    """Collects labelled steps batch by batch; :meth:`result` fits and scores."""

    def __init__(self):
        self.general, self.codes, self.labels, self.fit = [], [], [], []

    def add(self, general: torch.Tensor, codes: torch.Tensor, labels: torch.Tensor, fit: torch.Tensor) -> None:
        """Real steps of one batch: general ``[n, D]``, codes ``[n, stages]``, labels ``[n]`` (-1: none), and
        ``fit`` ``[n]`` bool, True for the steps of the clips that fit (the others are scored)."""
        keep = labels >= 0
        if not bool(keep.any()):
            return
        self.general.append(general[keep].detach().to("cpu", torch.float64))
        self.codes.append(codes[keep].detach().to("cpu", torch.int64).reshape(int(keep.sum()), -1))
        self.labels.append(labels[keep].detach().to("cpu", torch.int64))
        self.fit.append(fit[keep].detach().to("cpu", torch.bool))

    def result(self) -> Optional[ClassReading]:
        """``None`` when fewer than two classes were seen, or when either half of the clips has no labelled step."""
        if not self.labels:
            return None
        general, labels, fit = torch.cat(self.general), torch.cat(self.labels), torch.cat(self.fit)
        _, codes = torch.unique(torch.cat(self.codes), dim=0, return_inverse=True)  # an RVQ tuple is one code
        score = ~fit
        n_classes = int(labels.max()) + 1
        counts = torch.zeros(2, int(codes.max()) + 1, n_classes, dtype=torch.float64)
        for half, chosen in enumerate((fit, score)):
            counts[half].index_put_((codes[chosen], labels[chosen]), torch.ones(int(chosen.sum()), dtype=torch.float64),
                                    accumulate=True)
        reading = class_from_code_counts(counts[0], counts[1])
        if reading is None:
            return None

        # nearest class mean of the general features (classes seen while fitting)
        fit_counts = counts[0].sum(0)
        seen = torch.nonzero(fit_counts > 0).flatten()
        sums = torch.zeros(n_classes, general.shape[1], dtype=torch.float64)
        sums.index_add_(0, labels[fit], general[fit])
        means = sums[seen] / fit_counts[seen].unsqueeze(1)
        nearest = seen[torch.cdist(general[score], means).argmin(1)]
        return ClassReading(
            labelled_steps=int(labels.numel()), classes=int(torch.unique(labels).numel()),
            scored_steps=int(score.sum()), from_codes=reading[0],
            from_general=float((nearest == labels[score]).double().mean()), most_frequent=reading[1],
        )
