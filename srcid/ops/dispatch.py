"""Which implementation of the hot operations runs, and the checks the fused path adds.

``impl=None`` uses the process-wide choice: :func:`set_kernels` (the
``--kernels`` flag of every command), else the ``SRCID_KERNELS`` environment
variable, else ``auto`` (fused on CUDA tensors, reference otherwise).

The kernels in :mod:`srcid.kernels` only compute: each op's dispatch
(``srcid/ops/<op>.py``) checks its inputs, then calls its kernel. The checks
below are the ones every fused op adds to its own: one device that can run
the kernels, floating-point tensors.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from srcid.errors import SrcidError

IMPLS = ("auto", "fused", "reference")
_process_choice: Optional[str] = None


def set_kernels(impl: Optional[str]) -> None:
    """Set the process-wide implementation (``None`` returns to the environment's)."""
    global _process_choice
    if impl is not None and impl not in IMPLS:
        raise SrcidError(f"--kernels {impl!r}: choose one of {', '.join(IMPLS)}")
    _process_choice = impl


def current_kernels() -> str:
    choice = _process_choice or os.environ.get("SRCID_KERNELS", "auto") or "auto"
    if choice not in IMPLS:
        raise SrcidError(f"SRCID_KERNELS={choice!r}: choose one of {', '.join(IMPLS)}")
    return choice


def interpreter_active() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's interpreter (read per call, without importing Triton)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve(impl: Optional[str], device: torch.device) -> str:
    """Return ``"fused"`` or ``"reference"`` for a call on ``device``."""
    choice = impl if impl is not None else current_kernels()
    if choice not in IMPLS:
        raise SrcidError(f"impl {choice!r}: choose one of {', '.join(IMPLS)}")
    if choice == "auto":
        return "fused" if device.type == "cuda" else "reference"
    if choice == "fused" and device.type != "cuda" and not interpreter_active():
        raise SrcidError(
            f"fused kernels need a CUDA device (tensors are on {device.type}); "
            "use --kernels reference, or set TRITON_INTERPRET=1 before start-up to run them in Triton's interpreter"
        )
    return choice


def fused_kernels():
    """The :mod:`srcid.kernels` package. Looked up on every fused call, so that a replaced entry point (a test's
    spy) is the one that runs."""
    try:
        # Deliberately lazy: importing the kernels imports Triton, which is slow, and missing or broken where
        # only the reference runs.
        from srcid import kernels
    except ImportError as exc:  # triton missing or broken
        raise SrcidError(f"fused kernels are unavailable: {exc}") from None
    return kernels


def check_device(op: str, interpreting: bool, **tensors: torch.Tensor) -> torch.device:
    """All tensors on one device that can run the kernels; return that device. ``interpreting``: the kernels
    were built for Triton's interpreter (``srcid.kernels.INTERPRETING``, fixed when they were imported)."""
    devices = {name: t.device for name, t in tensors.items()}
    first_name, device = next(iter(devices.items()))
    for name, other in devices.items():
        if other != device:
            raise SrcidError(f"{op}: {name} is on {other} but {first_name} is on {device}")
    if device.type != "cuda" and not interpreting:
        raise SrcidError(
            f"{op}: fused kernels need a CUDA device (tensors are on {device.type}); "
            "set TRITON_INTERPRET=1 before start-up to run them in Triton's interpreter"
        )
    return device


def check_floating(op: str, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise SrcidError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
