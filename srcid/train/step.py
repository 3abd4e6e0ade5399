"""The loss of one training step, and its plain-PyTorch counterpart for tests.

Per step (paper and authors' code): the model's forward pass (the codebook
EMA update happens here), ``inner_steps`` CLUB fitting steps on detached
tensors, the total loss, backward, gradient clipping, optimizer step. The
trainer runs :func:`compute_loss` through its DeepSpeed engine, which does
backward, clipping and the Adam step with the run config's ``lr`` and
``grad_clip``. :func:`build_optimizer` and :func:`train_step` are the same
step in plain PyTorch, with the same defaults, for the model tests that need a
trained model without starting a process group.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from srcid.run import RunConfig


def build_optimizer(model: torch.nn.Module, lr: float = RunConfig.lr) -> torch.optim.Optimizer:
    """Adam over the model's parameters (encoders, decoders, CPC, text front end; never q_theta)."""
    return torch.optim.Adam(model.parameters(), lr=lr)


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


def train_step(model, mi_fitter, optimizer, batch, *, layer2_weight: float,
               grad_clip: float = RunConfig.grad_clip) -> dict:
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
