"""Model inputs: the per-modality shapes a model is built for, and checks of what it is fed.

Shapes come from the dataset manifest (``Manifest.modalities[m].shape``): per
clip ``[T, D]`` (audio, text, flat video) or ``[T, H, W, C]`` (video grids);
only text may have a variable first dimension (``None``), and is cut or
zero-padded to the model's ``T``. Every problem is a one-line
:class:`SrcidError` naming the modality and the expected and actual shapes.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from srcid.errors import SrcidError

MODALITY_ORDER = ("audio", "video", "text")  # also the MMEMA update order


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """The per-clip shape of one modality's features, as the manifest declares it."""

    modality: str
    shape: tuple

    @property
    def feature_shape(self) -> tuple:
        return tuple(self.shape[1:])

    @property
    def is_grid(self) -> bool:
        return len(self.shape) == 4

    def describe(self) -> str:
        return "[B, " + ", ".join("S" if s is None else str(s) for s in self.shape) + "]"


def parse_input_shapes(input_shapes: dict) -> tuple:
    """Validate ``{modality: shape}`` and return ``(specs in MMEMA order, T)``."""
    unknown = sorted(set(input_shapes) - set(MODALITY_ORDER))
    if unknown:
        raise SrcidError(f"input shapes: unknown modality {', '.join(unknown)}; valid: {', '.join(MODALITY_ORDER)}")
    specs = {}
    for m in MODALITY_ORDER:
        if m not in input_shapes:
            continue
        shape = tuple(None if s is None else int(s) for s in input_shapes[m])
        if len(shape) not in (2, 4) or any(s is not None and s < 1 for s in shape) or any(s is None for s in shape[1:]):
            raise SrcidError(f"{m} input shape {list(shape)}: expected [T, D] or [T, H, W, C] with positive sizes")
        if shape[0] is None and m != "text":
            raise SrcidError(f"{m} input shape {list(shape)}: only text may have a variable number of steps")
        if m == "text" and len(shape) != 2:
            raise SrcidError(f"text input shape {list(shape)}: expected [S, D]")
        if len(shape) == 4 and (shape[1] < 5 or shape[2] < 5):
            raise SrcidError(f"{m} input shape {list(shape)}: the video conv stack needs H and W of at least 5")
        specs[m] = InputSpec(m, shape)
    if len(specs) < 2:
        raise SrcidError(f"input shapes: a cross-modal model needs at least two modalities, got {', '.join(specs) or 'none'}")
    steps = {s.shape[0] for s in specs.values() if s.shape[0] is not None}
    if len(steps) > 1:
        detail = ", ".join(f"{m} {s.shape[0]}" for m, s in specs.items() if s.shape[0] is not None)
        raise SrcidError(f"input shapes: modalities disagree on the number of time steps ({detail})")
    if not steps:
        raise SrcidError("input shapes: at least one modality needs a fixed number of time steps")
    return specs, steps.pop()


def check_features(x: torch.Tensor, spec: InputSpec) -> None:
    """Shape and dtype check of one modality's ``[B, ...]`` features (Python comparisons only)."""
    if not isinstance(x, torch.Tensor):
        raise SrcidError(f"{spec.modality} features: expected a tensor of shape {spec.describe()}, got {type(x).__name__}")
    ok = x.dim() == len(spec.shape) + 1 and all(e is None or e == s for e, s in zip(spec.shape, x.shape[1:]))
    if not ok:
        raise SrcidError(f"{spec.modality} features: expected shape {spec.describe()}, got {list(x.shape)}")
    if not x.is_floating_point():
        raise SrcidError(f"{spec.modality} features: expected floating-point values, got {x.dtype}")


def check_batch(batch, specs: dict, *, check_finite: bool, variant: str) -> None:
    """Check that ``batch`` carries every modality of ``specs`` with the right shapes (and finite values)."""
    missing = [m for m in specs if m not in batch.features]
    if missing:
        raise SrcidError(
            f"batch lacks {', '.join(missing)} features: the {variant} model needs {', '.join(specs)} "
            f"(batch has {', '.join(batch.features) or 'none'})"
        )
    sizes = {}
    for m, spec in specs.items():
        x = batch.features[m]
        check_features(x, spec)
        sizes[m] = x.shape[0]
        mask = batch.masks.get(m)
        if mask is not None and tuple(mask.shape) != tuple(x.shape[:2]):
            raise SrcidError(f"{m} mask: expected shape {list(x.shape[:2])} (clips x steps), got {list(mask.shape)}")
    if len(set(sizes.values())) > 1:
        raise SrcidError("batch modalities hold different numbers of clips: " + ", ".join(f"{m} {n}" for m, n in sizes.items()))
    if check_finite:
        names = list(specs)
        finite = torch.stack([torch.isfinite(batch.features[m]).all() for m in names]).tolist()  # the one host sync
        for m, ok in zip(names, finite):
            if not ok:
                raise SrcidError(f"{m} features contain NaN or Inf (clip {_first_bad_clip(batch, m)})")


def _first_bad_clip(batch, modality: str) -> str:
    x = batch.features[modality]
    bad = (~torch.isfinite(x.reshape(x.shape[0], -1)).all(1)).nonzero()
    index = int(bad[0, 0]) if bad.numel() else 0
    return str(batch.keys[index]) if index < len(batch.keys) else f"#{index}"


def fit_steps(x: torch.Tensor, mask: Optional[torch.Tensor], steps: int) -> tuple:
    """Cut or zero-pad ``x`` ``[B, S, D]`` (and its mask, default all True) to ``steps`` steps."""
    if mask is None:
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    mask = mask.to(torch.bool)
    s = x.shape[1]
    if s >= steps:
        return x[:, :steps], mask[:, :steps]
    pad = steps - s
    x = torch.cat([x, x.new_zeros(x.shape[0], pad, *x.shape[2:])], dim=1)
    mask = torch.cat([mask, mask.new_zeros(mask.shape[0], pad)], dim=1)
    return x, mask
