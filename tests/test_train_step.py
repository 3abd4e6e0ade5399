"""The single-process training step: CLUB fitting, loss gating of layer 2, clipping, q_theta isolation."""
import math

import pytest
import torch

from srcid.config import apply_overrides
from srcid.data.batch import Batch
from srcid.errors import SrcidError
from srcid.model import build_mi_fitter, build_model, model_config
from srcid.train.step import StepConfig, build_optimizer, compute_loss, train_step

TINY = {"audio": (10, 16), "video": (10, 5, 5, 24), "text": (None, 32)}


def random_batch(batch=6, seed=0, words=7):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, words + 1, (batch,), generator=gen)
    mask = torch.arange(words)[None] < lengths[:, None]
    features = {
        "audio": torch.randn(batch, 10, 16, generator=gen),
        "video": torch.randn(batch, 10, 5, 5, 24, generator=gen),
        "text": torch.randn(batch, words, 32, generator=gen) * mask[..., None],
    }
    masks = {"audio": torch.ones(batch, 10, dtype=torch.bool), "video": torch.ones(batch, 10, dtype=torch.bool), "text": mask}
    return Batch(keys=[f"c{i}" for i in range(batch)], features=features, masks=masks, labels=torch.zeros(batch, dtype=torch.long))


def setup(variant="srcid", overrides=()):
    torch.manual_seed(0)
    model = build_model(variant, apply_overrides(model_config("tiny"), list(overrides)), TINY)
    return model, build_mi_fitter(model), build_optimizer(model)


def test_main_step_never_updates_q_theta():
    model, fitter, optimizer = setup()
    optimizer.zero_grad()
    total, terms = compute_loss(model, fitter, random_batch(), layer2_weight=1.0)
    fitted = [p.clone() for p in fitter.estimator.parameters()]
    for p in fitter.estimator.parameters():
        p.grad = None
    total.backward()
    optimizer.step()
    assert all(p.grad is None for p in fitter.estimator.parameters())
    assert all(torch.equal(a, b) for a, b in zip(fitted, fitter.estimator.parameters()))
    main = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not main & {id(p) for p in fitter.estimator.parameters()}
    assert {"L1/club_loglik/audio", "L2/club_loglik/text"} <= set(terms)


def test_fitting_happens_inside_compute_loss():
    model, fitter, _ = setup()
    before = [p.clone() for p in fitter.estimator.parameters()]
    compute_loss(model, fitter, random_batch(), layer2_weight=1.0)
    assert not all(torch.equal(a, b) for a, b in zip(before, fitter.estimator.parameters()))
    assert fitter.optimizer.state_dict()["state"][0]["step"] == model.config.club.inner_steps


def test_gradient_clipping():
    model, fitter, optimizer = setup()
    terms = train_step(model, fitter, optimizer, random_batch(), layer2_weight=1.0, grad_clip=0.05)
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    assert float(terms["grad_norm"]) > 0.05
    assert float(norm) <= 0.05 * (1 + 1e-4)


@pytest.mark.parametrize("weight", [0.3, 1.0])
def test_layer2_weight_scales_layer2_losses(weight):
    model, fitter, _ = setup()
    total, terms = compute_loss(model, fitter, random_batch(), layer2_weight=weight)
    expected = float(terms["L1/loss"]) + weight * float(terms["L2/loss"])
    assert math.isclose(float(total.detach()), expected, rel_tol=1e-5)
    total.backward()
    layer2 = [p for p in model.layers[1].parameters()]
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in layer2)


def test_layer2_off_runs_layer2_without_gradient():
    model, fitter, optimizer = setup()
    codebook = model.layers[1].quantizer.book.codebook.clone()
    terms = train_step(model, fitter, optimizer, random_batch(), layer2_weight=0.0)
    assert math.isclose(float(terms["loss"]), float(terms["L1/loss"]), rel_tol=1e-6)
    assert "L2/mi/video" in terms  # reported, not trained
    assert all(p.grad is None for p in model.layers[1].parameters())
    assert not torch.equal(codebook, model.layers[1].quantizer.book.codebook)  # its EMA still runs


def test_layer2_can_be_skipped_while_off():
    model, fitter, optimizer = setup(overrides=["layer2_run_when_off=false"])
    codebook = model.layers[1].quantizer.book.codebook.clone()
    terms = train_step(model, fitter, optimizer, random_batch(), layer2_weight=0.0)
    assert not any(k.startswith("L2/") for k in terms)
    assert torch.equal(codebook, model.layers[1].quantizer.book.codebook)
    terms = train_step(model, fitter, optimizer, random_batch(seed=1), layer2_weight=0.3)
    assert "L2/loss" in terms


def test_sampled_estimator_and_step_config():
    model, fitter, optimizer = setup(overrides=["club.estimator=sampled"])
    terms = train_step(model, fitter, optimizer, random_batch(), layer2_weight=1.0)
    assert math.isfinite(float(terms["L1/mi"]))
    assert optimizer.param_groups[0]["lr"] == StepConfig().lr == 4e-4
    with pytest.raises(SrcidError, match="grad_clip"):
        StepConfig(grad_clip=-1.0).validate()


def test_engine_forward_hook_and_half_precision_model():
    model, fitter, _ = setup()
    calls = []

    def engine(batch, **kwargs):
        calls.append(kwargs)
        return model(batch, **kwargs)

    compute_loss(model, fitter, random_batch(), 1.0, forward=engine)
    assert calls == [{"num_layers": None}]
    model.bfloat16()  # as a bf16 engine casts the module
    total, terms = compute_loss(model, fitter, random_batch(seed=2), 1.0)
    total.backward()
    assert math.isfinite(float(terms["loss"]))
    for q in model.quantizers():
        assert q.book.codebook.dtype == torch.float32 and q.book.embed_sum.dtype == torch.float32


@pytest.mark.parametrize("layer", [1, 2])
@pytest.mark.parametrize("average", [True, False])
def test_per_layer_mi_weight_and_layer_averaging(layer, average):
    model, fitter, _ = setup(overrides=[f"weights.mi_layer{layer}=0", f"weights.average_layers={average}"])
    _, terms = compute_loss(model, fitter, random_batch(), layer2_weight=1.0)
    other = 3 - layer
    scale = 0.5 if average else 1.0  # paper Eq. 6-7: CLUB and CPC averaged over the K = 2 layers

    def without_mi(k):
        fixed = sum(float(terms[f"L{k}/{name}"]) for name in ("recon/audio", "recon/video", "recon/text", "commit", "cmcm"))
        return fixed + scale * float(terms[f"L{k}/cpc"])

    assert math.isclose(float(terms[f"L{layer}/loss"]), without_mi(layer), rel_tol=1e-5, abs_tol=1e-5)
    assert math.isclose(float(terms[f"L{other}/loss"]), without_mi(other) + scale * float(terms[f"L{other}/mi"]),
                        rel_tol=1e-5, abs_tol=1e-5)
    assert float(terms[f"L{layer}/mi"]) != 0.0  # still estimated and logged


def test_one_layer_objective_is_not_halved():
    model, fitter, _ = setup()
    _, terms = compute_loss(model, fitter, random_batch(), layer2_weight=0.0)
    expected = sum(float(terms[f"L1/{name}"]) for name in
                   ("recon/audio", "recon/video", "recon/text", "commit", "cmcm", "cpc", "mi"))
    assert math.isclose(float(terms["L1/loss"]), expected, rel_tol=1e-5, abs_tol=1e-5)
