"""Decoders: rebuild a layer's input from its quantized general and specific results."""
from __future__ import annotations

import torch
from torch import nn

from srcid.model.encoders import ResidualStack


class VectorDecoder(nn.Module):
    """``Linear(cat(Linear(q), s))``: ``q [B, T, D]``, ``s [B, T, S]`` -> ``[B, T, out]``."""

    def __init__(self, code_dim: int, specific_dim: int, out_dim: int):
        super().__init__()
        self.code = nn.Linear(code_dim, specific_dim)
        self.out = nn.Linear(2 * specific_dim, out_dim)

    def forward(self, quantized: torch.Tensor, specific: torch.Tensor) -> torch.Tensor:
        code = self.code(quantized.to(self.code.weight.dtype))
        return self.out(torch.cat([code, specific.to(code.dtype)], dim=-1))


class VideoDecoder(nn.Module):
    """Transposed 3x3 convs from ``cat(Linear(q) broadcast, grid)`` back to ``[B, T, H, W, C]``."""

    def __init__(self, code_dim: int, conv: int, channels: int):
        super().__init__()
        self.code = nn.Linear(code_dim, code_dim)
        self.deconvs = nn.Sequential(
            nn.ConvTranspose2d(conv + code_dim, conv // 2, 3),
            ResidualStack(conv // 2, 1),
            nn.ConvTranspose2d(conv // 2, channels, 3), nn.ReLU(),
            nn.ConvTranspose2d(channels, channels, 1),
        )

    def forward(self, quantized: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        b, t, h, w, k = grid.shape
        code = self.code(quantized.to(self.code.weight.dtype))
        code = code[:, :, None, None, :].expand(b, t, h, w, code.shape[-1])
        x = torch.cat([code, grid.to(code.dtype)], dim=-1).reshape(b * t, h, w, -1).permute(0, 3, 1, 2)
        out = self.deconvs(x).permute(0, 2, 3, 1)
        return out.reshape(b, t, *out.shape[1:])
