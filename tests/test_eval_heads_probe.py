"""Downstream heads and probe training on frozen synthetic features."""
import numpy as np
import pytest
import torch

from srcid.errors import SrcidError
from srcid.eval.heads import ALPHA_INIT, ClassificationHead, LocalizationHead, make_head
from srcid.eval.metrics import localization_report
from srcid.eval.probe import (
    evaluate_classification,
    evaluate_localization,
    predict,
    run_seeds,
    seed_list,
    train_head,
)

# --------------------------------------------------------------------- heads


@pytest.mark.parametrize("b,t,d,c", [(1, 1, 3, 2), (4, 10, 8, 29), (3, 7, 5, 13)])
def test_head_output_shapes(b, t, d, c):
    x = torch.randn(b, t, d)
    assert make_head("classification", d, c, hidden=6)(x).shape == (b, c)
    assert make_head("localization", d, c, hidden=6)(x).shape == (b, t, c)


def test_heads_reject_wrong_feature_size():
    with pytest.raises(SrcidError, match=r"expected features \[batch, time, 8\], got \(2, 10, 9\)"):
        ClassificationHead(8, 3)(torch.randn(2, 10, 9))
    with pytest.raises(SrcidError, match="localization head"):
        LocalizationHead(8, 3)(torch.randn(2, 8))
    with pytest.raises(SrcidError, match="head kind"):
        make_head("regression", 8, 3)


def test_classification_head_matches_float64_formula():
    torch.manual_seed(0)
    head = ClassificationHead(5, 4, hidden=6)
    x = torch.randn(3, 7, 5)
    w1, b1 = head.proj.weight.detach().double(), head.proj.bias.detach().double()
    w2, b2 = head.classifier.weight.detach().double(), head.classifier.bias.detach().double()
    hidden = torch.einsum("btd,hd->bth", x.double(), w1) + b1
    expected = hidden.max(dim=1).values @ w2.T + b2
    torch.testing.assert_close(head(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_localization_head_and_loss_match_float64_formula():
    torch.manual_seed(1)
    b, t, d, c = 3, 6, 5, 7
    head = LocalizationHead(d, c, hidden=4)
    with torch.no_grad():
        head.alpha.copy_(torch.randn(c))
    x = torch.randn(b, t, d)
    y = (torch.rand(b, t, c) < 0.3).float()
    w1, b1 = head.proj.weight.detach().double(), head.proj.bias.detach().double()
    w2, b2 = head.classifier.weight.detach().double(), head.classifier.bias.detach().double()
    z = (x.double() @ w1.T + b1) @ w2.T + b2
    torch.testing.assert_close(head(x).double(), z, rtol=1e-5, atol=1e-5)

    yd, alpha = y.double(), head.alpha.detach().double()
    sig = 1.0 / (1.0 + torch.exp(-z))
    bce = -(yd * torch.log(sig) + (1 - yd) * torch.log(1 - sig)).mean()
    log_softmax = z - torch.log(torch.exp(z).sum(dim=-1, keepdim=True))
    term = -(torch.exp(-alpha) * yd * log_softmax).sum(dim=-1).mean()
    got = head.loss(head(x), y)
    assert float(got.detach()) == pytest.approx(float(bce + term), rel=1e-5)
    got.backward()
    assert head.alpha.grad is not None and torch.isfinite(head.alpha.grad).all()
    assert LocalizationHead(d, c).alpha.detach().tolist() == pytest.approx([ALPHA_INIT] * c)


# --------------------------------------------------------------------- probe


def _separable_classes(n, t, d, classes, seed):
    g = torch.Generator().manual_seed(seed)
    centers = 3.0 * torch.randn(classes, d, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    x = centers[labels][:, None, :] + 0.3 * torch.randn(n, t, d, generator=g)
    return x, labels


def _separable_segments(n, t, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, d, generator=g)
    # class c is active in a segment when feature c is positive; several can be active
    targets = (x[..., :3] > 0).float()
    return x, targets


def test_classification_probe_learns_a_separable_problem():
    x, y = _separable_classes(240, 4, 8, 3, seed=0)
    trained = train_head("classification", x[:160], y[:160], epochs=12, batch_size=16, lr=1e-2, seed=43, progress=False)
    assert evaluate_classification(trained.head, x[160:], y[160:])["accuracy"] > 95.0
    assert len(trained.history) == 12 and trained.selected_epoch == 12
    assert trained.history[-1]["loss"] < trained.history[0]["loss"]


def test_localization_probe_learns_a_separable_problem():
    x, targets = _separable_segments(200, 5, 6, seed=1)
    trained = train_head("localization", x[:150], targets[:150], epochs=15, batch_size=16, lr=1e-2, seed=43, progress=False)
    report = evaluate_localization(trained.head, x[150:], targets[150:])
    assert report["precision"] > 90.0 and report["recall"] > 90.0
    scores = torch.sigmoid(predict(trained.head, x[150:]))
    assert report == pytest.approx(localization_report(scores, targets[150:]))


def test_training_is_deterministic_for_a_seed():
    x, y = _separable_classes(50, 3, 4, 3, seed=2)

    def run(seed, global_seed):
        torch.manual_seed(global_seed)  # the global random state must not matter
        return train_head("classification", x, y, epochs=3, batch_size=8, seed=seed, progress=False)

    first, second, other = run(5, 1), run(5, 2), run(6, 1)
    for key, value in first.head.state_dict().items():
        assert torch.equal(value, second.head.state_dict()[key])
    assert first.history == second.history
    assert not torch.equal(first.head.proj.weight, other.head.proj.weight)


def test_keep_best_selects_the_best_epoch_and_last_keeps_the_last():
    x, targets = _separable_segments(40, 3, 5, seed=3)
    scripted = iter([10.0, 30.0, 20.0])
    kwargs = dict(batch_size=8, seed=7, progress=False)
    best = train_head(
        "localization", x, targets, epochs=3, keep="best", eval_fn=lambda head: {"score": next(scripted)}, **kwargs
    )
    two = train_head("localization", x, targets, epochs=2, **kwargs)
    three = train_head("localization", x, targets, epochs=3, **kwargs)
    assert best.selected_epoch == 2
    assert [h["eval"]["score"] for h in best.history] == [10.0, 30.0, 20.0]
    last = train_head("localization", x, targets, epochs=3, keep="last", eval_fn=lambda head: {"score": 0.0}, **kwargs)
    assert last.selected_epoch == 3
    for key, value in best.head.state_dict().items():
        assert torch.equal(value, two.head.state_dict()[key])
        assert torch.equal(last.head.state_dict()[key], three.head.state_dict()[key])
    assert not torch.equal(best.head.proj.weight, three.head.proj.weight)


def test_keep_best_by_a_named_metric_and_lr_milestones():
    x, y = _separable_classes(30, 2, 4, 2, seed=4)
    scripted = iter([{"a": 1.0, "b": 5.0}, {"a": 2.0, "b": 4.0}, {"a": 0.0, "b": 6.0}])
    trained = train_head(
        "classification", x, y, epochs=3, batch_size=10, lr=1e-3, lr_milestones=(1, 2), seed=1,
        progress=False, eval_fn=lambda head: next(scripted), keep="best", best_by="a",
    )
    assert trained.selected_epoch == 2
    assert [h["lr"] for h in trained.history] == pytest.approx([1e-3, 5e-4, 2.5e-4])


def test_probe_rejects_bad_input():
    x, y = _separable_classes(10, 2, 4, 2, seed=5)
    with pytest.raises(SrcidError, match="eval_fn"):
        train_head("classification", x, y, epochs=1, keep="best", progress=False)
    with pytest.raises(SrcidError, match="10 feature sequences"):
        train_head("classification", x, y[:9], epochs=1, progress=False)
    with pytest.raises(SrcidError, match=r"\[N, T, D\]"):
        train_head("classification", x[:, 0], y, epochs=1, progress=False)
    with pytest.raises(SrcidError, match="per-segment targets"):
        train_head("localization", x, torch.zeros(10, 3, 2), epochs=1, progress=False)
    with pytest.raises(SrcidError, match="none named 'missing'"):
        train_head(
            "classification", x, y, epochs=1, keep="best", best_by="missing", eval_fn=lambda h: {"a": 1.0}, progress=False
        )
    trained = train_head("classification", x, y, epochs=1, num_classes=3, progress=False)
    with pytest.raises(SrcidError, match="head has 3 classes"):
        evaluate_classification(trained.head, x, torch.full((10,), 3))


def test_run_seeds_reports_mean_and_std():
    got = run_seeds(lambda seed: {"accuracy": float(seed), "f1": 2.0 * seed}, seed_list(3))
    assert got["seeds"] == [43, 44, 45]
    assert got["metrics"]["accuracy"]["mean"] == pytest.approx(44.0)
    assert got["metrics"]["f1"]["std"] == pytest.approx(float(np.std([86, 88, 90], ddof=1)))
    assert [run["accuracy"] for run in got["runs"]] == [43.0, 44.0, 45.0]
