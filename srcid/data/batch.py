"""The batch: what the reader yields and the model consumes."""
from __future__ import annotations

import dataclasses
import zlib
from typing import Optional

import torch


@dataclasses.dataclass
class Batch:
    """A batch of clips as float32 tensors.

    * ``features[m]``: ``[B, T, ...]`` float32 for each modality ``m`` the batch
      carries (``"audio"``, ``"video"``, ``"text"``); a modality with a varying
      first dimension (text tokens) is zero-padded to the longest clip.
    * ``masks[m]``: ``[B, T]`` bool, True on real (not padded) steps; present
      for every modality in ``features``.
    * ``labels``: ``[B]`` int64 clip-level class, ``-1`` where the clip has none.
    * ``segments[m]``: ``[B, T, C]`` float32 multi-hot per-segment labels for the
      modalities whose ``meta.json`` carries them (C = number of classes).
    * ``keys`` and ``captions``: per clip, in batch order.
    """

    keys: list
    features: dict
    masks: dict
    labels: torch.Tensor
    segments: dict = dataclasses.field(default_factory=dict)
    captions: list = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def modalities(self) -> tuple:
        return tuple(self.features)

    def to(self, device, non_blocking: bool = False) -> "Batch":
        move = lambda d: {k: v.to(device, non_blocking=non_blocking) for k, v in d.items()}  # noqa: E731
        return dataclasses.replace(
            self,
            features=move(self.features),
            masks=move(self.masks),
            labels=self.labels.to(device, non_blocking=non_blocking),
            segments=move(self.segments),
        )

    def pin_memory(self) -> "Batch":
        pin = lambda d: {k: v.pin_memory() for k, v in d.items()}  # noqa: E731
        return dataclasses.replace(
            self, features=pin(self.features), masks=pin(self.masks), labels=self.labels.pin_memory(), segments=pin(self.segments)
        )

    def rows(self, start: int, stop: int) -> "Batch":
        """The clips ``start:stop`` of the batch (padded modalities keep their padded length)."""
        part = lambda d: {k: v[start:stop] for k, v in d.items()}  # noqa: E731
        return Batch(
            keys=self.keys[start:stop], features=part(self.features), masks=part(self.masks),
            labels=self.labels[start:stop], segments=part(self.segments), captions=self.captions[start:stop],
        )

    def select(self, modalities) -> "Batch":
        """The same clips with only the given modalities."""
        keep = lambda d: {k: v for k, v in d.items() if k in modalities}  # noqa: E731
        return dataclasses.replace(self, features=keep(self.features), masks=keep(self.masks), segments=keep(self.segments))


def step_labels(labels: torch.Tensor, segments: Optional[torch.Tensor], steps: int) -> torch.Tensor:
    """``[B, steps]`` int64 class of each step of one modality, ``-1`` where it has none.

    ``labels``: ``[B]`` clip classes (``-1``: none); ``segments``: that modality's ``[B, T, C]`` multi-hot
    per-segment labels, or ``None``. With segments, a step takes the class of its segment where exactly one
    class is on (background and overlapping events have none); segments of another length than ``steps``
    cannot be aligned with the steps, so every step then has none. Without segments (text) every step takes
    its clip's class.
    """
    b = labels.shape[0]
    if segments is None:
        return labels.to(torch.int64).reshape(b, 1).expand(b, steps).clone()
    if tuple(segments.shape[:2]) != (b, steps) or segments.shape[-1] == 0:
        return torch.full((b, steps), -1, dtype=torch.int64, device=labels.device)
    on = segments > 0
    single = on.sum(-1) == 1
    return torch.where(single, on.to(torch.int64).argmax(-1), torch.full_like(single, -1, dtype=torch.int64))


def fitting_clips(keys: list) -> torch.Tensor:
    """``[B]`` bool: the clips a held-out reading fits on (the CRC-32 of the key is even); the others are scored.

    A function of the key alone, so the split is the same whatever the order, the batching or the number of
    ranks that read the clips.
    """
    return torch.tensor([zlib.crc32(str(key).encode("utf-8")) % 2 == 0 for key in keys], dtype=torch.bool)
