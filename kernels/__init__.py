"""Triton kernels behind :mod:`srcid.ops` (installed as ``srcid.kernels``).

Each module holds one operation's kernels, launcher and (for CLUB) autograd
function; ``docs/KERNELS.md`` describes the tiling and the costs.
"""
from .club import ClubLoglikFunction, club_loglik_fused
from .ema import ema_update_fused_
from .nearest_code import deterministic_stats, nearest_code_fused

__all__ = [
    "ClubLoglikFunction",
    "club_loglik_fused",
    "deterministic_stats",
    "ema_update_fused_",
    "nearest_code_fused",
]
