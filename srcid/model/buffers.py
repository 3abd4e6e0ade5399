"""Buffers that stay float32 when their module is cast (``.half()``, ``.bfloat16()``, DeepSpeed's bf16)."""
from __future__ import annotations

import torch
from torch import nn


class Float32Buffers(nn.Module):
    """A module whose float32 buffers keep float32 under dtype casts; devices still move.

    Codebooks, their EMA statistics and the input moments lose digits in bf16
    that the method relies on (nearest-code ties, the EMA's small increments).
    """

    def _apply(self, fn, recurse=True):
        saved = {name: buf for name, buf in self._buffers.items() if buf is not None and buf.dtype == torch.float32}
        super()._apply(fn, recurse)
        for name, original in saved.items():
            moved = self._buffers[name]
            if moved.dtype != torch.float32:
                self._buffers[name] = original.to(device=moved.device)
        return self
