"""The training step: CLUB fitting, loss gating of layer 2, and the trainer's DeepSpeed engine (its optimizer, lr,
gradient clipping and q_theta isolation), on the path the trainer runs."""
import math

import pytest
import torch

from helpers_training import one_process_env
from srcid.config import apply_overrides
from srcid.data.batch import Batch
from srcid.data.synth import PRESETS, World, write_dataset
from srcid.model import build_mi_fitter, build_model, model_config
from srcid.run import default_run_config
from srcid.train.step import compute_loss
from srcid.train.trainer import Trainer

TINY = {"audio": (10, 16), "video": (10, 5, 5, 24), "text": (None, 32)}
CLIP = 0.05  # far below the tiny model's gradient norm, so the engine must clip


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
    return model, build_mi_fitter(model)


def grad_norm(params) -> float:
    return float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))


@pytest.fixture(scope="module")
def engine_step(tmp_path_factory):
    """One step of a one-rank Trainer on the tiny data, as :meth:`Trainer.train` takes it (its forward and loss,
    ``engine.backward``, ``engine.step``), with ``grad_clip`` = :data:`CLIP`; what the step saw and changed."""
    out = tmp_path_factory.mktemp("engine-step")
    write_dataset(World(PRESETS["tiny"], 0), "pretrain", out, progress=False)
    config = default_run_config("srcid", "tiny")
    config.grad_clip, config.num_workers, config.input_stats_clips = CLIP, 0, 16
    config.warm_start.mode = "off"  # layer 2's losses on from the first step
    seen = {}
    with pytest.MonkeyPatch.context() as monkeypatch:
        one_process_env(monkeypatch)
        trainer = Trainer(config.validate(), out / "pretrain", out / "run", resume=False, progress=False)
        try:
            engine, model, estimator = trainer.engine, trainer.model, list(trainer.mi_fitter.estimator.parameters())
            seen["optimized"] = {id(p) for group in engine.optimizer.param_groups for p in group["params"]}
            seen["trainable"] = {id(p) for p in model.parameters() if p.requires_grad}
            seen["estimator"] = {id(p) for p in estimator}
            seen["lr"] = engine.get_lr()[0]
            fitter_steps = trainer.mi_fitter.optimizer.state_dict()["state"]
            seen["fitter_steps_before"] = fitter_steps[0]["step"] if fitter_steps else 0
            total, terms = trainer._forward_loss(next(trainer._batches()))
            seen["fitter_steps_after"] = trainer.mi_fitter.optimizer.state_dict()["state"][0]["step"]
            seen["terms"] = set(terms)
            fitted = [p.detach().clone() for p in estimator]
            for p in estimator:
                p.grad = None  # left by the fitting's own steps; the main backward must add none
            engine.backward(total)
            seen["estimator_grads"] = [p.grad for p in estimator]
            seen["raw_norm"] = grad_norm(model.parameters())
            step = engine.optimizer.step

            def recording_step(*args, **kwargs):  # the gradients the optimizer is handed, after clipping
                seen["applied_norm"] = grad_norm(model.parameters())
                return step(*args, **kwargs)

            engine.optimizer.step = recording_step
            before = [p.detach().clone() for p in model.parameters()]
            engine.step()
            seen["moved"] = sum(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
            seen["estimator_unchanged"] = all(torch.equal(a, p) for a, p in zip(fitted, estimator))
            seen["inner_steps"] = model.config.club.inner_steps
        finally:
            trainer.close()
    return seen


def test_the_engine_optimizes_the_model_and_never_q_theta(engine_step):
    assert engine_step["optimized"] == engine_step["trainable"]
    assert not engine_step["optimized"] & engine_step["estimator"]
    assert all(grad is None for grad in engine_step["estimator_grads"])
    assert engine_step["estimator_unchanged"] and engine_step["moved"] > 0
    assert engine_step["lr"] == default_run_config("srcid", "tiny").lr == 4e-4
    assert {"L1/club_loglik/audio", "L2/club_loglik/text"} <= engine_step["terms"]


def test_the_engine_fits_club_inside_the_step(engine_step):
    assert engine_step["fitter_steps_after"] - engine_step["fitter_steps_before"] == engine_step["inner_steps"]


def test_the_engine_clips_the_gradient_to_grad_clip(engine_step):
    assert engine_step["raw_norm"] > CLIP
    assert engine_step["applied_norm"] <= CLIP * (1 + 1e-4)


def test_fitting_happens_inside_compute_loss():
    model, fitter = setup()
    before = [p.clone() for p in fitter.estimator.parameters()]
    compute_loss(model, fitter, random_batch(), layer2_weight=1.0)
    assert not all(torch.equal(a, b) for a, b in zip(before, fitter.estimator.parameters()))
    assert fitter.optimizer.state_dict()["state"][0]["step"] == model.config.club.inner_steps


@pytest.mark.parametrize("weight", [0.3, 1.0])
def test_layer2_weight_scales_layer2_losses(weight):
    model, fitter = setup()
    total, terms = compute_loss(model, fitter, random_batch(), layer2_weight=weight)
    expected = float(terms["L1/loss"]) + weight * float(terms["L2/loss"])
    assert math.isclose(float(total.detach()), expected, rel_tol=1e-5)
    total.backward()
    layer2 = [p for p in model.layers[1].parameters()]
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in layer2)


def test_layer2_off_runs_layer2_without_gradient():
    model, fitter = setup()
    codebook = model.layers[1].quantizer.book.codebook.clone()
    total, terms = compute_loss(model, fitter, random_batch(), layer2_weight=0.0)
    total.backward()
    assert math.isclose(float(total.detach()), float(terms["L1/loss"]), rel_tol=1e-6)
    assert "L2/mi/video" in terms  # reported, not trained
    assert all(p.grad is None for p in model.layers[1].parameters())
    assert not torch.equal(codebook, model.layers[1].quantizer.book.codebook)  # its EMA still runs


def test_layer2_can_be_skipped_while_off():
    model, fitter = setup(overrides=["layer2_run_when_off=false"])
    codebook = model.layers[1].quantizer.book.codebook.clone()
    _, terms = compute_loss(model, fitter, random_batch(), layer2_weight=0.0)
    assert not any(k.startswith("L2/") for k in terms)
    assert torch.equal(codebook, model.layers[1].quantizer.book.codebook)
    _, terms = compute_loss(model, fitter, random_batch(seed=1), layer2_weight=0.3)
    assert "L2/loss" in terms


def test_sampled_estimator():
    model, fitter = setup(overrides=["club.estimator=sampled"])
    total, terms = compute_loss(model, fitter, random_batch(), layer2_weight=1.0)
    total.backward()
    assert math.isfinite(float(terms["L1/mi"])) and math.isfinite(float(total.detach()))


def test_engine_forward_hook_and_half_precision_model():
    model, fitter = setup()
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
    model, fitter = setup(overrides=[f"weights.mi_layer{layer}=0", f"weights.average_layers={average}"])
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
    model, fitter = setup()
    _, terms = compute_loss(model, fitter, random_batch(), layer2_weight=0.0)
    expected = sum(float(terms[f"L1/{name}"]) for name in
                   ("recon/audio", "recon/video", "recon/text", "commit", "cmcm", "cpc", "mi"))
    assert math.isclose(float(terms["L1/loss"]), expected, rel_tol=1e-5, abs_tol=1e-5)
