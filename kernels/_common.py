"""Helpers shared by the kernel modules: tuning configs and input checks."""
from __future__ import annotations

import triton
import torch

from srcid.errors import SrcidError
from srcid.ops import interpreter_active

# Read once at import: Triton's interpreter is chosen when triton is imported.
INTERPRETING = interpreter_active()


def tuning_configs(gpu_configs, interpreter_config):
    """The autotuning space on a GPU; one small config under the interpreter.

    Each config is a dict of block sizes plus optional ``num_warps`` and
    ``num_stages``.
    """
    chosen = [interpreter_config] if INTERPRETING else gpu_configs
    configs = []
    for entry in chosen:
        entry = dict(entry)
        num_warps = entry.pop("num_warps", 4)
        num_stages = entry.pop("num_stages", 2)
        configs.append(triton.Config(entry, num_warps=num_warps, num_stages=num_stages))
    return configs


def check_device(op: str, **tensors: torch.Tensor) -> torch.device:
    """All tensors on one device that can run Triton; return that device."""
    devices = {name: t.device for name, t in tensors.items()}
    first_name, device = next(iter(devices.items()))
    for name, other in devices.items():
        if other != device:
            raise SrcidError(f"{op}: {name} is on {other} but {first_name} is on {device}")
    if device.type != "cuda" and not INTERPRETING:
        raise SrcidError(
            f"{op}: fused kernels need a CUDA device (tensors are on {device.type}); "
            "set TRITON_INTERPRET=1 before start-up to run them in Triton's interpreter"
        )
    return device


def check_floating(op: str, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise SrcidError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
