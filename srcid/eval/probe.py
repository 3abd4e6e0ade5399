"""Training and scoring heads on frozen features.

:func:`train_head` fits a fresh head (see :mod:`srcid.eval.heads`) on
features ``[N, T, D]`` with Adam, mini-batches of 80 and gradient-norm
clipping, as the method notes prescribe. The same seed gives the same head
on CPU: the seed fixes both the initial weights and the shuffling order,
without touching the global random state.

Which epoch is kept:

* ``keep="last"`` (the project's default protocol): the head after the
  last epoch.
* ``keep="best"`` (the authors' protocol): after every epoch ``eval_fn(head)``
  is called and the epoch with the highest ``best_by`` metric is kept (the
  earliest one on ties). With ``eval_fn`` scoring the test set this is
  selection on the test set, as the reference evaluation does.

:func:`run_seeds` repeats one experiment over several seeds and reports the
mean and std of every metric.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from srcid.errors import SrcidError
from srcid.eval.heads import HEAD_KINDS, make_head
from srcid.eval.metrics import accuracy, localization_report, summarize_runs
from srcid.model.config import DEFAULT_SEED  # the heads' first seed is the training default, as in the paper's scripts

HEAD_BATCH_SIZE = 80  # clips per head mini-batch (the paper's batch)
KEEP_CHOICES = ("last", "best")


class TrainedHead(NamedTuple):
    """A trained head, one history entry per epoch, and the epoch kept (1-based)."""

    head: nn.Module
    history: list[dict]
    selected_epoch: int


def _features(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise SrcidError(f"{name}: cannot be read as an array ({exc})") from None
    if x.dim() != 3 or 0 in x.shape:
        raise SrcidError(f"{name}: expected features [N, T, D] with N, T, D >= 1, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise SrcidError(f"{name}: expected floating-point features, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise SrcidError(f"{name}: features contain NaN or infinite values")
    return x


def _class_labels(y, n: int, name: str, num_classes: int | None = None) -> torch.Tensor:
    y = torch.as_tensor(y)
    if y.dim() != 1 or y.is_floating_point() or y.dtype == torch.bool:
        raise SrcidError(f"{name}: expected integer class indices [N], got {y.dtype} {tuple(y.shape)}")
    if y.shape[0] != n:
        raise SrcidError(f"{name}: {y.shape[0]} labels for {n} feature sequences")
    if y.numel() and int(y.min()) < 0:
        raise SrcidError(f"{name}: negative class index {int(y.min())}")
    if num_classes is not None and y.numel() and int(y.max()) >= num_classes:
        raise SrcidError(f"{name}: class index {int(y.max())} but the head has {num_classes} classes")
    return y.long()


def _segment_targets(y, x: torch.Tensor, name: str, num_classes: int | None = None) -> torch.Tensor:
    y = torch.as_tensor(y)
    if y.dim() != 3 or tuple(y.shape[:2]) != tuple(x.shape[:2]):
        expected = f"[{x.shape[0]}, {x.shape[1]}, C]"
        raise SrcidError(f"{name}: expected per-segment targets {expected} matching the features, got {tuple(y.shape)}")
    if num_classes is not None and y.shape[2] != num_classes:
        raise SrcidError(f"{name}: {y.shape[2]} classes but the head has {num_classes}")
    if not bool(((y == 0) | (y == 1)).all()):
        raise SrcidError(f"{name}: expected multi-label 0/1 targets")
    return y.to(torch.float32)


def train_head(
    kind: str,
    train_x,
    train_y,
    *,
    epochs: int,
    seed: int = DEFAULT_SEED,
    batch_size: int = HEAD_BATCH_SIZE,
    lr: float = 4e-4,
    grad_clip: float | None = 0.5,
    num_classes: int | None = None,
    hidden: int = 256,
    lr_milestones: Sequence[int] = (),
    lr_gamma: float = 0.5,
    progress: bool = True,
    eval_fn: Callable[[nn.Module], Mapping[str, float]] | None = None,
    keep: str = "last",
    best_by: str | None = None,
    desc: str | None = None,
) -> TrainedHead:
    """Train a ``kind`` head on ``train_x [N, T, D]`` and return :class:`TrainedHead`.

    ``train_y``: class indices ``[N]`` (classification; ``num_classes``
    defaults to ``max + 1``) or 0/1 targets ``[N, T, C]`` (localization).
    Features are used in float32 on their own device. ``lr_milestones``
    halves (``lr_gamma``) the learning rate after those epochs (the reference
    localization probe uses 10, 20, 30; default: constant). Each history
    entry is ``{"epoch", "loss", "lr", "eval"}`` with ``eval`` the result of
    ``eval_fn`` (or ``{}``). ``best_by`` names the metric ``keep="best"``
    maximises (default: the first one ``eval_fn`` returns).
    """
    if kind not in HEAD_KINDS:
        raise SrcidError(f"head kind {kind!r} is not one of {', '.join(HEAD_KINDS)}")
    if keep not in KEEP_CHOICES:
        raise SrcidError(f"keep={keep!r} is not one of {', '.join(KEEP_CHOICES)}")
    if keep == "best" and eval_fn is None:
        raise SrcidError("keep='best' needs an eval_fn to rank the epochs")
    if epochs < 1 or batch_size < 1 or lr <= 0 or (grad_clip is not None and grad_clip <= 0):
        raise SrcidError(
            "need epochs >= 1, batch_size >= 1, lr > 0, grad_clip > 0 or None; "
            f"got {epochs}, {batch_size}, {lr}, {grad_clip}"
        )

    x = _features(train_x, "train features")
    if kind == "classification":
        y = _class_labels(train_y, x.shape[0], "train labels", num_classes)
        classes = num_classes if num_classes is not None else max(int(y.max()) + 1, 2)
    else:
        y = _segment_targets(train_y, x, "train targets", num_classes)
        classes = y.shape[2]
    y = y.to(x.device)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = make_head(kind, x.shape[2], classes, hidden).to(x.device)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=sorted(lr_milestones), gamma=lr_gamma)

    history: list[dict] = []
    best_state, best_value, best_epoch = None, None, epochs
    bar = tqdm(range(1, epochs + 1), desc=desc or f"{kind} head", unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        head.train()
        order = torch.randperm(x.shape[0], generator=generator).to(x.device)
        total, seen = 0.0, 0
        epoch_lr = optimizer.param_groups[0]["lr"]
        for start in range(0, x.shape[0], batch_size):
            index = order[start:start + batch_size]
            loss = head.loss(head(x[index].float()), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(head.parameters(), grad_clip)
            optimizer.step()
            total += float(loss.detach()) * index.numel()
            seen += index.numel()
        scheduler.step()
        metrics = dict(eval_fn(head)) if eval_fn is not None else {}
        head.train()
        history.append({"epoch": epoch, "loss": total / seen, "lr": epoch_lr, "eval": metrics})
        shown = {k: f"{v:.2f}" if isinstance(v, (int, float)) else str(v) for k, v in metrics.items()}
        bar.set_postfix({"loss": f"{total / seen:.4f}", **shown})
        if keep == "best":
            key = best_by if best_by is not None else next(iter(metrics), None)
            if key not in metrics:
                raise SrcidError(f"eval_fn returned {sorted(metrics)}, none named {key!r} to select the best epoch by")
            value = float(metrics[key])
            if best_value is None or value > best_value:
                best_value, best_epoch = value, epoch
                best_state = copy.deepcopy(head.state_dict())
    if keep == "best":
        head.load_state_dict(best_state)
    head.eval()
    return TrainedHead(head, history, best_epoch)


@torch.no_grad()
def predict(head: nn.Module, x, batch_size: int = 1024) -> torch.Tensor:
    """Head outputs (logits) for features ``[N, T, D]``, in batches, without gradients."""
    x = _features(x, "features")
    was_training = head.training
    head.eval()
    device = next(head.parameters()).device
    outputs = [head(x[start:start + batch_size].to(device).float()) for start in range(0, x.shape[0], batch_size)]
    head.train(was_training)
    return torch.cat(outputs)


def evaluate_classification(head: nn.Module, x, y) -> dict[str, float]:
    """``{"accuracy": percent}`` of a classification head on features ``x`` and class indices ``y``."""
    x = _features(x, "test features")
    y = _class_labels(y, x.shape[0], "test labels", getattr(head, "num_classes", None))
    return {"accuracy": accuracy(predict(head, x).cpu(), y.cpu())}


def evaluate_localization(
    head: nn.Module, x, targets, threshold: float = 0.5, exclude_classes: Sequence[int] = ()
) -> dict[str, float]:
    """Micro ``{"precision", "recall", "f1"}`` in percent of a localization head.

    Predictions are ``sigmoid(logits) > threshold`` per segment and class;
    ``precision`` is what the paper calls AVVP accuracy, ``f1`` the
    AVE -> AVVP metric.
    """
    x = _features(x, "test features")
    targets = _segment_targets(targets, x, "test targets", getattr(head, "num_classes", None))
    return localization_report(torch.sigmoid(predict(head, x)).cpu(), targets.cpu(), threshold, exclude_classes)


def seed_list(count: int, base: int = DEFAULT_SEED) -> list[int]:
    """``count`` consecutive seeds starting at ``base`` (43, the method's seed)."""
    if count < 1:
        raise SrcidError(f"seeds: need at least 1, got {count}")
    return list(range(base, base + count))


def run_seeds(experiment: Callable[[int], Mapping[str, float]], seeds: Sequence[int]) -> dict:
    """Run ``experiment(seed)`` for every seed.

    Returns ``{"seeds": [...], "runs": [metrics per seed], "metrics":
    {name: {"mean", "std", "n", "values"}}}`` (sample std; ``None`` for one seed).
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise SrcidError("seeds: need at least 1")
    runs = [dict(experiment(seed)) for seed in seeds]
    return {"seeds": seeds, "runs": runs, "metrics": summarize_runs(runs)}
