"""Triton kernels behind :mod:`srcid.ops` (installed as ``srcid.kernels``).

Each module holds one operation's kernels, launcher and (for CLUB) autograd
function; ``docs/KERNELS.md`` describes the tiling and the costs. The
launchers only compute: :mod:`srcid.ops` checks the inputs (shapes, devices,
dtypes) before it calls them, and names their results. ``INTERPRETING`` says
whether the kernels were built for Triton's interpreter.
"""
from ._common import INTERPRETING
from .club import ClubLoglikFunction, club_loglik_fused
from .ema import ema_update_fused_
from .nearest_code import deterministic_stats, nearest_code_fused

__all__ = [
    "INTERPRETING",
    "ClubLoglikFunction",
    "club_loglik_fused",
    "deterministic_stats",
    "ema_update_fused_",
    "nearest_code_fused",
]
