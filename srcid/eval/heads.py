"""Small heads trained on frozen quantized sequences ``[B, T, D]``.

* :class:`ClassificationHead` (AVE, UCF <-> VGGSound): Linear ``D -> hidden``,
  max over time, Linear ``hidden -> classes``; cross-entropy loss.
* :class:`LocalizationHead` (AVVP, AVE -> AVVP): per segment Linear
  ``D -> hidden`` then Linear ``hidden -> classes``, with no activation in
  between (the method notes list none and the reference heads use none).
  Loss = BCE-with-logits averaged over segments and classes, plus a
  learnable-weight log-softmax term::

      term = -mean over segments of sum_c exp(-alpha_c) * y_c * log_softmax(logits)_c

  with one learnable ``alpha_c`` per class (initialised to 0.1) and the 0/1
  targets ``y`` used as they are (not normalised per segment). This is how
  the reference localization probe defines "BCE + a learnable-weight
  log-softmax term"; ``exp(-alpha)`` keeps every weight positive.

``hidden`` defaults to 256, the method's setting for ``D = 256``; the
reference code uses ``hidden = D``, available by passing it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from srcid.errors import SrcidError

HEAD_KINDS = ("classification", "localization")
ALPHA_INIT = 0.1


def _check_sizes(who: str, in_dim: int, num_classes: int, hidden: int) -> None:
    if in_dim < 1 or num_classes < 2 or hidden < 1:
        raise SrcidError(f"{who}: need in_dim >= 1, hidden >= 1 and classes >= 2, got {in_dim}, {hidden}, {num_classes}")


def _check_sequence(x: torch.Tensor, in_dim: int, who: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != in_dim:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise SrcidError(f"{who}: expected features [batch, time, {in_dim}], got {shape}")
    if x.shape[1] == 0:
        raise SrcidError(f"{who}: features have no time steps, got {tuple(x.shape)}")


class ClassificationHead(nn.Module):
    """Clip classifier: Linear, max over time, Linear. ``forward`` gives logits ``[B, classes]``."""

    kind = "classification"

    def __init__(self, in_dim: int, num_classes: int, hidden: int = 256):
        super().__init__()
        _check_sizes("classification head", in_dim, num_classes, hidden)
        self.in_dim, self.num_classes = in_dim, num_classes
        self.proj = nn.Linear(in_dim, hidden)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_sequence(x, self.in_dim, "classification head")
        return self.classifier(self.proj(x).amax(dim=1))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of ``logits [B, C]`` against class indices ``[B]``."""
        if labels.shape != logits.shape[:1]:
            raise SrcidError(f"classification head: labels {tuple(labels.shape)} do not match logits {tuple(logits.shape)}")
        return F.cross_entropy(logits, labels)


class LocalizationHead(nn.Module):
    """Per-segment multi-label classifier. ``forward`` gives logits ``[B, T, classes]``."""

    kind = "localization"

    def __init__(self, in_dim: int, num_classes: int, hidden: int = 256):
        super().__init__()
        _check_sizes("localization head", in_dim, num_classes, hidden)
        self.in_dim, self.num_classes = in_dim, num_classes
        self.proj = nn.Linear(in_dim, hidden)
        self.classifier = nn.Linear(hidden, num_classes)
        self.alpha = nn.Parameter(torch.full((num_classes,), ALPHA_INIT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_sequence(x, self.in_dim, "localization head")
        return self.classifier(self.proj(x))

    def log_softmax_weights(self) -> torch.Tensor:
        """The per-class weights ``exp(-alpha)`` of the log-softmax term."""
        return torch.exp(-self.alpha)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """BCE + the learnable-weight log-softmax term on 0/1 ``targets [B, T, C]``."""
        if targets.shape != logits.shape:
            raise SrcidError(f"localization head: targets {tuple(targets.shape)} do not match logits {tuple(logits.shape)}")
        targets = targets.to(logits.dtype)
        bce = F.binary_cross_entropy_with_logits(logits, targets)
        weighted = targets * logits.log_softmax(dim=-1) * self.log_softmax_weights().to(logits.dtype)
        return bce - weighted.sum(dim=-1).mean()


def make_head(kind: str, in_dim: int, num_classes: int, hidden: int = 256) -> nn.Module:
    """A fresh head of ``kind`` (``"classification"`` or ``"localization"``)."""
    if kind == "classification":
        return ClassificationHead(in_dim, num_classes, hidden)
    if kind == "localization":
        return LocalizationHead(in_dim, num_classes, hidden)
    raise SrcidError(f"head kind {kind!r} is not one of {', '.join(HEAD_KINDS)}")
