"""VQ with MMEMA: one codebook shared by all modalities, updated from cross-modally mixed vectors."""
from __future__ import annotations

import torch

from srcid.model.codebook import EMACodebook
from srcid.model.config import QuantizerConfig
from srcid.model.quantizers import (
    CodebookQuantizer, QuantizerOutput, distinct_codes, group_counts, mmema_commitment, mmema_mix, perplexity, straight_through,
)
from srcid.model.randomness import DEAD_CODE_STREAM, INIT_STREAM, StepCounter, generator


def stack_rows(z: dict, names: list) -> torch.Tensor:
    """``[M, N, D]``: each modality's ``[B, T, D]`` features as ``N = B*T`` rows, detached."""
    return torch.stack([z[m].detach().reshape(-1, z[m].shape[-1]) for m in names])


class MMEMAQuantizer(CodebookQuantizer):
    """Nearest-code VQ over a shared codebook with MMEMA updates and MMEMA-modified commitment.

    On the first training step the codebook is initialised from that step's
    features unless ``quantizer.init="uniform"``. Per training step: assign every row with the current codebook (ties to the
    lowest index); the output is straight-through; then EMA-update the codebook
    modality after modality (in ``modalities`` order) with the counts of that
    modality's assignments and the sums of the mixed vectors
    (:func:`~srcid.model.quantizers.mmema_mix`), and reset dead codes.
    """

    uses_cmcm = True

    def __init__(self, modalities, dim: int, config: QuantizerConfig, *, seed: int, stream: int = 0):
        super().__init__()
        self.modalities = tuple(modalities)
        self.book = EMACodebook(config.codebook_size, dim, config)
        self.steps = StepCounter()
        self.config, self.seed, self.stream = config, seed, stream

    @property
    def num_codes(self) -> int:
        return self.book.num_codes

    def _train_step(self, z: dict, names: list, pool: dict) -> QuantizerOutput:
        c = self.config
        rows = stack_rows(z, names)
        groups, n, dim = rows.shape
        candidates = rows.reshape(-1, dim) if pool is None else stack_rows(pool, names).reshape(-1, dim)
        if not self.book.is_initialized:
            self.book.init_from_rows(candidates, generator(self.seed, self.steps.value, INIT_STREAM, self.stream),
                                     groups=groups)
        codebook = self.book.codebook.clone()  # the codebook this step assigns with (the update below is in place)
        mixed = mmema_mix(rows, c.mmema_own)
        found = self.book.assign(rows.reshape(-1, dim), values=mixed.reshape(-1, dim), groups=groups, stats=True)
        counts, sums = found.counts.reshape(groups, -1), found.sums.reshape(groups, self.num_codes, dim)
        codes = torch.nn.functional.embedding(found.indices, codebook).view(groups, n, dim)
        counts, sums = self._reduce([counts, sums])
        gen = generator(self.seed, self.steps.value, DEAD_CODE_STREAM, self.stream, device=codebook.device)
        self.book.update(counts, sums, gen, pool=candidates)
        self.steps.advance()
        return self._output(z, names, codes, found.indices.view(groups, n), counts, codebook)

    def _lookup(self, z: dict, names: list) -> QuantizerOutput:
        codes, indices, counts = [], [], []
        for m in names:
            found = self.book.assign(z[m].detach().reshape(-1, z[m].shape[-1]))
            indices.append(found.indices)
            codes.append(self.book.lookup(found.indices))
            counts.append(group_counts(found.indices, 1, self.num_codes)[0])
        return self._output(z, names, codes, indices, torch.stack(counts), self.book.codebook)

    def _output(self, z, names, codes, indices, counts, codebook) -> QuantizerOutput:
        c = self.config
        q = {m: codes[i].view(z[m].shape) for i, m in enumerate(names)}
        return QuantizerOutput(
            quantized={m: straight_through(z[m], q[m]) for m in names},
            indices={m: indices[i].view(z[m].shape[:-1]) for i, m in enumerate(names)},
            loss=mmema_commitment(z, q, c.beta, c.commit_own, c.commit_cross),
            perplexity={m: perplexity(counts[i]) for i, m in enumerate(names)},
            codes_used=(counts.sum(0) > 0).float().mean(),
            codes={m: distinct_codes(counts[i]) for i, m in enumerate(names)},
            codebook=codebook,
        )
