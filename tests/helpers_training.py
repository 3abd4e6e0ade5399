"""Training in the test process: a few plain steps of a model, the trainer's main, or a Trainer of one rank."""
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
