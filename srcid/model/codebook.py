"""One EMA codebook with dead-code resets (the storage behind VQ and each RVQ stage)."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from srcid import ops
from srcid.model.config import QuantizerConfig


class EMACodebook(nn.Module):
    """A codebook ``[L, D]`` held as float32 buffers (never parameters) and updated by EMA.

    Buffers: ``codebook``; the EMA statistics ``cluster_size [L]`` and
    ``embed_sum [L, D]``; ``unused_steps [L]`` (steps since each code was last
    chosen). Initialisation: uniform in ``+-1/L``, ``embed_sum`` = the codebook,
    ``cluster_size`` = 0. With ``zero_code`` code 0 is fixed at the zero vector.
    The buffers stay float32 when the module is cast (``.half()``, ``.bfloat16()``).
    """

    def __init__(self, num_codes: int, dim: int, config: QuantizerConfig, *, zero_code: bool = False):
        super().__init__()
        bound = 1.0 / num_codes
        codebook = torch.empty(num_codes, dim).uniform_(-bound, bound)
        if zero_code:
            codebook[0] = 0.0
        self.register_buffer("codebook", codebook)
        self.register_buffer("cluster_size", torch.zeros(num_codes))
        self.register_buffer("embed_sum", codebook.clone())
        self.register_buffer("unused_steps", torch.zeros(num_codes))
        self.num_codes, self.dim, self.zero_code = num_codes, dim, zero_code
        self.decay, self.eps = config.decay, config.eps
        self.dead_code_steps, self.active_window, self.noise = config.dead_code_steps, config.active_window, config.dead_code_noise

    def _apply(self, fn, recurse=True):
        saved = {name: buf for name, buf in self._buffers.items() if buf is not None and buf.dtype == torch.float32}
        super()._apply(fn, recurse)
        for name, original in saved.items():
            moved = self._buffers[name]
            if moved.dtype != torch.float32:
                self._buffers[name] = original.to(device=moved.device)
        return self

    def assign(self, x: torch.Tensor, *, values=None, groups: int = 1, stats: bool = False) -> ops.NearestCode:
        """Nearest code of each row of ``x`` ``[N, D]`` (float32), optionally with per-group statistics."""
        return ops.nearest_code(x, self.codebook, values=values, stats=stats, groups=groups)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        return F.embedding(indices, self.codebook)

    @torch.no_grad()
    def update(self, counts: torch.Tensor, sums: torch.Tensor, generator: torch.Generator) -> None:
        """EMA update from ``counts [G, L]`` and ``sums [G, L, D]`` (groups in MMEMA order), then dead-code resets."""
        ops.ema_update_(self.cluster_size, self.embed_sum, self.codebook, counts, sums, decay=self.decay, eps=self.eps)
        if self.zero_code:
            self.codebook[0] = 0.0
            self.embed_sum[0] = 0.0
        used = counts.reshape(-1, self.num_codes).sum(0) > 0
        self.reset_dead_codes(used, generator)

    @torch.no_grad()
    def reset_dead_codes(self, used: torch.Tensor, generator: torch.Generator) -> None:
        """Reset codes unused for more than ``dead_code_steps`` steps, with tensor ops only (no host sync).

        A dead code becomes a randomly chosen active code (used within the last
        ``active_window`` steps) plus uniform noise in ``+-dead_code_noise``.
        ``embed_sum`` is set to match, so the next EMA update keeps the new code.
        """
        num, device = self.num_codes, self.codebook.device
        unused = torch.where(used, torch.zeros_like(self.unused_steps), self.unused_steps + 1)
        dead = unused > self.dead_code_steps
        active = (unused < self.active_window) & ~dead
        if self.zero_code:
            dead[0] = False
            active[0] = False
        n_active = active.sum()
        draw = torch.rand(num, generator=generator, device=device)
        rank = (draw * n_active).long().clamp_max(n_active - 1).clamp_min(0)
        source = torch.searchsorted(torch.cumsum(active.long(), 0), rank + 1).clamp_max(num - 1)
        noise = (torch.rand(num, self.dim, generator=generator, device=device) * 2.0 - 1.0) * self.noise
        candidate = self.codebook[source] + noise
        reset = (dead & (n_active > 0))[:, None]
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + num * self.eps) * total
        self.codebook.copy_(torch.where(reset, candidate, self.codebook))
        self.embed_sum.copy_(torch.where(reset, candidate * smoothed[:, None], self.embed_sum))
        self.unused_steps.copy_(torch.where(reset[:, 0], torch.zeros_like(unused), unused))
