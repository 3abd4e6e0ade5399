"""A few plain training steps of a model, for tests that need a trained (not random) model."""
from __future__ import annotations

from srcid.model import build_mi_fitter
from srcid.train.step import build_optimizer, train_step


def train_for_steps(model, loader, steps: int, *, layer2_weight: float) -> int:
    """``steps`` single-process training steps over ``loader``'s epochs 0, 1, ...; returns the steps taken."""
    fitter, optimizer = build_mi_fitter(model), build_optimizer(model)
    done, epoch = 0, 0
    while done < steps:
        for batch in loader.epoch(epoch):
            train_step(model, fitter, optimizer, batch, layer2_weight=layer2_weight)
            done += 1
            if done == steps:
                break
        epoch += 1
    return done
