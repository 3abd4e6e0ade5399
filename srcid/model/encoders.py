"""Encoders: the text front end, the general (temporal) encoders and the specific encoders.

Shapes: ``B`` clips, ``T`` time steps, ``D`` the general size. Video grids are
``[B, T, H, W, C]`` (channels last, as stored in the shards).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
import torch.nn.functional as F

from srcid.model.config import ModelConfig


def reverse_within_length(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse the first ``lengths[b]`` steps of each sequence ``x[b]`` ``[B, T, F]``; later steps stay in place."""
    steps = torch.arange(x.shape[1], device=x.device)[None, :]
    lengths = lengths[:, None]
    index = torch.where(steps < lengths, lengths - 1 - steps, steps)
    return x.gather(1, index[:, :, None].expand(-1, -1, x.shape[2]))


class TextFrontEnd(nn.Module):
    """Bidirectional LSTM over word features, ``[B, T, Dt] -> [B, T, 2 * hidden]``.

    Each direction of each layer is its own single-layer LSTM so that the
    backward direction starts at each clip's last real word (as a packed
    sequence would) without moving lengths to the host. Padded steps output 0.
    """

    def __init__(self, in_dim: int, hidden: int, layers: int):
        super().__init__()
        self.out_dim = 2 * hidden
        dims = [in_dim] + [2 * hidden] * (layers - 1)
        self.forward_lstms = nn.ModuleList(nn.LSTM(d, hidden, batch_first=True) for d in dims)
        self.backward_lstms = nn.ModuleList(nn.LSTM(d, hidden, batch_first=True) for d in dims)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        lengths = mask.sum(1)
        keep = mask[:, :, None].to(x.dtype)
        out = x * keep
        for fwd, bwd in zip(self.forward_lstms, self.backward_lstms):
            ahead, _ = fwd(out)
            back, _ = bwd(reverse_within_length(out, lengths))
            out = torch.cat([ahead, reverse_within_length(back, lengths)], dim=-1) * keep.to(ahead.dtype)
        return out


class TemporalEncoder(nn.Module):
    """General encoder body: ``Linear(in -> D)`` then a post-norm Transformer encoder."""

    def __init__(self, in_dim: int, config: ModelConfig, *, dropout: Optional[float] = None):
        super().__init__()
        t = config.transformer
        self.proj = nn.Linear(in_dim, config.hidden)
        layer = nn.TransformerEncoderLayer(
            config.hidden, t.heads, dim_feedforward=t.ffn, dropout=t.dropout if dropout is None else dropout,
            activation="relu",
            batch_first=True, norm_first=False,
        )
        self.encoder = nn.TransformerEncoder(layer, t.layers, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        padding = None
        if mask is not None:
            padding = ~mask
            padding[:, 0] = False  # a clip without real steps still attends to its first step
        return self.encoder(self.proj(x), src_key_padding_mask=padding)


class VideoAttentionPool(nn.Module):
    """Pools each frame's grid ``[B, T, H, W, C] -> [B, T, C]``.

    Global average pool; squeeze-excite gate ``g`` applied as ``f * g + f``;
    spatial attention ``softmax_p(tanh(w . (relu(A f_p) * relu(B avg))))``;
    attention-weighted sum of the gated grid.
    """

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        squeezed = max(1, channels // reduction)
        half = max(1, channels // 2)
        self.gate = nn.Sequential(
            nn.Linear(channels, squeezed, bias=False), nn.ReLU(),
            nn.Linear(squeezed, channels, bias=False), nn.Sigmoid(),
        )
        self.query_avg = nn.Linear(channels, half)
        self.query_pos = nn.Linear(channels, half)
        self.score = nn.Linear(half, 1)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        b, t, h, w, c = grid.shape
        f = grid.reshape(b * t, h * w, c)
        avg = f.mean(1)
        gated = f * self.gate(avg)[:, None, :] + f
        query = F.relu(self.query_pos(gated)) * F.relu(self.query_avg(avg))[:, None, :]
        weights = torch.softmax(torch.tanh(self.score(query)), dim=1)  # [BT, HW, 1]
        return (weights * gated).sum(1).reshape(b, t, c)


class GeneralEncoder(nn.Module):
    """Phi: optional video pooling, then :class:`TemporalEncoder`; gives ``[B, T, D]``.

    ``dropout``: the Transformer's dropout (``None``: ``transformer.dropout``).
    """

    def __init__(self, in_shape: tuple, config: ModelConfig, *, dropout: Optional[float] = None):
        super().__init__()
        self.pool = VideoAttentionPool(in_shape[-1], config.video_se_reduction) if len(in_shape) == 3 else None
        self.temporal = TemporalEncoder(in_shape[-1], config, dropout=dropout)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.pool is not None:
            x = self.pool(x)
        return self.temporal(x, mask)


class VectorSpecificEncoder(nn.Module):
    """Psi for vector inputs: ``Linear + ReLU``. Returns ``(y, y)``: the vector is both CLUB's y and the decoder input."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor):
        y = F.relu(self.linear(x))
        return y, y


class ResidualLayer(nn.Module):
    """``x + conv1x1(relu(conv3x3(relu(x))))`` (convolutions without bias)."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, hidden, 3, padding=1, bias=False),
            nn.ReLU(), nn.Conv2d(hidden, channels, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class ResidualStack(nn.Module):
    """Residual layers followed by a ReLU."""

    def __init__(self, channels: int, layers: int = 1):
        super().__init__()
        self.layers = nn.Sequential(*(ResidualLayer(channels, channels) for _ in range(layers)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.layers(x))


class VideoSpecificEncoder(nn.Module):
    """Psi for video grids: 3x3 valid convs (H -> H-4), 1x1 conv, a residual block, then y.

    Returns ``(y, grid)``: ``grid`` ``[B, T, H-4, W-4, K]`` feeds the decoder;
    ``y`` ``[B, T, Dy]`` is CLUB's y and layer 2's input. ``specific="head"``
    (the authors' code): ``y`` = avg-pool, Linear, ReLU, Linear (``Dy = C``, the
    input channels), a head that only CLUB trains before layer 2 switches on.
    ``specific="map"`` (the paper's one specific output per modality): ``y`` =
    the average-pooled grid the decoder reads (``Dy = K``), so reconstruction
    trains it.
    """

    def __init__(self, channels: int, conv: int, specific: str = "head"):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(channels, conv // 2, 3), nn.ReLU(),
            nn.Conv2d(conv // 2, conv, 3), nn.ReLU(),
            nn.Conv2d(conv, conv, 1),
            ResidualStack(conv, 1),
        )
        if specific == "head":
            self.head = nn.Sequential(nn.Linear(conv, conv // 2), nn.ReLU(), nn.Linear(conv // 2, channels))
            self.out_dim = channels
        else:
            self.head = None
            self.out_dim = conv

    def forward(self, grid: torch.Tensor):
        b, t, h, w, c = grid.shape
        maps = self.convs(grid.reshape(b * t, h, w, c).permute(0, 3, 1, 2))  # [BT, K, h', w']
        pooled = maps.mean(dim=(2, 3))
        y = (pooled if self.head is None else self.head(pooled)).reshape(b, t, -1)
        maps = maps.permute(0, 2, 3, 1)
        return y, maps.reshape(b, t, *maps.shape[1:])
