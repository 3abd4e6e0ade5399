"""What a trained model's representations look like: code usage, the spread of the specific outputs, reconstruction.

A collapse check. A specific output ``y`` that no longer varies across clips
and steps carries nothing: the CLUB estimate of its mutual information with
the general code is zero however well the disentanglement worked, and layer 2,
which reads ``y``, has nothing left to quantize. Likewise a learned
reconstruction target (text: the BiLSTM output) can shrink until its
reconstruction error is small for no merit; the error relative to the
target's variance shows it.

Statistics are accumulated in float64 over every real step of the clips read
(padded text steps are left out), with the model in eval mode: no codebook
update, no step counted.
"""
from __future__ import annotations

import collections
import dataclasses
import math
from typing import Iterable, Optional

import torch

# a specific-output dimension counts as live when its std over clips and steps exceeds this:
# 1% of the scale of standardized input features
LIVE_STD = 1e-2


@dataclasses.dataclass
class RepresentationStats:
    """One layer and modality."""

    layer: int
    modality: str
    steps: int  # real (clip, time) steps the numbers are over
    distinct_codes: int  # different code indices (an RVQ tuple counts as one code)
    code_perplexity: float  # exp(entropy) of the code frequencies
    specific_dim: int
    specific_std: float  # std of y over steps, averaged over its dimensions
    specific_live_dims: int  # dimensions of y with std > live_std
    target_std: float  # std of the reconstruction target over steps, averaged over its features
    recon_mse: float
    recon_relative: Optional[float]  # recon_mse / mean target variance; None where the target does not vary

    @property
    def collapsed(self) -> bool:
        return self.specific_live_dims == 0


class _Moments:
    """Running count, sum and sum of squares per feature (float64)."""

    def __init__(self):
        self.count, self.sum, self.sum_sq = 0, None, None

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().to(torch.float64)
        s, sq = rows.sum(0), (rows * rows).sum(0)
        self.sum = s if self.sum is None else self.sum + s
        self.sum_sq = sq if self.sum_sq is None else self.sum_sq + sq
        self.count += rows.shape[0]

    def variance(self) -> torch.Tensor:
        """Population variance per feature."""
        mean = self.sum / self.count
        return (self.sum_sq / self.count - mean * mean).clamp_min(0.0)


class _Accumulator:
    def __init__(self):
        self.specific, self.target = _Moments(), _Moments()
        self.squared_error, self.codes = 0.0, collections.Counter()

    def add(self, y, target, reconstruction, indices) -> None:
        self.specific.add(y)
        self.target.add(target)
        self.squared_error += float(((reconstruction.to(torch.float64) - target.to(torch.float64)) ** 2).sum())
        keys = indices.reshape(indices.shape[0], -1).tolist()
        self.codes.update(tuple(k) for k in keys)

    def result(self, layer: int, modality: str, live_std: float) -> RepresentationStats:
        y_std = self.specific.variance().sqrt()
        t_var = self.target.variance()
        features = t_var.numel()
        mse = self.squared_error / (self.target.count * features)
        mean_var = float(t_var.mean())
        total = sum(self.codes.values())
        entropy = -sum(c / total * math.log(c / total) for c in self.codes.values())
        return RepresentationStats(
            layer=layer, modality=modality, steps=self.specific.count, distinct_codes=len(self.codes),
            code_perplexity=math.exp(entropy), specific_dim=y_std.numel(), specific_std=float(y_std.mean()),
            specific_live_dims=int((y_std > live_std).sum()), target_std=float(t_var.sqrt().mean()),
            recon_mse=mse, recon_relative=mse / mean_var if mean_var > 1e-12 else None,
        )


def _rows(t: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    """``[B, T, ...] -> [real steps, features]``."""
    flat = t.reshape(t.shape[0] * t.shape[1], -1)
    return flat if keep is None else flat[keep.reshape(-1)]


@torch.no_grad()
def representation_stats(model, batches: Iterable, *, live_std: float = LIVE_STD) -> list:
    """:class:`RepresentationStats` per layer and modality of ``model`` over ``batches`` (layer-major order)."""
    was_training = model.training
    model.eval()
    accumulators: dict = {}
    try:
        for batch in batches:
            output = model(batch)
            for k, layer in enumerate(output.layers, start=1):
                for m in output.modalities:
                    keep = layer.masks.get(m)
                    acc = accumulators.setdefault((k, m), _Accumulator())
                    acc.add(_rows(layer.specific[m], keep), _rows(layer.targets[m], keep),
                            _rows(layer.reconstructions[m], keep), _rows(layer.indices[m], keep))
    finally:
        model.train(was_training)
    return [acc.result(k, m, live_std) for (k, m), acc in accumulators.items()]


def _number(value: Optional[float], digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def to_markdown(stats: list, live_std: float = LIVE_STD) -> str:
    """The statistics as one markdown table."""
    lines = [
        f"| layer | modality | distinct codes | code perplexity | y dims live (std > {live_std:g}) | y std | "
        "target std | recon MSE | recon MSE / target var |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in stats:
        live = f"{s.specific_live_dims} / {s.specific_dim}" + (" (collapsed)" if s.collapsed else "")
        lines.append(
            f"| {s.layer} | {s.modality} | {s.distinct_codes} | {s.code_perplexity:.1f} | {live} | "
            f"{_number(s.specific_std)} | {_number(s.target_std)} | {_number(s.recon_mse)} | {_number(s.recon_relative, 3)} |"
        )
    return "\n".join(lines)
