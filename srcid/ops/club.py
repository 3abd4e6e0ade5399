"""CLUB log-likelihood terms with exact all-pairs negatives: the result type, the input checks, the PyTorch
reference and the dispatch to the fused kernels (``kernels/club.py``, :mod:`srcid.kernels.club`)."""
from __future__ import annotations

from typing import NamedTuple

import torch

from srcid.errors import SrcidError

from .dispatch import check_device, check_floating, fused_kernels, resolve

OP = "club_loglik"


class ClubLoglik(NamedTuple):
    positive: torch.Tensor  # [..., N]
    negative: torch.Tensor  # [..., N]
    loglik: torch.Tensor  # [..., N]


def _check_inputs(mu, logvar, y):
    if not (mu.shape == logvar.shape == y.shape) or mu.dim() < 2:
        raise SrcidError(
            f"{OP}: mu {tuple(mu.shape)}, logvar {tuple(logvar.shape)} and y {tuple(y.shape)} "
            "must share one shape [..., N, D]"
        )


def _check_fused_inputs(mu, logvar, y, interpreting: bool):
    """What the kernels need beyond :func:`_check_inputs`: one device, floating point."""
    check_device(OP, interpreting, mu=mu, logvar=logvar, y=y)
    check_floating(OP, mu=mu, logvar=logvar, y=y)


def club_loglik_reference(mu, logvar, y) -> ClubLoglik:
    """CLUB log-likelihood terms in plain PyTorch, O(N*D) per batch.

    ``negative[i]`` averages over all j of the batch dimension N (dim -2)
    through the moment identity
    ``mean_j (y_j - mu_i)^2 = mean(y^2) - 2 mu_i mean(y) + mu_i^2 = var(y) + (mean(y) - mu_i)^2``.
    """
    _check_inputs(mu, logvar, y)
    inv_var = torch.exp(-logvar)
    positive = -0.5 * ((y - mu) ** 2 * inv_var).sum(-1)
    # Centred form of the same identity, mean_j (y_j - mu_i)^2 = var(y) + (mean(y) - mu_i)^2,
    # which does not cancel catastrophically when y and mu share a large offset.
    mean_y = y.mean(dim=-2, keepdim=True)
    var_y = ((y - mean_y) ** 2).mean(dim=-2, keepdim=True)
    negative = -0.5 * ((var_y + (mean_y - mu) ** 2) * inv_var).sum(-1)
    loglik = positive - 0.5 * logvar.sum(-1)
    return ClubLoglik(positive, negative, loglik)


def club_loglik(mu, logvar, y, *, impl=None) -> ClubLoglik:
    """CLUB terms for Gaussian ``q(y|x) = N(mu, exp(logvar))``, shapes ``[..., N, D]``.

    ``positive[i] = sum_d -(y_i - mu_i)^2 / (2 exp(logvar_i))``;
    ``negative[i] = mean_j sum_d -(y_j - mu_i)^2 / (2 exp(logvar_i))`` (all pairs, exact);
    ``loglik[i] = positive[i] - 0.5 sum_d logvar_i``. Differentiable in all inputs.
    """
    if resolve(impl, mu.device) == "reference":
        return club_loglik_reference(mu, logvar, y)
    _check_inputs(mu, logvar, y)
    kernels = fused_kernels()
    _check_fused_inputs(mu, logvar, y, kernels.INTERPRETING)
    return ClubLoglik(*kernels.club_loglik_fused(mu, logvar, y))
