"""Reconstruction targets: text's (BiLSTM output or input features) and layer 2's (detached or not)."""
import pytest
import torch

from helpers_model import SMALL_SHAPES
from srcid.data.batch import Batch
from srcid.errors import SrcidError
from srcid.model import build_model, model_config
from srcid.model.inputs import fit_steps
from srcid.model.losses import reconstruction_loss


pytestmark = pytest.mark.usefixtures("one_thread")


def model(**settings):
    torch.manual_seed(0)
    config = model_config("tiny")
    for key, value in settings.items():
        setattr(config, key, value)
    return build_model("srcid", config, SMALL_SHAPES)


def batch(n=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([3, 12, 7, 1, 10][:n])
    steps = int(lengths.max())
    mask = torch.arange(steps)[None, :] < lengths[:, None]
    features = {"audio": torch.randn(n, 10, 6, generator=gen), "video": torch.randn(n, 10, 5, 5, 4, generator=gen),
                "text": torch.randn(n, steps, 7, generator=gen) * mask[..., None]}
    masks = {"audio": torch.ones(n, 10, dtype=torch.bool), "video": torch.ones(n, 10, dtype=torch.bool), "text": mask}
    return Batch(keys=[str(i) for i in range(n)], features=features, masks=masks, labels=torch.full((n,), -1))


def test_text_features_target_is_the_input_tokens_over_real_steps():
    m = model(text_target="features")
    b = batch()
    out = m(b).layers[0]
    want, mask = fit_steps(b.features["text"], b.masks["text"], 10)
    torch.testing.assert_close(out.targets["text"], want * mask[..., None], rtol=0, atol=0)
    assert out.reconstructions["text"].shape == (5, 10, 7)  # the decoder rebuilds the 7-d tokens
    assert out.targets["audio"] is not None and out.targets["audio"].shape == (5, 10, 6)
    # the loss counts real steps only: changing a padded step's reconstruction changes nothing
    recon = out.reconstructions["text"].detach().clone()
    base = reconstruction_loss(recon, out.targets["text"], out.masks["text"])
    recon[3, 5] += 100.0  # clip 3 has one real token
    assert torch.equal(reconstruction_loss(recon, out.targets["text"], out.masks["text"]), base)


def test_lstm_target_is_the_front_end_output_and_trains_it_from_both_sides():
    m = model(text_target="lstm")
    out = m(batch()).layers[0]
    assert out.targets["text"].shape[-1] == m.text_frontend.out_dim and out.targets["text"].requires_grad
    features = model(text_target="features")(batch()).layers[0]
    assert not features.targets["text"].requires_grad


def test_layer2_detached_target_keeps_the_gradient_through_the_input():
    """d(layer-2 audio reconstruction)/d(layer-1 audio y): the detached target removes exactly the target's
    term -2 (r - y) / N and keeps the path through layer 2's encoders."""
    grads, outs = {}, {}
    for detach in (False, True):
        m = model(layer2_detach_target=detach)
        m.eval()
        out = m(batch())
        y1 = out.layers[0].specific["audio"]
        second = out.layers[1]
        assert second.targets["audio"].requires_grad is (not detach)
        loss = reconstruction_loss(second.reconstructions["audio"], second.targets["audio"])
        grads[detach] = torch.autograd.grad(loss, y1)[0]
        outs[detach] = (second.reconstructions["audio"].detach(), y1.detach())
        assert grads[detach].abs().sum() > 0
    r, y = outs[False]
    torch.testing.assert_close(grads[False] - grads[True], -2.0 * (r - y) / r.numel(), rtol=1e-4, atol=1e-7)


def test_layer2_target_equals_layer1_specific_output_when_detached():
    m = model(layer2_detach_target=True)
    m.eval()
    out = m(batch())
    torch.testing.assert_close(out.layers[1].targets["audio"], out.layers[0].specific["audio"], rtol=0, atol=0)
    assert out.layers[1].targets["audio"].grad_fn is None


def test_unknown_text_target_is_a_one_line_error():
    config = model_config("tiny")
    config.text_target = "bert"
    with pytest.raises(SrcidError, match="text_target='bert': choose one of lstm, features"):
        config.validate()


def _layer2_inputs(m, b):
    seen = {}
    handle = m.layers[1].register_forward_pre_hook(lambda module, args, kwargs: seen.update(args[0]), with_kwargs=True)
    try:
        out = m(b)
    finally:
        handle.remove()
    return out, seen


def test_layer2_input_norm_standardises_each_step_and_reads_any_scale():
    b = batch()
    m = model(layer2_input_norm="layer", layer2_detach_target=True)
    m.eval()
    out, seen = _layer2_inputs(m, b)
    for name, y in out.layers[0].specific.items():
        y64 = y.detach().double()
        mean = y64.mean(-1, keepdim=True)
        var = ((y64 - mean) ** 2).mean(-1, keepdim=True)
        want = (y64 - mean) / torch.sqrt(var + 1e-6)
        torch.testing.assert_close(seen[name].detach().double(), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.layers[1].targets[name].double(), want, rtol=1e-5, atol=1e-5)
    # y = relu(W x + b) scaled by 50 (W and b scaled): layer 2 reads the same thing with the norm, not without it
    for norm in ("layer", "none"):
        m = model(layer2_input_norm=norm)
        m.eval()
        before = m(b).layers[1].general["audio"].detach()
        with torch.no_grad():
            m.layers[0].specific["audio"].linear.weight.mul_(50.0)
            m.layers[0].specific["audio"].linear.bias.mul_(50.0)
        after = m(b).layers[1].general["audio"].detach()
        same = torch.allclose(before, after, rtol=1e-3, atol=1e-4)
        assert same is (norm == "layer"), norm


def test_unknown_layer2_input_norm_is_a_one_line_error():
    config = model_config("tiny")
    config.layer2_input_norm = "batch"
    with pytest.raises(SrcidError, match="layer2_input_norm='batch': choose one of none, layer"):
        config.validate()


def test_layer2_center_takes_out_the_batch_mean_and_evaluation_uses_the_running_mean():
    b = batch()
    m = model(layer2_center=True)
    off = model(layer2_center=False)
    assert off.layers[1].centre is None and not any("centre" in k for k in off.state_dict())
    assert model().layers[1].centre is not None  # on by default
    centre = m.layers[1].centre
    m.train()
    raw = {}
    hook = m.layers[1].general["audio"].register_forward_hook(lambda mod, args, out: raw.update(audio=out.detach()))
    out = m(b)
    hook.remove()
    z = out.layers[1].general["audio"].detach().double()
    want_mean = raw["audio"].double().mean(dim=(0, 1))
    torch.testing.assert_close(z, raw["audio"].double() - want_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z.mean(dim=(0, 1)), torch.zeros_like(want_mean), rtol=0, atol=1e-5)
    torch.testing.assert_close(centre.running_mean[0].double(), want_mean, rtol=1e-5, atol=1e-6)  # first batch: set
    # text's mean is over real tokens only
    text = out.layers[1].general["text"].detach().double()
    mask = out.layers[1].masks["text"]
    torch.testing.assert_close(text[mask].mean(0), torch.zeros(text.shape[-1], dtype=torch.float64), rtol=0, atol=1e-5)
    first = centre.running_mean.clone()
    m(batch(seed=1))
    assert not torch.equal(centre.running_mean, first)  # later batches move it by an EMA step
    # evaluation: the running mean, whatever the batch; encode agrees with forward
    m.eval()
    running = centre.running_mean.clone()
    raw.clear()
    hook = m.layers[1].general["audio"].register_forward_hook(lambda mod, args, out: raw.update(audio=out.detach()))
    out = m(b)
    hook.remove()
    torch.testing.assert_close(out.layers[1].general["audio"], raw["audio"] - running[0], rtol=0, atol=1e-6)
    assert torch.equal(centre.running_mean, running)
    y = out.layers[0].specific["audio"]
    indices, _, _ = m.layers[1].encode(y, "audio")
    assert torch.equal(indices, out.layers[1].indices["audio"])


def test_calibrate_centres_sets_the_plain_mean_under_the_current_weights():
    m = model(layer2_center=True)
    m.train()
    for seed in range(3):  # a running mean that lags, as after training
        m(batch(seed=seed))
    lagging = m.layers[1].centre.running_mean.clone()
    codebooks = {k: v.clone() for k, v in m.state_dict().items() if "centre" not in k}
    batches = [batch(seed=10), batch(n=4, seed=11)]
    # independent reference: layer 2's raw general features in eval mode, averaged in float64 over real steps
    raw = {mod: [] for mod in SMALL_SHAPES}
    hooks = [m.layers[1].general[mod].register_forward_hook(
        lambda module, args, out, mod=mod: raw[mod].append((out.detach().double(), args[1]))) for mod in SMALL_SHAPES]
    m.eval()
    with torch.no_grad():
        for b in batches:
            m(b)
    for h in hooks:
        h.remove()
    want = {}
    for mod, parts in raw.items():
        rows = [z[mask] if mask is not None else z.reshape(-1, z.shape[-1]) for z, mask in parts]
        want[mod] = torch.cat(rows).mean(0)
    m.train()
    moved = m.calibrate_centres(batches)
    centre = m.layers[1].centre
    assert m.training  # mode restored
    for i, mod in enumerate(centre.modalities):
        torch.testing.assert_close(centre.running_mean[i].double(), want[mod], rtol=1e-5, atol=1e-6)
        assert moved["layers.1.centre"][mod] == pytest.approx(float((want[mod] - lagging[i].double()).norm()), rel=1e-4)
    assert all(torch.equal(v, codebooks[k]) for k, v in m.state_dict().items() if "centre" not in k)  # nothing else moves
    # ranks: reduce sums the totals; a second rank holding the same batches leaves the mean where it is
    twice = m.calibrate_centres(batches, reduce=lambda tensors: [t * 2 for t in tensors])
    assert all(d < 1e-5 for d in twice["layers.1.centre"].values())
    assert model(layer2_center=False).calibrate_centres(batches) == {}  # no centre: nothing to do
