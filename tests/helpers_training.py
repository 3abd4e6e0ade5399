"""Training in the test process: a few plain steps of a model, the trainer's main, or a Trainer of one rank."""
from __future__ import annotations

import torch

from srcid.model import build_mi_fitter
from srcid.run import RunConfig
from srcid.train.step import compute_loss


def build_optimizer(model: torch.nn.Module, lr: float = RunConfig.lr) -> torch.optim.Optimizer:
    """The trainer's optimizer in plain PyTorch: Adam over the model's parameters (never q_theta)."""
    return torch.optim.Adam(model.parameters(), lr=lr)


def train_step(model, mi_fitter, optimizer, batch, *, layer2_weight: float,
               grad_clip: float = RunConfig.grad_clip) -> dict:
    """The trainer's step (:func:`compute_loss`, backward, clipping, Adam) in one plain-PyTorch process.

    For model tests that need a trained model without a process group; returns the detached loss terms
    plus ``"grad_norm"``. The trainer's own engine path is tested in test_train_step.py."""
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


def one_process_env(monkeypatch) -> None:
    """No launch variables (so a fresh local port) and one thread, for a trainer started in this process.

    DeepSpeed keeps a clone of the world process group across runs in one process; it is dropped here, as
    every run starts (and ends) its own process group."""
    from deepspeed.utils import groups

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name in ("_WORLD_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP"):
        if hasattr(groups, name):
            monkeypatch.setattr(groups, name, None)


def train_in_process(monkeypatch, *argv) -> int:
    """``launcher/train.py ARGV`` in this process (see :func:`one_process_env`)."""
    from srcid.train.trainer import main as train_main

    one_process_env(monkeypatch)
    return train_main([str(a) for a in argv])
