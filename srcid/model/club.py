"""CLUB mutual-information upper bound: the q_theta networks, the MI loss, and their fitter.

``q_theta(y | x) = N(mu(x), exp(logvar(x)))``, one pair of MLPs per layer and
modality, with ``x`` the quantized general sequence and ``y`` the specific
output. The networks are fitted by their own Adam on detached inputs
(:class:`ClubFitter`); the MI loss of the main objective reads them with
detached parameters, so the main loss never updates q_theta.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from srcid import ops
from srcid.errors import SrcidError
from srcid.model.config import CLUB_ESTIMATORS, ClubConfig


def mlp(in_dim: int, hidden: int, hidden_layers: int, out_dim: int) -> nn.Sequential:
    layers, width = [], in_dim
    for _ in range(hidden_layers):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)


class ClubNet(nn.Module):
    """Mean MLP and log-variance MLP (ending in ``logvar_range * tanh``) of ``q_theta(y | x)``."""

    def __init__(self, x_dim: int, y_dim: int, hidden: int, hidden_layers: int, logvar_range: float = 1.0):
        super().__init__()
        self.logvar_range = float(logvar_range)
        self.mean = mlp(x_dim, hidden, hidden_layers, y_dim)
        self.logvar = nn.Sequential(mlp(x_dim, hidden, hidden_layers, y_dim), nn.Tanh())

    def forward(self, x: torch.Tensor):
        logvar = self.logvar(x)
        return self.mean(x), logvar if self.logvar_range == 1.0 else self.logvar_range * logvar


def time_major(t: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """``[B, T, D] -> [T, B, D]``: Eq. 6 pairs clip j with clip i at the same time step."""
    return t.to(dtype).transpose(0, 1).contiguous()


def club_mi(mu: torch.Tensor, logvar: torch.Tensor, y: torch.Tensor, *, estimator: str = "all_pairs",
            generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """CLUB estimate ``mean(positive - negative)`` from ``[..., N, D]`` tensors.

    ``all_pairs``: the negative of row i averages ``log q(y_j | x_i)`` over all
    ``j`` (paper Eq. 6). ``sampled``: one negative per row, ``y`` shuffled along
    ``N`` by one random permutation (the authors' CLUBSample).
    """
    terms = ops.club_loglik(mu, logvar, y)
    if estimator == "all_pairs":
        negative = terms.negative
    elif estimator == "sampled":
        perm = torch.randperm(y.shape[-2], generator=generator, device=y.device) if generator is not None \
            else torch.randperm(y.shape[-2], device=y.device)
        negative = ops.club_loglik(mu, logvar, y.index_select(-2, perm)).positive
    else:
        raise SrcidError(f"CLUB estimator {estimator!r}: choose one of {', '.join(CLUB_ESTIMATORS)}")
    return (terms.positive - negative).mean()


class MIEstimator(nn.Module):
    """The q_theta networks, one :class:`ClubNet` per key (``"L1_audio"``, ...).

    ``dims`` maps each key to ``(x_dim, y_dim)``. Inputs are ``[B, T, D]``.
    """

    def __init__(self, dims: dict, config: ClubConfig):
        super().__init__()
        self.config = config
        self.nets = nn.ModuleDict({key: ClubNet(x, y, config.hidden, config.hidden_layers, config.logvar_range)
                                   for key, (x, y) in dims.items()})

    def scaled(self, y: torch.Tensor) -> torch.Tensor:
        """``y`` ``[T, N, D]`` standardised per dimension over all rows with detached moments
        (``club.standardize_y``), else unchanged; the gradient still reaches ``y``."""
        if not self.config.standardize_y:
            return y
        rows = y.detach().reshape(-1, y.shape[-1])
        mean, std = rows.mean(0), rows.std(0, unbiased=False).clamp_min(1e-8)
        return (y - mean) / std

    def loglik(self, key: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean ``log q(y|x)`` (up to a constant) over clips and steps; gradient to the q_theta parameters."""
        net = self.nets[key]
        with torch.autocast(x.device.type, enabled=False):
            dtype = net.mean[0].weight.dtype
            x, y = time_major(x, dtype), self.scaled(time_major(y, dtype))
            mu, logvar = net(x)
            return ops.club_loglik(mu, logvar, y).loglik.mean()

    def mi(self, key: str, x: torch.Tensor, y: torch.Tensor, *, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The MI upper bound; gradient to ``x`` and ``y`` only (q_theta parameters are read detached)."""
        net = self.nets[key]
        frozen = {name: p.detach() for name, p in net.named_parameters()}
        with torch.autocast(x.device.type, enabled=False):
            dtype = net.mean[0].weight.dtype
            x, y = time_major(x, dtype), self.scaled(time_major(y, dtype))
            mu, logvar = torch.func.functional_call(net, frozen, (x,))
            return club_mi(mu, logvar, y, estimator=self.config.estimator, generator=generator)


class ClubFitter:
    """Owns an :class:`MIEstimator` and its Adam; fits q_theta for ``inner_steps`` steps per batch.

    Under data parallelism the pairs come from the global batch
    (:meth:`SrcidModel.club_pairs`), so every rank takes the same steps.
    """

    def __init__(self, estimator: MIEstimator, *, lr: Optional[float] = None, steps: Optional[int] = None):
        self.estimator = estimator
        self.steps = estimator.config.inner_steps if steps is None else steps
        self.optimizer = torch.optim.Adam(estimator.parameters(), lr=estimator.config.lr if lr is None else lr)

    def fit(self, pairs: dict) -> dict:
        """Maximise the log-likelihood of each ``key -> (x, y)`` (detached here); return the last step's values."""
        data = {key: (x.detach(), y.detach()) for key, (x, y) in pairs.items()}
        logliks = {}
        with torch.enable_grad():
            for _ in range(self.steps):
                self.optimizer.zero_grad(set_to_none=True)
                logliks = {key: self.estimator.loglik(key, x, y) for key, (x, y) in data.items()}
                (-torch.stack(list(logliks.values())).sum()).backward()
                self.optimizer.step()
        if not logliks:
            with torch.no_grad():
                logliks = {key: self.estimator.loglik(key, x, y) for key, (x, y) in data.items()}
        return {key: value.detach() for key, value in logliks.items()}

    def state_dict(self) -> dict:
        return {"estimator": self.estimator.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.estimator.load_state_dict(state["estimator"])
        self.optimizer.load_state_dict(state["optimizer"])


def build_mi_fitter(model, config: Optional[ClubConfig] = None) -> ClubFitter:
    """A :class:`ClubFitter` with one q_theta per layer and modality of ``model``, on the model's device."""
    config = config or model.config.club
    estimator = MIEstimator(model.club_dims(), config)
    device = next(model.parameters()).device
    return ClubFitter(estimator.to(device))
