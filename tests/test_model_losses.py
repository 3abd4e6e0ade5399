"""Each loss against an independent float64 reference on fresh random inputs (ragged sizes)."""
import math

import pytest
import torch

from srcid.errors import SrcidError
from srcid.model.club import MIEstimator, club_mi
from srcid.model.cmcm import cmcm_loss
from srcid.model.config import ClubConfig, CPCConfig
from srcid.model.cpc import CrossModalCPC
from srcid.model.losses import reconstruction_loss
from srcid.model.randomness import CLUB_STREAM, generator

MODS = ("audio", "video", "text")


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def lstm_reference(lstm, x):
    """A multi-layer LSTM in float64, written from the gate equations (PyTorch's i, f, g, o order)."""
    out = x.double()
    for layer in range(lstm.num_layers):
        w_ih = getattr(lstm, f"weight_ih_l{layer}").detach().double()
        w_hh = getattr(lstm, f"weight_hh_l{layer}").detach().double()
        bias = getattr(lstm, f"bias_ih_l{layer}").detach().double() + getattr(lstm, f"bias_hh_l{layer}").detach().double()
        b = out.shape[0]
        h = torch.zeros(b, lstm.hidden_size, dtype=torch.float64)
        c = torch.zeros_like(h)
        steps = []
        for t in range(out.shape[1]):
            gates = out[:, t] @ w_ih.t() + h @ w_hh.t() + bias
            i, f, g, o = gates.chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            steps.append(h)
        out = torch.stack(steps, dim=1)
    return out


@pytest.mark.parametrize("lstm_layers,horizon,t,batch", [(1, 1, 3, 5), (2, 2, 1, 7), (1, 3, 4, 3)])
def test_cpc_matches_reference(lstm_layers, horizon, t, batch):
    torch.manual_seed(lstm_layers * 10 + horizon)
    dim, steps = 6, 9
    cfg = CPCConfig(lstm_layers=lstm_layers, context=5, horizon=horizon, cross_weight=1.0, self_weight=0.1)
    cpc = CrossModalCPC(MODS, dim, cfg)
    z = {m: rand(batch, steps, dim, seed=i + 20) for i, m in enumerate(MODS)}
    got = cpc(z, t).detach()
    expected = torch.zeros((), dtype=torch.float64)
    for r in range(horizon):
        for n in MODS:  # target modality
            target = z[n][:, t + 1 + r].double()
            for m in MODS:  # predicting modality
                ctx = lstm_reference(cpc.lstms[m], z[m][:, : t + 1])[:, t]
                lin = cpc.predictors[m][r]
                pred = ctx @ lin.weight.detach().double().t() + lin.bias.detach().double()
                loss = 0.0
                for i in range(batch):
                    scores = [float(target[i] @ pred[j]) for j in range(batch)]
                    top = max(scores)
                    loss += -(scores[i] - top - math.log(sum(math.exp(s - top) for s in scores)))
                expected += (1.0 if m != n else 0.1) * loss / batch
    expected /= horizon
    assert math.isclose(float(got), float(expected), rel_tol=1e-4, abs_tol=1e-5)
    low, high = cpc.time_range(10)
    assert (low, high) == (1, 10 - horizon - 1)


def cmcm_reference(general, codebook):
    cb = codebook.double()
    probs = {}
    for m, z in general.items():
        z = z.detach().double()
        b, t, _ = z.shape
        p = torch.zeros(b, cb.shape[0], dtype=torch.float64)
        for i in range(b):
            for s in range(t):
                dist = torch.sqrt(((z[i, s][None] - cb) ** 2).sum(-1))
                w = torch.exp(-dist - (-dist).max())
                p[i] += w / w.sum() / t
        probs[m] = p
    names = list(general)
    total = 0.0
    for x in range(len(names)):
        for y in range(x + 1, len(names)):
            pa, pb = probs[names[x]], probs[names[y]]
            b = pa.shape[0]
            loss = 0.0
            for i in range(b):
                scores = [float((pa[i] * torch.log(pb[j] + 1e-10)).sum() + (pb[i] * torch.log(pa[j] + 1e-10)).sum()) for j in range(b)]
                top = max(scores)
                loss += -(scores[i] - top - math.log(sum(math.exp(s - top) for s in scores)))
            total += loss / b
    return 0.5 * total


@pytest.mark.parametrize("mods,batch,steps,codes", [(MODS, 5, 3, 7), (("audio", "text"), 4, 2, 11)])
def test_cmcm_matches_reference_and_reaches_encoders_only(mods, batch, steps, codes):
    general = {m: (rand(batch, steps, 4, seed=30 + i) * 0.7).requires_grad_() for i, m in enumerate(mods)}
    codebook = rand(codes, 4, seed=40) * 0.5
    got = cmcm_loss(general, codebook)
    assert math.isclose(float(got.detach()), cmcm_reference(general, codebook), rel_tol=1e-4)
    got.backward()
    for z in general.values():
        assert z.grad is not None and float(z.grad.abs().sum()) > 0


def club_reference(mu, logvar, y, perm=None):
    """float64 brute force over pairs: mean over (t, i) of log q(y_i|x_i) - mean_j log q(y_j|x_i) (or y_perm(i))."""
    mu, logvar, y = mu.double(), logvar.double(), y.double()
    steps, n, _ = mu.shape

    def logq(t, i, j):
        return float((-(y[t, j] - mu[t, i]) ** 2 / torch.exp(logvar[t, i]) / 2).sum())

    total = 0.0
    for t in range(steps):
        for i in range(n):
            positive = logq(t, i, i)
            negative = logq(t, i, int(perm[i])) if perm is not None else sum(logq(t, i, j) for j in range(n)) / n
            total += positive - negative
    return total / (steps * n)


@pytest.mark.parametrize("steps,n,d", [(3, 5, 4), (2, 7, 3)])
def test_club_all_pairs_and_sampled_match_reference(steps, n, d):
    mu, y = rand(steps, n, d, seed=50), rand(steps, n, d, seed=51)
    logvar = torch.tanh(rand(steps, n, d, seed=52))
    got = club_mi(mu, logvar, y, estimator="all_pairs")
    assert math.isclose(float(got), club_reference(mu, logvar, y), rel_tol=1e-5, abs_tol=1e-6)
    got = club_mi(mu, logvar, y, estimator="sampled", generator=generator(1, 2, CLUB_STREAM))
    perm = torch.randperm(n, generator=generator(1, 2, CLUB_STREAM))
    assert math.isclose(float(got), club_reference(mu, logvar, y, perm), rel_tol=1e-5, abs_tol=1e-6)


def test_mi_estimator_pairs_clips_at_the_same_time_step():
    torch.manual_seed(7)
    est = MIEstimator({"L1_audio": (4, 3)}, ClubConfig(hidden=5, hidden_layers=3))
    x, y = rand(6, 2, 4, seed=60), rand(6, 2, 3, seed=61)  # [B=6, T=2, D]
    net = est.nets["L1_audio"]
    with torch.no_grad():
        mu, logvar = net(x)
    expected = club_reference(mu.transpose(0, 1), logvar.transpose(0, 1), y.transpose(0, 1))
    assert math.isclose(float(est.mi("L1_audio", x, y)), expected, rel_tol=1e-5, abs_tol=1e-6)
    # the log-likelihood the fitter maximises: mean over clips and steps of sum_d(-(mu-y)^2/exp(lv) - lv)/2
    ll = ((-(mu.double() - y.double()) ** 2 / torch.exp(logvar.double()) - logvar.double()).sum(-1) / 2).mean()
    assert math.isclose(float(est.loglik("L1_audio", x, y).detach()), float(ll), rel_tol=1e-5)
    # the tanh bound of the log-variance
    assert float(logvar.abs().max()) <= 1.0


@pytest.mark.parametrize("shape", [(3, 4, 5), (2, 4, 3, 3, 2)])
def test_reconstruction_loss_masked_and_unmasked(shape):
    recon, target = rand(*shape, seed=70), rand(*shape, seed=71)
    assert math.isclose(float(reconstruction_loss(recon, target)), float(((recon.double() - target.double()) ** 2).mean()), rel_tol=1e-6)
    mask = torch.rand(shape[:2], generator=torch.Generator().manual_seed(72)) > 0.4
    mask[0, 0] = True
    total, count = 0.0, 0
    for b in range(shape[0]):
        for t in range(shape[1]):
            if mask[b, t]:
                total += float(((recon[b, t].double() - target[b, t].double()) ** 2).sum())
                count += recon[b, t].numel()
    assert math.isclose(float(reconstruction_loss(recon, target, mask)), total / count, rel_tol=1e-5)


def test_standardized_y_makes_the_club_estimate_blind_to_the_scale_of_y():
    """With club.standardize_y the bound of (x, c y) is that of (x, y) for any c > 0, fitting included; the
    gradient still reaches y. Without it a tiny y reads as (nearly) no information."""
    from srcid.model.club import ClubFitter, MIEstimator
    from srcid.model.config import ClubConfig

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, 6, generator=gen)
    y = x[..., :3] * 2.0 + 0.3 * torch.randn(32, 4, 3, generator=gen)  # y depends on x
    estimates = {}
    for standardize in (False, True):
        for scale in (1.0, 1e-3):
            torch.manual_seed(1)
            estimator = MIEstimator({"k": (6, 3)}, ClubConfig(hidden=16, standardize_y=standardize))
            fitter = ClubFitter(estimator, steps=60)
            fitter.fit({"k": (x, y * scale)})
            yy = (y * scale).clone().requires_grad_(True)
            mi = estimator.mi("k", x, yy)
            mi.backward()
            assert yy.grad.abs().sum() > 0
            estimates[standardize, scale] = float(mi.detach())
    assert estimates[True, 1.0] == pytest.approx(estimates[True, 1e-3], rel=1e-3, abs=1e-4)
    assert estimates[True, 1e-3] > 0.5 and abs(estimates[False, 1e-3]) < 0.05


def test_a_wider_log_variance_range_lets_club_see_a_small_dependent_y():
    """club.logvar_range r bounds q_theta's log-variance by r (written out: r * tanh); with r = 6 a y of std ~0.01
    that depends on x gets a clearly positive bound, which the code's r = 1 (std >= e^-1/2) reads as ~0."""
    from srcid.model.club import ClubFitter, MIEstimator
    from srcid.model.config import ClubConfig

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(32, 4, 6, generator=gen)
    y = 0.01 * (x[..., :3] * 2.0 + 0.3 * torch.randn(32, 4, 3, generator=gen))
    estimates = {}
    for r in (1.0, 6.0):
        torch.manual_seed(1)
        estimator = MIEstimator({"k": (6, 3)}, ClubConfig(hidden=16, logvar_range=r))
        net = estimator.nets["k"]
        raw = net.logvar(time_major_rows := x.transpose(0, 1))
        assert torch.equal(net(time_major_rows)[1], raw * r)  # the output is r * tanh(mlp(x))
        ClubFitter(estimator, steps=150).fit({"k": (x, y)})
        assert float(net(x.transpose(0, 1))[1].detach().abs().max()) <= r
        estimates[r] = float(estimator.mi("k", x, y).detach())
    assert abs(estimates[1.0]) < 0.05 and estimates[6.0] > 0.3 and estimates[6.0] > 20 * abs(estimates[1.0])


@pytest.mark.parametrize("value", [0.0, -1.0, 25.0])
def test_a_bad_log_variance_range_is_a_config_error(value):
    from srcid.model.config import model_config

    config = model_config("tiny")
    config.club.logvar_range = value
    with pytest.raises(SrcidError, match="club.logvar_range"):
        config.validate()
