"""Per-modality, per-feature standardisation of the model's inputs, fitted on the training data.

Real pre-extracted features come at very different scales: log-mel/VGGish
audio sits around -5 with a per-dimension std near 3, VGG19 pool5 video maps
are sparse and non-negative with a std near 0.25, BERT token features have a
small norm plus a few outlier dimensions. Fed raw, the general encoders map
every modality to a different region of the shared code space and the
codebooks collapse onto a few codes. :class:`InputNormalizer` maps each
feature ``f`` of a modality to ``(x_f - mean_f) / std_f``, with the moments
taken over every (clip, step) of the pretraining split (video: every grid
cell as well; text: real tokens only, padding left out).

The moments are buffers of the model, so checkpoints, the exported model,
``srcid encode``, ``eval`` and ``inspect`` all apply the same transform.
Until :meth:`InputNormalizer.set_moments` has run (``fitted == 0``) the
transform is the identity, which is also what a model saved before the
normaliser existed loads as. ``model.normalize_inputs=false`` never fits it
(the authors' pipeline feeds the raw features).
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

from srcid.errors import SrcidError
from srcid.model.buffers import Float32Buffers

# a feature whose std falls below this fraction of the modality's mean std (a dead CNN channel,
# a constant dimension) is divided by that floor instead: it stays near 0 rather than blowing up
STD_FLOOR = 1e-3


class InputMoments:
    """Count, sum and sum of squares per feature of each modality, in float64.

    ``add(batch)`` takes a :class:`~srcid.data.batch.Batch`; padded steps
    (``masks[m]`` False) are left out. :meth:`flat` / :meth:`from_flat` pack
    the moments into one float64 vector, so data-parallel ranks can sum them
    with one all-reduce.
    """

    def __init__(self, dims: dict):
        self.dims = dict(dims)
        self.count = {m: torch.zeros((), dtype=torch.float64) for m in self.dims}
        self.sum = {m: torch.zeros(d, dtype=torch.float64) for m, d in self.dims.items()}
        self.sum_sq = {m: torch.zeros(d, dtype=torch.float64) for m, d in self.dims.items()}

    def add(self, batch) -> None:
        for m in self.dims:
            x = batch.features[m]
            rows = x.detach().to("cpu", torch.float64)
            mask = batch.masks.get(m)
            if mask is not None:
                rows = rows[mask.to("cpu", torch.bool)]  # [real steps, ...]
            rows = rows.reshape(-1, self.dims[m])
            self.count[m] += rows.shape[0]
            self.sum[m] += rows.sum(0)
            self.sum_sq[m] += (rows * rows).sum(0)

    def flat(self) -> torch.Tensor:
        parts = []
        for m in self.dims:
            parts += [self.count[m].reshape(1), self.sum[m], self.sum_sq[m]]
        return torch.cat(parts)

    def from_flat(self, flat: torch.Tensor) -> "InputMoments":
        start = 0
        for m, d in self.dims.items():
            self.count[m] = flat[start].clone()
            self.sum[m] = flat[start + 1:start + 1 + d].clone()
            self.sum_sq[m] = flat[start + 1 + d:start + 1 + 2 * d].clone()
            start += 1 + 2 * d
        return self

    def mean_std(self, modality: str) -> tuple:
        """``(mean, std)`` per feature (float64), with the std floored at ``STD_FLOOR`` x the modality's mean std."""
        n = float(self.count[modality])
        if n < 2:
            raise SrcidError(f"input statistics: {modality} has {int(n)} real steps; at least 2 are needed")
        mean = self.sum[modality] / n
        var = (self.sum_sq[modality] / n - mean * mean).clamp_min(0.0)
        std = var.sqrt()
        floor = max(float(std.mean()) * STD_FLOOR, 1e-12)
        return mean, std.clamp_min(floor)


class InputNormalizer(Float32Buffers):
    """``(x - mean) / std`` per feature of each modality (the last dimension of its input).

    Buffers: ``mean_<m>`` and ``std_<m>`` (float32, ``[features]``) and
    ``fitted`` (0 or 1). Not fitted, it is the identity.
    """

    def __init__(self, dims: dict):
        super().__init__()
        self.dims = dict(dims)
        for m, d in self.dims.items():
            self.register_buffer(f"mean_{m}", torch.zeros(d))
            self.register_buffer(f"std_{m}", torch.ones(d))
        self.register_buffer("fitted", torch.zeros(()))
        self._fitted = False  # Python mirror of ``fitted``: no device sync per step

    @property
    def is_fitted(self) -> bool:
        return self._fitted

    @torch.no_grad()
    def set_moments(self, moments: InputMoments) -> None:
        for m in self.dims:
            mean, std = moments.mean_std(m)
            getattr(self, f"mean_{m}").copy_(mean.to(torch.float32))
            getattr(self, f"std_{m}").copy_(std.to(torch.float32))
        self.fitted.fill_(1.0)
        self._fitted = True

    def forward(self, modality: str, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x`` ``[B, T, ..., F]`` standardised per feature; steps where ``mask`` is False stay 0."""
        if not self._fitted:
            return x
        mean, std = getattr(self, f"mean_{modality}"), getattr(self, f"std_{modality}")
        out = ((x.float() - mean) / std).to(x.dtype)
        if mask is not None:
            out = out * mask.reshape(*mask.shape, *([1] * (x.dim() - 2))).to(out.dtype)
        return out

    def summary(self) -> dict:
        """Per modality: the mean of the feature means and stds, and the smallest and largest std."""
        out = {}
        for m in self.dims:
            mean, std = getattr(self, f"mean_{m}"), getattr(self, f"std_{m}")
            out[m] = {"mean": float(mean.mean()), "std": float(std.mean()), "std_min": float(std.min()),
                      "std_max": float(std.max())}
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # A model saved before the normaliser existed holds none of its buffers: it loads as the identity.
        own = [prefix + name for name in self._buffers]
        if not any(key in state_dict for key in own):
            self.fitted.fill_(0.0)
            self._fitted = False
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        self._fitted = bool(self.fitted.item() > 0.5)


def fit_moments(dims: dict, batches: Iterable, *, reduce=None) -> InputMoments:
    """:class:`InputMoments` of ``batches``; ``reduce(flat float64 tensor)`` sums them across ranks in place."""
    moments = InputMoments(dims)
    for batch in batches:
        moments.add(batch)
    if reduce is not None:
        flat = moments.flat()
        reduce(flat)
        moments.from_flat(flat)
    return moments
