"""The training objective (paper Eq. 8) per layer: reconstruction, commitment, CPC, CMCM and CLUB MI."""
from __future__ import annotations

from typing import Optional

import torch

from srcid.model.cmcm import cmcm_loss
from srcid.model.randomness import CLUB_STREAM, generator


def reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None,
                        gather=None) -> torch.Tensor:
    """MSE over all elements; with ``mask [B, T]`` only real steps count.

    Under data parallelism (``gather`` concatenates the batch over ranks) the
    masked mean is normalised by the global count of real steps, so the
    average over ranks equals the masked mean over the global batch.
    """
    sq = (reconstruction.float() - target.float()) ** 2
    if mask is None:
        return sq.mean()
    weight = mask.to(sq.dtype)
    count = weight.sum()
    if gather is not None:
        everyone = gather(weight.detach())
        count = everyone.sum() * (weight.shape[0] / everyone.shape[0])
    weight = weight.reshape(*mask.shape, *([1] * (sq.dim() - 2)))
    per_step = sq[0, 0].numel()
    return (sq * weight).sum() / (count * per_step).clamp_min(1.0)


@torch.no_grad()
def spread(x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Std over the (clip, step) rows of ``x`` ``[B, T, ...]``, averaged over its features (real steps only)."""
    rows = x.detach().float().reshape(x.shape[0] * x.shape[1], -1)
    if mask is not None:
        weight = mask.reshape(-1, 1).to(rows.dtype)
        count = weight.sum().clamp_min(1.0)
        mean = (rows * weight).sum(0) / count
        var = (((rows - mean) ** 2) * weight).sum(0) / count
    else:
        var = rows.var(0, unbiased=False)
    return var.sqrt().mean()


def layer_loss(model, out, layer_index: int, mi_estimator, step: int, layer_scale: float = 1.0) -> tuple:
    """``(loss, terms)`` of one layer (1-based ``layer_index``); terms are detached scalars.

    ``layer_scale`` multiplies the CPC and MI contributions (the paper's 1/K of Eq. 6 and 7).
    """
    config = model.config
    w = config.weights
    layer = model.layers[layer_index - 1]
    prefix = f"L{layer_index}"
    terms = {}
    total = torch.zeros((), device=out.codes_used.device)
    for m in layer.modalities:
        recon = reconstruction_loss(out.reconstructions[m], out.targets[m], out.masks.get(m), gather=model.batch_gather)
        terms[f"{prefix}/recon/{m}"] = recon
        total = total + w.recon * recon
    commit = torch.stack(list(out.commitment.values())).sum()
    terms[f"{prefix}/commit"] = commit
    terms[f"{prefix}/cpc"] = out.cpc
    total = total + w.commit * commit + layer_scale * w.cpc * out.cpc
    if layer.quantizer.uses_cmcm and out.codebook is not None:
        cmcm = cmcm_loss({m: model.gather(z) for m, z in out.general.items()}, out.codebook)
        terms[f"{prefix}/cmcm"] = cmcm
        total = total + w.cmcm * cmcm
    mi_total = torch.zeros((), device=total.device)
    for i, m in enumerate(layer.modalities):
        gen = None
        if mi_estimator.config.estimator == "sampled":
            gen = generator(config.seed, step, CLUB_STREAM, 10 * layer_index + i, device=out.quantized[m].device)
        mi = mi_estimator.mi(club_key(layer_index, m), model.gather(out.quantized[m]), model.gather(out.specific[m]), generator=gen)
        terms[f"{prefix}/mi/{m}"] = mi
        mi_total = mi_total + mi
    terms[f"{prefix}/mi"] = mi_total
    total = total + layer_scale * w.mi * getattr(w, f"mi_layer{layer_index}") * mi_total
    for m in layer.modalities:
        terms[f"{prefix}/perplexity/{m}"] = out.perplexity[m]
        terms[f"{prefix}/codes/{m}"] = out.codes[m]
        terms[f"{prefix}/y_std/{m}"] = spread(out.specific[m], out.masks.get(m))
        terms[f"{prefix}/target_std/{m}"] = spread(out.targets[m], out.masks.get(m))
    terms[f"{prefix}/codes_used"] = out.codes_used
    terms[f"{prefix}/loss"] = total
    return total, {k: v.detach() for k, v in terms.items()}


def model_loss(model, output, mi_estimator, *, layer2_weight: float) -> tuple:
    """``(total, terms)``: layer 1's loss plus ``layer2_weight`` times layer 2's.

    With ``layer2_weight == 0`` layer 2's terms are still reported (computed
    without gradient) but left out of the total, as in the authors' code.
    With ``weights.average_layers`` (the paper's Eq. 6 and 7) the CPC and MI
    terms are averaged over the layers in the objective (1/K, K = 2 once
    layer 2 is on); otherwise summed (the authors' code).
    """
    both_on = len(output.layers) > 1 and layer2_weight != 0.0
    scale = 0.5 if both_on and model.config.weights.average_layers else 1.0
    total, terms = layer_loss(model, output.layers[0], 1, mi_estimator, output.step, scale)
    if len(output.layers) > 1:
        if layer2_weight != 0.0:
            second, more = layer_loss(model, output.layers[1], 2, mi_estimator, output.step, scale)
            total = total + layer2_weight * second
        else:
            with torch.no_grad():
                _, more = layer_loss(model, output.layers[1], 2, mi_estimator, output.step)
        terms.update(more)
    terms["loss"] = total.detach()
    return total, terms


def club_key(layer_index: int, modality: str) -> str:
    """Name of the q_theta network of a layer (1-based) and modality."""
    return f"L{layer_index}_{modality}"
