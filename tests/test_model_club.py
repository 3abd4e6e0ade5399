"""CLUB fitting: the fitter raises the log-likelihood; the main loss never updates q_theta."""
import torch

from srcid.model.club import ClubFitter, MIEstimator
from srcid.model.config import ClubConfig


def dependent_pairs(seed, batch=32, steps=4):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, steps, 6, generator=gen)
    y = torch.tanh(x[..., :3] * 1.5) + 0.1 * torch.randn(batch, steps, 3, generator=gen)
    return x, y


def test_fitter_raises_the_loglik_on_dependent_data():
    torch.manual_seed(0)
    est = MIEstimator({"L1_audio": (6, 3), "L1_video": (6, 3)}, ClubConfig(hidden=16, hidden_layers=3, lr=1e-2, inner_steps=5))
    fitter = ClubFitter(est)
    x, y = dependent_pairs(1)
    pairs = {"L1_audio": (x, y), "L1_video": (x, y.flip(0))}
    with torch.no_grad():
        start = est.loglik("L1_audio", x, y)
    first = fitter.fit(pairs)
    for _ in range(30):
        last = fitter.fit(pairs)
    assert float(last["L1_audio"]) > float(first["L1_audio"]) > float(start) - 1.0
    assert float(last["L1_audio"]) > float(start) + 1.0
    # y depends on x for audio only: the fitted bound sees more information there than for shuffled pairs
    assert float(est.mi("L1_audio", x, y)) > float(est.mi("L1_video", x, y.flip(0)))


def test_mi_loss_gradient_reaches_inputs_but_not_q_theta():
    torch.manual_seed(1)
    est = MIEstimator({"L1_text": (6, 3)}, ClubConfig(hidden=8))
    x, y = dependent_pairs(2)
    x.requires_grad_()
    y.requires_grad_()
    est.mi("L1_text", x, y).backward()
    assert x.grad is not None and y.grad is not None and float(x.grad.abs().sum()) > 0
    assert all(p.grad is None for p in est.parameters())


def test_fitter_state_round_trip():
    torch.manual_seed(2)
    config = ClubConfig(hidden=8, inner_steps=2)
    est = MIEstimator({"L2_audio": (6, 3)}, config)
    fitter = ClubFitter(est)
    fitter.fit({"L2_audio": dependent_pairs(3)})
    other = ClubFitter(MIEstimator({"L2_audio": (6, 3)}, config))
    other.load_state_dict(fitter.state_dict())
    for a, b in zip(est.parameters(), other.estimator.parameters()):
        assert torch.equal(a, b)
    assert other.optimizer.state_dict()["state"].keys() == fitter.optimizer.state_dict()["state"].keys()
