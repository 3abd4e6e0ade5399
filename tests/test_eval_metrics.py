"""Downstream metrics against hand-computed examples and brute-force references."""
import math

import numpy as np
import pytest
import torch

from srcid.errors import SrcidError
from srcid.eval.metrics import (
    accuracy,
    localization_report,
    micro_f1,
    micro_precision,
    micro_recall,
    recall_at_k,
    retrieval_report,
    summarize,
    summarize_runs,
)

# ------------------------------------------------------------------ accuracy


def test_accuracy_hand_example_and_argmax_ties_go_to_lowest_index():
    logits = torch.tensor([[0.1, 0.9, 0.0], [2.0, 2.0, 1.0], [0.0, 0.0, 3.0], [1.0, 0.0, 0.0]])
    labels = torch.tensor([1, 0, 1, 2])
    # predictions 1, 0 (tie -> lowest), 2, 0: two of four correct
    assert accuracy(logits, labels) == pytest.approx(50.0)
    assert accuracy(torch.tensor([1, 0, 1, 2]), labels) == pytest.approx(100.0)
    assert accuracy(np.array([0, 0, 0, 0]), np.array([1, 0, 1, 2])) == pytest.approx(25.0)


@pytest.mark.parametrize("n,c", [(1, 2), (7, 3), (33, 28)])
def test_accuracy_matches_brute_force(n, c):
    rng = np.random.default_rng(n * 100 + c)
    logits = rng.normal(size=(n, c))
    labels = rng.integers(0, c, size=n)
    expected = 100.0 * sum(int(np.argmax(logits[i]) == labels[i]) for i in range(n)) / n
    assert accuracy(torch.from_numpy(logits), torch.from_numpy(labels)) == pytest.approx(expected)


def test_accuracy_rejects_bad_input():
    with pytest.raises(SrcidError, match="disagree in length"):
        accuracy(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(SrcidError, match="labels"):
        accuracy(torch.zeros(3, 2), torch.zeros(3))
    with pytest.raises(SrcidError, match="predictions"):
        accuracy(torch.zeros(3, 2, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(SrcidError, match="NaN"):
        accuracy(torch.tensor([[math.nan, 0.0]]), torch.tensor([0]))


# -------------------------------------------------------------- localization


def _brute_counts(scores, targets, threshold=0.5, exclude=()):
    tp = fp = fn = 0
    for index in np.ndindex(scores.shape):
        if index[-1] in exclude:
            continue
        pred = scores[index] > threshold
        true = targets[index] == 1
        tp += pred and true
        fp += pred and not true
        fn += true and not pred
    return tp, fp, fn


def test_localization_hand_example_with_multi_label_targets():
    # two segments, three classes; the second segment holds two events at once
    scores = torch.tensor([[[0.6, 0.4, 0.1], [0.5, 0.9, 0.7]]])
    targets = torch.tensor([[[1, 0, 0], [1, 1, 1]]])
    # predicted (strictly > 0.5): (0,0), (1,1), (1,2); all correct; (1,0) at exactly 0.5 is missed
    assert micro_precision(scores, targets) == pytest.approx(100.0)
    assert micro_recall(scores, targets) == pytest.approx(75.0)
    assert micro_f1(scores, targets) == pytest.approx(2 * 100 * 75 / 175)
    report = localization_report(scores, targets, threshold=0.3)
    # at 0.3: (0,0), (0,1) wrong, (1,0), (1,1), (1,2) -> tp 4, predicted 5, positives 4
    assert report == pytest.approx({"precision": 80.0, "recall": 100.0, "f1": 2 * 80 * 100 / 180})


def test_localization_exclude_background_column():
    scores = torch.tensor([[0.9, 0.9], [0.1, 0.9]])
    targets = torch.tensor([[1, 0], [0, 1]])
    assert micro_precision(scores, targets) == pytest.approx(200 / 3)
    assert micro_precision(scores, targets, exclude_classes=(1,)) == pytest.approx(100.0)
    assert micro_recall(scores, targets, exclude_classes=(-1,)) == pytest.approx(100.0)
    with pytest.raises(SrcidError, match="out of range"):
        micro_precision(scores, targets, exclude_classes=(2,))


def test_empty_predictions_give_zero_precision_and_f1():
    targets = torch.tensor([[[1, 0], [0, 1]]])
    scores = torch.full((1, 2, 2), 0.2)
    assert localization_report(scores, targets) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    # nothing to find and nothing predicted: all zero by convention
    assert localization_report(torch.zeros(2, 3), torch.zeros(2, 3)) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    # predictions but no positives: precision 0, recall 0
    assert localization_report(torch.ones(2, 3), torch.zeros(2, 3)) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


@pytest.mark.parametrize("shape", [(1, 1, 2), (3, 10, 26), (5, 7, 13), (11, 4)])
def test_localization_matches_brute_force(shape):
    rng = np.random.default_rng(sum(shape))
    scores = rng.random(shape)
    targets = (rng.random(shape) < 0.3).astype(np.int64)
    for exclude in ((), (shape[-1] - 1,)):
        tp, fp, fn = _brute_counts(scores, targets, 0.5, exclude)
        precision = 100.0 * tp / (tp + fp) if tp + fp else 0.0
        recall = 100.0 * tp / (tp + fn) if tp + fn else 0.0
        f1 = 100.0 * 2 * tp / (2 * tp + fp + fn) if tp else 0.0
        got = localization_report(torch.from_numpy(scores).float(), torch.from_numpy(targets), exclude_classes=exclude)
        assert got["precision"] == pytest.approx(precision)
        assert got["recall"] == pytest.approx(recall)
        assert got["f1"] == pytest.approx(f1)


def test_localization_rejects_bad_input():
    with pytest.raises(SrcidError, match="disagree in shape"):
        micro_precision(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(SrcidError, match="sigmoid"):
        micro_precision(torch.tensor([[2.0, -1.0]]), torch.tensor([[1, 0]]))
    with pytest.raises(SrcidError, match="0/1"):
        micro_precision(torch.tensor([[0.2, 0.7]]), torch.tensor([[2, 0]]))


# ----------------------------------------------------------------- retrieval


def test_recall_at_k_hand_example_with_ties_and_several_captions():
    sim = torch.tensor(
        [
            [0.9, 0.5, 0.9, 0.1],  # correct {2}; wrong target 0 ties at 0.9 -> rank 1
            [0.2, 0.8, 0.3, 0.8],  # correct {1, 3}; ties among correct targets do not count -> rank 0
            [0.1, 0.1, 0.1, 0.1],  # correct {0}; three wrong ties -> rank 3
        ]
    )
    got = recall_at_k(sim, [[2], [1, 3], [0]], ks=(1, 2, 3, 4))
    assert got == pytest.approx({"R@1": 100 / 3, "R@2": 200 / 3, "R@3": 200 / 3, "R@4": 100.0})
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[0, 2] = mask[1, 1] = mask[1, 3] = mask[2, 0] = True
    assert recall_at_k(sim, mask, ks=(1, 2, 3, 4)) == got
    assert recall_at_k(sim, [2, [1, 3], 0], ks=(1,)) == pytest.approx({"R@1": 100 / 3})


def _brute_recall(sim, correct, ks):
    hits = {k: 0 for k in ks}
    for q in range(sim.shape[0]):
        # pessimistic order: by similarity descending, wrong targets first among equals
        order = sorted(range(sim.shape[1]), key=lambda t: (-sim[q, t], bool(correct[q, t])))
        first = next(pos for pos, t in enumerate(order) if correct[q, t])
        for k in ks:
            hits[k] += first < k
    return {f"R@{k}": 100.0 * hits[k] / sim.shape[0] for k in ks}


@pytest.mark.parametrize("nq,nt", [(1, 1), (5, 12), (17, 9), (40, 40)])
def test_recall_at_k_matches_brute_force_on_tied_scores(nq, nt):
    rng = np.random.default_rng(nq * 1000 + nt)
    sim = rng.integers(0, 4, size=(nq, nt)).astype(np.float64)  # few values: many ties
    correct = rng.random((nq, nt)) < 0.2
    correct[np.arange(nq), rng.integers(0, nt, size=nq)] = True
    ks = (1, 2, 5, 10)
    got = recall_at_k(torch.from_numpy(sim).float(), torch.from_numpy(correct), ks)
    assert got == pytest.approx(_brute_recall(sim, correct, ks))


def test_retrieval_report_both_directions_with_several_captions_per_item():
    rng = np.random.default_rng(7)
    items, captions_per_item = 6, 3
    sim = rng.normal(size=(items, items * captions_per_item))
    pairs = [(i, i * captions_per_item + c) for i in range(items) for c in range(captions_per_item)]
    correct = np.zeros(sim.shape, dtype=bool)
    for i, j in pairs:
        correct[i, j] = True
    report = retrieval_report(torch.from_numpy(sim), pairs, names=("A", "T"))
    forward = _brute_recall(sim, correct, (1, 5, 10))
    backward = _brute_recall(sim.T, correct.T, (1, 5, 10))
    assert report["A->T"] == pytest.approx(forward)
    assert report["T->A"] == pytest.approx(backward)
    assert report["mean"] == pytest.approx({k: (forward[k] + backward[k]) / 2 for k in forward})


def test_retrieval_rejects_bad_input():
    with pytest.raises(SrcidError, match="query 1 has no correct target"):
        recall_at_k(torch.zeros(2, 3), [[0], []])
    with pytest.raises(SrcidError, match="outside"):
        recall_at_k(torch.zeros(2, 3), [[0], [3]])
    with pytest.raises(SrcidError, match="T item 2 is in no pair"):
        retrieval_report(torch.zeros(2, 3), [(0, 0), (1, 1)])
    with pytest.raises(SrcidError, match="NaN"):
        recall_at_k(torch.tensor([[math.nan]]), [[0]])
    with pytest.raises(SrcidError, match="shape"):
        recall_at_k(torch.zeros(2, 3), torch.ones(3, 2, dtype=torch.bool))


# --------------------------------------------------------------------- seeds


def test_summarize_matches_numpy():
    rng = np.random.default_rng(3)
    values = rng.normal(50, 5, size=4)
    got = summarize(values)
    assert got["mean"] == pytest.approx(float(np.mean(values)))
    assert got["std"] == pytest.approx(float(np.std(values, ddof=1)))
    assert got["n"] == 4 and got["values"] == pytest.approx(list(values))
    assert summarize([12.5])["std"] is None
    runs = summarize_runs([{"a": 1.0, "b": 2.0}, {"b": 4.0, "a": 3.0}])
    assert runs["a"]["mean"] == 2.0 and runs["b"]["std"] == pytest.approx(math.sqrt(2.0))
    with pytest.raises(SrcidError, match="run 1"):
        summarize_runs([{"a": 1.0}, {"b": 1.0}])
