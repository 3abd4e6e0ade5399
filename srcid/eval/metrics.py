"""Downstream metrics, all in percent as in the paper's tables.

Pure functions of arrays or tensors; nothing here trains.

* Classification: :func:`accuracy`.
* Localization (AVVP, AVE -> AVVP): per-segment multi-label predictions
  ``score > threshold`` (strictly greater, 0.5 by default), counted over all
  segments and classes at once (micro average): :func:`micro_precision`,
  :func:`micro_recall`, :func:`micro_f1`, :func:`localization_report`. The
  background column ("25 + background") is counted like any other class,
  as in the reference evaluation; ``exclude_classes`` drops columns.
  Conventions: precision with nothing predicted is 0, recall with nothing
  to find is 0, F1 is 0 when precision and recall are both 0.
* Retrieval: :func:`recall_at_k`, :func:`retrieval_report`. A query may have
  several correct targets; it scores a hit at k when its best-scored correct
  target ranks within the first k. Ties are broken pessimistically: every
  wrong target scoring at least as high as that correct target ranks ahead.
* Seeds: :func:`summarize` gives mean, sample std and the values.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch

from srcid.errors import SrcidError

DEFAULT_KS = (1, 5, 10)


def _tensor(value, name: str) -> torch.Tensor:
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise SrcidError(f"{name}: cannot be read as an array ({exc})") from None


def _check_finite(t: torch.Tensor, name: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise SrcidError(f"{name}: contains NaN or infinite values")


def _percent(numerator, denominator) -> float:
    numerator, denominator = float(numerator), float(denominator)
    return 100.0 * numerator / denominator if denominator > 0 else 0.0


# ----------------------------------------------------------------- classification


def accuracy(logits_or_pred, labels) -> float:
    """Percentage of correct predictions.

    ``logits_or_pred`` is either scores ``[N, C]`` (the argmax is taken, ties
    to the lowest class index) or predicted class indices ``[N]``;
    ``labels`` are class indices ``[N]``.
    """
    pred = _tensor(logits_or_pred, "predictions")
    labels = _tensor(labels, "labels")
    if labels.dim() != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
        raise SrcidError(f"labels: expected integer class indices of shape [N], got {labels.dtype} {tuple(labels.shape)}")
    if pred.dim() == 2:
        _check_finite(pred, "logits")
        if pred.shape[1] == 0:
            raise SrcidError("logits: expected [N, C] with C >= 1 classes, got C = 0")
        pred = pred.argmax(dim=1)
    elif pred.dim() != 1 or pred.is_floating_point():
        raise SrcidError(f"predictions: expected logits [N, C] or class indices [N], got {pred.dtype} {tuple(pred.shape)}")
    if pred.shape[0] != labels.shape[0]:
        raise SrcidError(f"predictions and labels disagree in length: {pred.shape[0]} vs {labels.shape[0]}")
    if labels.numel() == 0:
        raise SrcidError("labels: empty, accuracy of no samples is undefined")
    return _percent((pred.to(labels.device) == labels).sum(), labels.numel())


# ------------------------------------------------------------------- localization


def _localization_counts(scores, targets, threshold: float, exclude_classes: Sequence[int]):
    """(true positives, predicted positives, actual positives) over all entries."""
    scores = _tensor(scores, "scores")
    targets = _tensor(targets, "targets")
    if tuple(scores.shape) != tuple(targets.shape):
        raise SrcidError(f"scores and targets disagree in shape: {tuple(scores.shape)} vs {tuple(targets.shape)}")
    if scores.dim() < 1 or scores.shape[-1] == 0:
        raise SrcidError(f"scores: expected [..., C] with C >= 1 classes, got {tuple(scores.shape)}")
    _check_finite(scores, "scores")
    if scores.numel() and (bool((scores < 0).any()) or bool((scores > 1).any())):
        raise SrcidError("scores: expected probabilities in [0, 1] (apply a sigmoid to logits first)")
    targets = targets.to(torch.float64)
    if not bool(((targets == 0) | (targets == 1)).all()):
        raise SrcidError("targets: expected multi-label 0/1 entries")
    num_classes = scores.shape[-1]
    if exclude_classes:
        bad = [c for c in exclude_classes if not -num_classes <= int(c) < num_classes]
        if bad:
            raise SrcidError(f"exclude_classes: {bad} out of range for {num_classes} classes")
        keep = torch.ones(num_classes, dtype=torch.bool)
        keep[[int(c) for c in exclude_classes]] = False
        scores, targets = scores[..., keep.to(scores.device)], targets[..., keep.to(targets.device)]
    predicted = scores.to(torch.float64) > threshold
    positive = targets.to(predicted.device) > 0.5
    return int((predicted & positive).sum()), int(predicted.sum()), int(positive.sum())


def micro_precision(scores, targets, threshold: float = 0.5, exclude_classes: Sequence[int] = ()) -> float:
    """Micro-averaged precision in percent of ``scores > threshold`` against 0/1 ``targets``.

    ``scores`` are probabilities of any shape ``[..., C]`` (e.g. ``[N, T, C]``),
    ``targets`` the same shape. This is what the paper reports as AVVP
    "accuracy". Nothing predicted gives 0.
    """
    tp, predicted, _ = _localization_counts(scores, targets, threshold, exclude_classes)
    return _percent(tp, predicted)


def micro_recall(scores, targets, threshold: float = 0.5, exclude_classes: Sequence[int] = ()) -> float:
    """Micro-averaged recall in percent; no positive targets gives 0."""
    tp, _, positive = _localization_counts(scores, targets, threshold, exclude_classes)
    return _percent(tp, positive)


def _f1(precision: float, recall: float) -> float:
    return 2.0 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def localization_report(scores, targets, threshold: float = 0.5, exclude_classes: Sequence[int] = ()) -> dict[str, float]:
    """``{"precision", "recall", "f1"}`` in percent, micro-averaged (see module notes)."""
    tp, predicted, positive = _localization_counts(scores, targets, threshold, exclude_classes)
    precision, recall = _percent(tp, predicted), _percent(tp, positive)
    return {"precision": precision, "recall": recall, "f1": _f1(precision, recall)}


def micro_f1(scores, targets, threshold: float = 0.5, exclude_classes: Sequence[int] = ()) -> float:
    """Micro F1 in percent: harmonic mean of :func:`micro_precision` and :func:`micro_recall`."""
    return localization_report(scores, targets, threshold, exclude_classes)["f1"]


# ---------------------------------------------------------------------- retrieval


def _correct_mask(query_to_targets, num_queries: int, num_targets: int) -> torch.Tensor:
    if isinstance(query_to_targets, torch.Tensor) or hasattr(query_to_targets, "__array__"):
        mask = _tensor(query_to_targets, "query_to_targets")
        if mask.dtype != torch.bool:
            raise SrcidError(f"query_to_targets: a matrix must be boolean [queries, targets], got {mask.dtype}")
        if tuple(mask.shape) != (num_queries, num_targets):
            raise SrcidError(
                f"query_to_targets: expected shape {(num_queries, num_targets)} to match sim, got {tuple(mask.shape)}"
            )
        return mask.cpu()
    lists = list(query_to_targets)
    if len(lists) != num_queries:
        raise SrcidError(f"query_to_targets: {len(lists)} entries for {num_queries} queries (rows of sim)")
    mask = torch.zeros(num_queries, num_targets, dtype=torch.bool)
    for q, targets in enumerate(lists):
        try:
            targets = list(targets)
        except TypeError:
            targets = [targets]
        for t in targets:
            if not 0 <= int(t) < num_targets:
                raise SrcidError(f"query_to_targets: query {q} names target {t}, outside 0..{num_targets - 1}")
            mask[q, int(t)] = True
    return mask


def recall_at_k(sim, query_to_targets, ks: Iterable[int] = DEFAULT_KS) -> dict[str, float]:
    """Recall at each k in percent, queries are the rows of ``sim``.

    ``sim`` is ``[queries, targets]`` (higher = more similar).
    ``query_to_targets`` is a boolean ``[queries, targets]`` matrix or, per
    query, the indices of its correct targets (at least one each). Returns
    ``{"R@1": ..., "R@5": ..., "R@10": ...}``. Ties are pessimistic: a query's
    rank is the number of wrong targets scoring at least its best correct one.
    """
    sim = _tensor(sim, "sim")
    if sim.dim() != 2 or 0 in sim.shape:
        raise SrcidError(f"sim: expected a non-empty [queries, targets] matrix, got {tuple(sim.shape)}")
    if not sim.is_floating_point():
        sim = sim.to(torch.float64)
    _check_finite(sim, "sim")
    ks = [int(k) for k in ks]
    if not ks or any(k < 1 for k in ks):
        raise SrcidError(f"ks: expected positive integers, got {ks}")
    correct = _correct_mask(query_to_targets, *sim.shape)
    empty = (~correct.any(dim=1)).nonzero().flatten()
    if empty.numel():
        raise SrcidError(f"query_to_targets: query {int(empty[0])} has no correct target ({empty.numel()} queries in all)")
    sim = sim.detach().cpu().to(torch.float64)
    best_correct = sim.masked_fill(~correct, -math.inf).max(dim=1).values
    rank = ((sim >= best_correct[:, None]) & ~correct).sum(dim=1)
    return {f"R@{k}": _percent((rank < k).sum(), sim.shape[0]) for k in ks}


def retrieval_report(sim, pairs, names: tuple[str, str] = ("V", "T"), ks: Iterable[int] = DEFAULT_KS) -> dict:
    """Zero-shot retrieval both ways, in percent.

    ``sim[i, j]`` compares item ``i`` of the first kind (e.g. a video) with
    item ``j`` of the second (e.g. a caption); ``pairs`` lists the correct
    ``(i, j)`` pairs, so an item may have several captions. Every row and
    every column must take part in some pair. Returns
    ``{"V->T": {"R@1", ...}, "T->V": {...}, "mean": {...}}`` where ``mean`` is
    the average of the two directions (the paper's Table III entries).
    """
    sim = _tensor(sim, "sim")
    if sim.dim() != 2 or 0 in sim.shape:
        raise SrcidError(f"sim: expected a non-empty [items, items] matrix, got {tuple(sim.shape)}")
    first, second = names
    ks = list(ks)
    mask = torch.zeros(sim.shape, dtype=torch.bool)
    count = 0
    for pair in pairs:
        try:
            i, j = (int(v) for v in pair)
        except (TypeError, ValueError):
            raise SrcidError(f"pairs: expected (row, column) index pairs, got {pair!r}") from None
        if not (0 <= i < sim.shape[0] and 0 <= j < sim.shape[1]):
            raise SrcidError(f"pairs: ({i}, {j}) is outside sim of shape {tuple(sim.shape)}")
        mask[i, j] = True
        count += 1
    if count == 0:
        raise SrcidError("pairs: empty, retrieval needs at least one correct pair")
    for axis, kind in ((1, first), (0, second)):
        lonely = (~mask.any(dim=axis)).nonzero().flatten()
        if lonely.numel():
            raise SrcidError(f"pairs: {kind} item {int(lonely[0])} is in no pair ({lonely.numel()} such items)")
    forward = recall_at_k(sim, mask, ks)
    backward = recall_at_k(sim.T, mask.T, ks)
    mean = {key: (forward[key] + backward[key]) / 2.0 for key in forward}
    return {f"{first}->{second}": forward, f"{second}->{first}": backward, "mean": mean}


# -------------------------------------------------------------------------- seeds


def summarize(values: Iterable[float]) -> dict:
    """``{"mean", "std", "n", "values"}`` of per-seed numbers; ``std`` is the
    sample standard deviation (``None`` for a single value)."""
    values = [float(v) for v in values]
    if not values:
        raise SrcidError("summarize: no values")
    if not all(math.isfinite(v) for v in values):
        raise SrcidError(f"summarize: non-finite value in {values}")
    n = len(values)
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n, "values": values}


def summarize_runs(runs: Sequence[Mapping[str, float]]) -> dict[str, dict]:
    """Per metric :func:`summarize` over runs that each report the same metrics."""
    if not runs:
        raise SrcidError("summarize_runs: no runs")
    names = list(runs[0])
    for index, run in enumerate(runs):
        if sorted(run) != sorted(names):
            raise SrcidError(f"summarize_runs: run {index} reports {sorted(run)}, run 0 reports {sorted(names)}")
    return {name: summarize(run[name] for run in runs) for name in names}
