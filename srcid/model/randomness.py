"""Seeded random streams for the model's own draws.

Each draw (the CPC time step, dead-code resets, CLUB shuffles, codebook initialisation) uses a fresh
``torch.Generator`` seeded from ``(seed, step, stream)``. Every data-parallel
rank therefore draws the same numbers without communication, and a resumed run
draws what the uninterrupted run would have drawn.
"""
from __future__ import annotations

import numpy as np
import torch

# stream ids: one per kind of draw and layer
CPC_STREAM = 1
DEAD_CODE_STREAM = 2
CLUB_STREAM = 3
INIT_STREAM = 4


def derive_seed(seed: int, step: int, stream: int, index: int = 0) -> int:
    """A well-mixed 63-bit seed from the given integers."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step), int(stream), int(index)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def generator(seed: int, step: int, stream: int, index: int = 0, device="cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded from ``(seed, step, stream, index)``."""
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(derive_seed(seed, step, stream, index))
    return gen


class StepCounter(torch.nn.Module):
    """A step count kept both as a Python int (read without a device sync) and as a
    checkpointed int64 buffer; loading a state dict refreshes the Python value."""

    def __init__(self):
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))
        self.value = 0

    def advance(self) -> None:
        self.value += 1
        self.count.fill_(self.value)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        key = prefix + "count"
        if key in state_dict:
            self.value = int(state_dict[key])
