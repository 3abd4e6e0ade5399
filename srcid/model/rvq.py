"""RVQ-n: residual vector quantization with MMEMA per stage (a DCID baseline of the paper's Table I)."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from srcid.errors import SrcidError
from srcid.model.codebook import EMACodebook
from srcid.model.config import QuantizerConfig
from srcid.model.quantizers import (
    CodebookQuantizer, QuantizerOutput, distinct_codes, group_counts, mmema_commitment, mmema_mix, perplexity, straight_through,
)
from srcid.model.randomness import DEAD_CODE_STREAM, INIT_STREAM, StepCounter, generator
from srcid.model.vq import stack_rows


class ResidualMMEMAQuantizer(CodebookQuantizer):
    """``stages`` codebooks of their own, each quantizing the residual the previous stages left.

    Code 0 of every stage is fixed at zero (a stage may add nothing). Each
    stage is updated by MMEMA on the residuals it saw; the output is the sum of
    the stages' codes, straight-through, and the MMEMA-modified commitment is
    taken on that sum. Indices are ``[B, T, stages]``. One flat buffer holds the
    statistics of all stages for ``reduce_stats``.
    """

    uses_cmcm = False

    def __init__(self, modalities, dim: int, config: QuantizerConfig, *, stages: int, seed: int, stream: int = 0):
        super().__init__()
        if stages < 1:
            raise SrcidError(f"RVQ needs at least one stage, got {stages}")
        self.modalities = tuple(modalities)
        self.books = nn.ModuleList(EMACodebook(config.codebook_size, dim, config, zero_code=True) for _ in range(stages))
        self.steps = StepCounter()
        self.config, self.seed, self.stream = config, seed, stream

    @property
    def num_codes(self) -> int:
        return self.books[0].num_codes

    def _train_step(self, z: dict, names: list, pool: dict) -> QuantizerOutput:
        c = self.config
        residual = stack_rows(z, names)
        groups, n, dim = residual.shape
        separate_pool = pool is not None
        pool_residual = stack_rows(pool, names).reshape(-1, dim) if separate_pool else None
        total = torch.zeros_like(residual)
        indices, stats, candidates = [], [], []
        for s, book in enumerate(self.books):
            # a stage initialises from, and resets dead codes to, the residuals the earlier stages left
            cand = pool_residual if separate_pool else residual.reshape(-1, dim)
            if not book.is_initialized:
                book.init_from_rows(cand, generator(self.seed, self.steps.value, INIT_STREAM, self.stream * 1000 + s),
                                    groups=groups)
            candidates.append(cand)
            mixed = mmema_mix(residual, c.mmema_own)
            found = book.assign(residual.reshape(-1, dim), values=mixed.reshape(-1, dim), groups=groups, stats=True)
            code = F.embedding(found.indices, book.codebook).view(groups, n, dim)
            residual = residual - code
            total = total + code
            if separate_pool:
                pool_residual = pool_residual - book.lookup(book.assign(pool_residual).indices)
            indices.append(found.indices.view(groups, n))
            stats += [found.counts.reshape(groups, -1), found.sums.reshape(groups, self.num_codes, dim)]
        stats = self._reduce(stats)
        for s, book in enumerate(self.books):
            gen = generator(self.seed, self.steps.value, DEAD_CODE_STREAM, self.stream * 1000 + s, device=residual.device)
            book.update(stats[2 * s], stats[2 * s + 1], gen, pool=candidates[s])
        self.steps.advance()
        counts = torch.stack(stats[0::2], dim=1)  # [M, S, L]
        return self._output(z, names, total, torch.stack(indices, dim=-1), counts)

    def _lookup(self, z: dict, names: list) -> QuantizerOutput:
        totals, indices, counts = [], [], []
        for m in names:
            residual = z[m].detach().reshape(-1, z[m].shape[-1])
            total = torch.zeros_like(residual)
            idx, cnt = [], []
            for book in self.books:
                found = book.assign(residual)
                code = book.lookup(found.indices)
                residual, total = residual - code, total + code
                idx.append(found.indices)
                cnt.append(group_counts(found.indices, 1, self.num_codes)[0])
            totals.append(total)
            indices.append(torch.stack(idx, dim=-1))
            counts.append(torch.stack(cnt))
        return self._output(z, names, totals, indices, torch.stack(counts))

    def _output(self, z, names, totals, indices, counts) -> QuantizerOutput:
        c = self.config
        q = {m: totals[i].view(z[m].shape) for i, m in enumerate(names)}
        return QuantizerOutput(
            quantized={m: straight_through(z[m], q[m]) for m in names},
            indices={m: indices[i].view(*z[m].shape[:-1], len(self.books)) for i, m in enumerate(names)},
            loss=mmema_commitment(z, q, c.beta, c.commit_own, c.commit_cross),
            perplexity={m: perplexity(counts[i]).mean() for i, m in enumerate(names)},
            codes_used=(counts.sum(0) > 0).float().mean(),
            codes={m: distinct_codes(counts[i]).mean() for i, m in enumerate(names)},
            codebook=None,
        )
