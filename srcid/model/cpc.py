"""Cross-modal contrastive predictive coding (paper Eq. 7) on the general features."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from srcid.model.config import CPCConfig


class CrossModalCPC(nn.Module):
    """Per modality m, an LSTM summarises ``z^m_{<=t}`` into ``c^m_t`` and a Linear ``W^m_r``
    per step ``r`` predicts; ``score[i, j] = z^n_{t+r}[i] . W^m_r c^m_t[j]``.

    Loss = ``(1/R) sum_r sum_{m,n} w_mn * mean_i(-log_softmax_j(score)[i, i])``
    with ``w = cross_weight`` for ``m != n`` and ``self_weight`` for ``m == n``;
    the other clips of the batch are the negatives.
    """

    def __init__(self, modalities, dim: int, config: CPCConfig):
        super().__init__()
        self.modalities = tuple(modalities)
        self.config = config
        self.lstms = nn.ModuleDict({m: nn.LSTM(dim, config.context, config.lstm_layers, batch_first=True) for m in modalities})
        self.predictors = nn.ModuleDict({
            m: nn.ModuleList(nn.Linear(config.context, dim) for _ in range(config.horizon)) for m in modalities
        })

    def time_range(self, steps: int) -> tuple:
        """Inclusive range of valid context steps ``t`` for sequences of ``steps`` steps."""
        return self.config.min_start, steps - self.config.horizon - 1

    def forward(self, general: dict, t: int) -> torch.Tensor:
        c = self.config
        names = [m for m in self.modalities if m in general]
        predictions = {}
        for m in names:
            context, _ = self.lstms[m](general[m][:, : t + 1])
            predictions[m] = [pred(context[:, t]) for pred in self.predictors[m]]
        total = general[names[0]].new_zeros((), dtype=torch.float32)
        for r in range(c.horizon):
            for n in names:
                target = general[n][:, t + 1 + r]
                for m in names:
                    weight = c.cross_weight if m != n else c.self_weight
                    if weight == 0.0:
                        continue
                    scores = (target @ predictions[m][r].t()).float()
                    total = total + weight * -F.log_softmax(scores, dim=1).diagonal().mean()
        return total / c.horizon
