"""The loss of one training step.

Per step (paper and authors' code): the model's forward pass (the codebook
EMA update happens here), ``inner_steps`` CLUB fitting steps on detached
tensors, the total loss, backward, gradient clipping, optimizer step. The
trainer runs :func:`compute_loss` through its DeepSpeed engine, which does
backward, clipping and the Adam step with the run config's ``lr`` and
``grad_clip``.
"""
from __future__ import annotations

from typing import Callable, Optional


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
