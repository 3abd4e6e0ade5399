"""One EMA codebook with dead-code resets (the storage behind VQ and each RVQ stage)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from srcid import ops
from srcid.model.buffers import Float32Buffers
from srcid.model.config import QuantizerConfig


class EMACodebook(Float32Buffers):
    """A codebook ``[L, D]`` held as float32 buffers (never parameters) and updated by EMA.

    Buffers: ``codebook``; the EMA statistics ``cluster_size [L]`` and
    ``embed_sum [L, D]``; ``unused_steps [L]`` (steps since each code was last
    chosen); ``initialized`` (0 until a data initialisation ran). Construction
    draws uniform codes in ``+-1/L`` with ``embed_sum`` = the codebook and
    ``cluster_size`` = 0 (the authors' initialisation, kept with
    ``init="uniform"``); with ``init="kmeans"`` or ``"sample"`` the quantizer
    calls :meth:`init_from_rows` on its first training step. With
    ``zero_code`` code 0 is fixed at the zero vector. The buffers stay float32
    when the module is cast (``.half()``, ``.bfloat16()``).
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
        needs_data = config.init != "uniform"
        self.register_buffer("initialized", torch.tensor(0.0 if needs_data else 1.0))
        self._initialized = not needs_data  # Python mirror of ``initialized``: no device sync per step
        self.num_codes, self.dim, self.zero_code = num_codes, dim, zero_code
        self.decay, self.eps = config.decay, config.eps
        self.init_rule, self.kmeans_iters = config.init, config.kmeans_iters
        self.dead_rule, self.dead_threshold, self.dead_source = config.dead_code, config.dead_code_threshold, config.dead_code_source
        self.dead_code_steps, self.active_window, self.noise = config.dead_code_steps, config.active_window, config.dead_code_noise

    @property
    def is_initialized(self) -> bool:
        return self._initialized

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key = prefix + "initialized"
        if key not in state_dict and prefix + "codebook" in state_dict:
            state_dict = {**state_dict, key: torch.tensor(1.0)}  # saved before data initialisation existed: trained
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        self._initialized = bool(self.initialized.item() > 0.5)

    @torch.no_grad()
    def init_from_rows(self, rows: torch.Tensor, generator: torch.Generator, *, groups: int = 1) -> None:
        """Initialise the codebook from data rows ``[N, D]`` (every modality and rank of one step).

        ``kmeans``: :func:`kmeans` with ``kmeans_iters`` Lloyd iterations;
        ``sample``: the same without iterations (``L`` distinct rows).
        ``cluster_size`` starts at each code's share of the rows per modality
        (``groups``), as if the EMA had seen this assignment all along.
        """
        centroids, counts = kmeans(rows.float(), self.num_codes, self.kmeans_iters if self.init_rule == "kmeans" else 0,
                                   generator)
        if self.zero_code:
            centroids[0] = 0.0
        cluster_size = counts / groups
        self.codebook.copy_(centroids)
        self.cluster_size.copy_(cluster_size)
        self.embed_sum.copy_(centroids * _laplace(cluster_size, self.eps)[:, None])
        self.unused_steps.zero_()
        self.initialized.fill_(1.0)
        self._initialized = True

    def assign(self, x: torch.Tensor, *, values=None, groups: int = 1, stats: bool = False) -> ops.NearestCode:
        """Nearest code of each row of ``x`` ``[N, D]`` (float32), optionally with per-group statistics."""
        return ops.nearest_code(x, self.codebook, values=values, stats=stats, groups=groups)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        return F.embedding(indices, self.codebook)

    @torch.no_grad()
    def update(self, counts: torch.Tensor, sums: torch.Tensor, generator: torch.Generator,
               pool: Optional[torch.Tensor] = None) -> None:
        """EMA update from ``counts [G, L]`` and ``sums [G, L, D]`` (groups in MMEMA order), then dead-code resets.

        ``pool`` ``[P, D]``: the step's general features (every rank's, so the
        same on every rank), which ``dead_code_source="batch"`` and ``"far"`` draw from.
        """
        ops.ema_update_(self.cluster_size, self.embed_sum, self.codebook, counts, sums, decay=self.decay, eps=self.eps)
        if self.zero_code:
            self.codebook[0] = 0.0
            self.embed_sum[0] = 0.0
        used = counts.reshape(-1, self.num_codes).sum(0) > 0
        self.reset_dead_codes(used, generator, pool)

    @torch.no_grad()
    def reset_dead_codes(self, used: torch.Tensor, generator: torch.Generator, pool: Optional[torch.Tensor] = None) -> None:
        """Reset dead codes, with tensor ops only (no host sync).

        Dead (``dead_code``): ``"steps"``, unused for more than
        ``dead_code_steps`` steps; ``"ema"``, an EMA cluster size below
        ``dead_code_threshold`` times the mean cluster size. A dead code
        becomes (``dead_code_source``) a row of ``pool``, drawn uniformly
        (``"batch"``) or with probability proportional to the row's squared
        distance from its nearest code (``"far"``, k-means++ seeding: new codes
        go where the codebook serves the features worst); its cluster size
        restarts at the mean, so it has time to be chosen. Or a
        random active code (used within the last ``active_window`` steps) plus
        uniform noise in ``+-dead_code_noise`` (``"active_code"``). ``embed_sum``
        is set to match, so the next EMA update keeps the new code.
        """
        num, device = self.num_codes, self.codebook.device
        unused = torch.where(used, torch.zeros_like(self.unused_steps), self.unused_steps + 1)
        if self.dead_rule == "steps":
            dead = unused > self.dead_code_steps
        else:
            dead = self.cluster_size < self.dead_threshold * self.cluster_size.mean()
        if self.zero_code:
            dead[0] = False
        cluster_size = self.cluster_size
        if self.dead_source in ("batch", "far") and pool is not None and pool.shape[0] > 0:
            rows = pool.float()
            candidate = rows[self._pick_rows(rows, dead, generator)]
            reset = dead[:, None]
            cluster_size = torch.where(dead, self.cluster_size.mean().expand(num), self.cluster_size)
        else:
            active = (unused < self.active_window) & ~dead
            if self.zero_code:
                active[0] = False
            n_active = active.sum()
            draw = torch.rand(num, generator=generator, device=device)
            rank = (draw * n_active).long().clamp_max(n_active - 1).clamp_min(0)
            source = torch.searchsorted(torch.cumsum(active.long(), 0), rank + 1).clamp_max(num - 1)
            noise = (torch.rand(num, self.dim, generator=generator, device=device) * 2.0 - 1.0) * self.noise
            candidate = self.codebook[source] + noise
            reset = (dead & (n_active > 0))[:, None]
        total = self.cluster_size.sum()
        smoothed = (cluster_size + self.eps) / (total + num * self.eps) * total
        self.codebook.copy_(torch.where(reset, candidate, self.codebook))
        self.embed_sum.copy_(torch.where(reset, candidate * smoothed[:, None], self.embed_sum))
        self.cluster_size.copy_(cluster_size)
        self.unused_steps.copy_(torch.where(reset[:, 0], torch.zeros_like(unused), unused))

    def _pick_rows(self, rows: torch.Tensor, dead: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``[L]`` indices into ``rows [P, D]``: the candidate of each code (used where it is dead); no host sync."""
        num, count = self.num_codes, rows.shape[0]
        if self.dead_source == "batch":
            return torch.randint(0, count, (num,), generator=generator, device=rows.device)
        sq_dist = ops.nearest_code(rows, self.codebook).sq_dist.clamp_min(0.0)
        weights = sq_dist + sq_dist.mean() * 1e-6 + 1e-12  # every row stays possible (all on a code: uniform)
        if count < num:  # fewer rows than codes: with replacement, by inverse CDF
            cdf = torch.cumsum(weights, 0)
            u = torch.rand(num, generator=generator, device=rows.device) * cdf[-1]
            return torch.searchsorted(cdf, u).clamp_max(count - 1)
        # Distinct rows, in the order of sequential weighted sampling without replacement (the smallest E / w
        # with E ~ Exp(1); torch.multinomial would check its input on the host). The i-th dead code takes the
        # i-th draw, so the rows most likely drawn first (the farthest) go to dead codes, not to live ones' slots.
        keys = -torch.log(torch.rand(count, generator=generator, device=rows.device)) / weights
        draws = torch.topk(keys, num, largest=False, sorted=True).indices
        return draws[(torch.cumsum(dead.long(), 0) - 1).clamp_min(0)]


def _laplace(cluster_size: torch.Tensor, eps: float) -> torch.Tensor:
    """Laplace-smoothed cluster sizes ``n (c + eps) / (n + L eps)``, ``n = sum(c)`` (as in the EMA update)."""
    n = cluster_size.sum()
    return (cluster_size + eps) / (n + cluster_size.shape[0] * eps) * n


@torch.no_grad()
def kmeans(rows: torch.Tensor, num_codes: int, iters: int, generator: torch.Generator) -> tuple:
    """``(centroids [L, D], counts [L])``: Lloyd's k-means on ``rows [N, D]`` from ``L`` seeded distinct rows.

    With fewer rows than codes, rows are drawn with replacement (duplicates
    split on the next EMA updates or become dead codes). An empty cluster
    keeps its centroid. ``counts`` are the rows assigned to each centroid by
    the last assignment. The draws use ``generator`` only, so every rank
    given the same rows computes the same centroids.
    """
    n = rows.shape[0]
    if n >= num_codes:
        pick = torch.randperm(n, generator=generator)[:num_codes]
    else:
        pick = torch.randint(0, n, (num_codes,), generator=generator)
    centroids = rows[pick.to(rows.device)].clone()
    found = ops.nearest_code(rows, centroids, stats=True)
    for _ in range(iters):
        counts, sums = found.counts, found.sums
        centroids = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1.0)[:, None], centroids)
        found = ops.nearest_code(rows, centroids, stats=True)
    return centroids, found.counts
