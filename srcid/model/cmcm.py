"""Cross-modal code matching (CMCM): matching soft code assignments across modalities."""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F


def soft_assignment(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """``softmax(-||z_t - e||)`` over codes per step, averaged over time: ``[B, T, D] -> [B, L]`` (float32).

    The gradient reaches ``z`` only; the codebook is a constant.
    """
    z = z.float()
    cb = codebook.detach().float()
    sq = (z * z).sum(-1, keepdim=True) - 2.0 * z @ cb.t() + (cb * cb).sum(-1)
    dist = torch.sqrt(sq.clamp_min(1e-12))
    return torch.softmax(-dist, dim=-1).mean(1)


def cmcm_pair(pa: torch.Tensor, pb: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Row-wise InfoNCE over the batch with ``S[i, j] = sum_k pa[i,k] log pb[j,k] + pb[i,k] log pa[j,k]``."""
    scores = pa @ torch.log(pb + eps).t() + pb @ torch.log(pa + eps).t()
    return -F.log_softmax(scores, dim=1).diagonal().mean()


def cmcm_loss(general: dict, codebook: torch.Tensor) -> torch.Tensor:
    """``0.5 * sum over modality pairs`` of :func:`cmcm_pair` on the soft assignments of ``general`` ``[B, T, D]``."""
    with torch.autocast(codebook.device.type, enabled=False):
        probs = {m: soft_assignment(z, codebook) for m, z in general.items()}
        total = codebook.new_zeros((), dtype=torch.float32)
        for a, b in itertools.combinations(probs, 2):
            total = total + cmcm_pair(probs[a], probs[b])
    return 0.5 * total
