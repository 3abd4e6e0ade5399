"""The single-process training step, in pieces a distributed engine can reuse.

Per step (paper and authors' code): the model's forward pass (the codebook
EMA update happens here), ``inner_steps`` CLUB fitting steps on detached
tensors, the total loss, backward, gradient clipping, optimizer step.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from srcid.errors import SrcidError


@dataclasses.dataclass
class StepConfig:
    """Optimizer settings of the main model (the CLUB nets have their own, in ``ModelConfig.club``)."""

    lr: float = 4e-4
    grad_clip: float = 0.5  # max global gradient norm; 0 disables clipping

    def validate(self) -> "StepConfig":
        if not self.lr > 0:
            raise SrcidError(f"step config lr={self.lr!r}: must be > 0")
        if self.grad_clip < 0:
            raise SrcidError(f"step config grad_clip={self.grad_clip!r}: must be >= 0 (0 disables clipping)")
        return self


def build_optimizer(model: torch.nn.Module, config: StepConfig | None = None) -> torch.optim.Optimizer:
    """Adam over the model's parameters (encoders, decoders, CPC, text front end; never q_theta)."""
    config = (config or StepConfig()).validate()
    return torch.optim.Adam(model.parameters(), lr=config.lr)


def compute_loss(model, mi_fitter, batch, layer2_weight: float, *, forward: Optional[Callable] = None) -> tuple:
    """Forward, CLUB fitting and the loss: ``(total, terms)`` (no backward).

    ``forward``: what runs the forward pass (default ``model``; a distributed
    engine wrapping ``model`` passes itself). Layer 2 is left out of the
    forward pass when ``layer2_weight == 0`` and the config's
    ``layer2_run_when_off`` is false. ``terms`` adds the fitted CLUB
    log-likelihoods as ``"L<k>/club_loglik/<modality>"``.
    """
    num_layers = None
    if layer2_weight == 0.0 and not model.config.layer2_run_when_off:
        num_layers = 1
    output = (forward or model)(batch, num_layers=num_layers)
    logliks = mi_fitter.fit(model.club_pairs(output))
    total, terms = model.loss(output, mi_fitter.estimator, layer2_weight=layer2_weight)
    for key, value in logliks.items():
        layer, modality = key.split("_", 1)
        terms[f"{layer}/club_loglik/{modality}"] = value
    return total, terms


def train_step(model, mi_fitter, optimizer, batch, *, layer2_weight: float, grad_clip: float = 0.5) -> dict:
    """One plain-PyTorch training step; returns the detached loss terms plus ``"grad_norm"``."""
    optimizer.zero_grad(set_to_none=True)
    total, terms = compute_loss(model, mi_fitter, batch, layer2_weight)
    total.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    if grad_clip > 0:
        terms["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        terms["grad_norm"] = torch.nn.utils.get_total_norm([p.grad for p in params])
    optimizer.step()
    return terms
