"""Input normalisation: moments against numpy, the transform, the identity before fitting, export and casts."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers_model import SMALL_SHAPES
from srcid.data.batch import Batch
from srcid.errors import SrcidError
from srcid.model import build_model, model_config
from srcid.model.export import export_model, load_model
from srcid.model.normalize import STD_FLOOR, InputMoments, InputNormalizer, fit_moments


pytestmark = pytest.mark.usefixtures("one_thread")


def raw_batch(n, generator, *, offset=True):
    """Features at real-feature scales: audio around -5 with std 3, sparse non-negative video, small text."""
    lengths = torch.randint(1, 13, (n,), generator=generator)
    steps = int(lengths.max())
    mask = torch.arange(steps)[None, :] < lengths[:, None]
    shift = torch.linspace(-1, 1, 6)
    audio = torch.randn(n, 10, 6, generator=generator) * 3.0 + (-5.0 + shift if offset else 0.0)
    video = torch.relu(torch.randn(n, 10, 5, 5, 4, generator=generator) - 0.5) * 0.25
    text = (torch.randn(n, steps, 7, generator=generator) * 0.4 + 0.2) * mask[..., None]
    features = {"audio": audio, "video": video, "text": text}
    masks = {"audio": torch.ones(n, 10, dtype=torch.bool), "video": torch.ones(n, 10, dtype=torch.bool), "text": mask}
    return Batch(keys=[f"k{i}" for i in range(n)], features=features, masks=masks, labels=torch.full((n,), -1))


def numpy_moments(batches, modality):
    rows = []
    for b in batches:
        x = b.features[modality].numpy().astype(np.float64)
        keep = b.masks[modality].numpy()
        rows.append(x[keep].reshape(-1, x.shape[-1]))
    rows = np.concatenate(rows)
    return rows.mean(0), rows.std(0), rows.shape[0]


def test_moments_match_numpy_with_masks_grids_and_ragged_batches():
    gen = torch.Generator().manual_seed(3)
    batches = [raw_batch(n, gen) for n in (5, 3, 7)]
    moments = fit_moments({"audio": 6, "video": 4, "text": 7}, batches)
    for m in ("audio", "video", "text"):
        mean, std, count = numpy_moments(batches, m)
        got_mean, got_std = moments.mean_std(m)
        assert int(moments.count[m]) == count
        np.testing.assert_allclose(got_mean.numpy(), mean, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(got_std.numpy(), np.maximum(std, std.mean() * STD_FLOOR), rtol=1e-8)


def test_moments_pack_into_one_vector_and_sum_across_parts():
    """What two ranks do: each fits its part, the flat vectors are summed, the result is the whole's."""
    gen = torch.Generator().manual_seed(4)
    batches = [raw_batch(n, gen) for n in (4, 6, 5, 2)]
    dims = {"audio": 6, "video": 4, "text": 7}
    whole = fit_moments(dims, batches)
    parts = [fit_moments(dims, batches[:2]), fit_moments(dims, batches[2:])]
    summed = parts[0].flat() + parts[1].flat()
    rebuilt = InputMoments(dims).from_flat(summed)
    for m in dims:
        for a, b in zip(whole.mean_std(m), rebuilt.mean_std(m)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_a_constant_feature_gets_the_floor_not_a_division_by_zero():
    gen = torch.Generator().manual_seed(5)
    batch = raw_batch(6, gen)
    batch.features["video"][..., 2] = 0.0  # a dead channel
    norm = InputNormalizer({"audio": 6, "video": 4, "text": 7})
    norm.set_moments(fit_moments(norm.dims, [batch]))
    out = norm("video", batch.features["video"])
    assert torch.isfinite(out).all() and out[..., 2].abs().max() == 0.0
    _, raw_std, _ = numpy_moments([batch], "video")
    assert raw_std[2] == 0.0 and float(norm.std_video[2]) == pytest.approx(raw_std.mean() * STD_FLOOR, rel=1e-5)
    with pytest.raises(SrcidError, match="text has 0 real steps"):
        InputMoments({"text": 7}).mean_std("text")


def test_transform_standardises_and_keeps_padding_zero():
    gen = torch.Generator().manual_seed(6)
    batch = raw_batch(64, gen)
    norm = InputNormalizer({"audio": 6, "video": 4, "text": 7})
    assert norm("audio", batch.features["audio"]) is batch.features["audio"]  # not fitted: the identity
    norm.set_moments(fit_moments(norm.dims, [batch]))
    audio = norm("audio", batch.features["audio"]).reshape(-1, 6)
    torch.testing.assert_close(audio.mean(0), torch.zeros(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(audio.std(0, unbiased=False), torch.ones(6), atol=1e-4, rtol=0)
    mask = batch.masks["text"]
    text = norm("text", batch.features["text"], mask)
    assert text[~mask].abs().max() == 0.0
    real = text[mask]
    torch.testing.assert_close(real.mean(0), torch.zeros(7), atol=1e-5, rtol=0)
    # by hand for one value
    m, s = norm.mean_audio[2], norm.std_audio[2]
    assert float(norm("audio", batch.features["audio"])[3, 4, 2]) == pytest.approx(float((batch.features["audio"][3, 4, 2] - m) / s), rel=1e-6)


def test_buffers_stay_float32_under_a_bf16_cast():
    norm = InputNormalizer({"audio": 6}).to(torch.bfloat16)
    assert norm.mean_audio.dtype == torch.float32 and norm.std_audio.dtype == torch.float32


def tiny(seed=0, **config):
    torch.manual_seed(seed)
    cfg = model_config("tiny")
    for key, value in config.items():
        setattr(cfg, key, value)
    return build_model("srcid", cfg, SMALL_SHAPES)


def test_the_model_encodes_raw_features_as_an_unfitted_twin_encodes_standardised_ones():
    gen = torch.Generator().manual_seed(7)
    batches = [raw_batch(8, gen) for _ in range(3)]
    fitted = tiny()
    assert fitted.fit_input_stats(batches) is True and fitted.normalizer.is_fitted
    twin = tiny()
    twin.load_state_dict({k: v for k, v in fitted.state_dict().items() if not k.startswith("normalizer.")}, strict=False)
    assert not twin.normalizer.is_fitted
    batch = batches[1]
    for m in ("audio", "video", "text"):
        mask = batch.masks[m] if m == "text" else None
        by_hand = (batch.features[m] - getattr(fitted.normalizer, f"mean_{m}")) / getattr(fitted.normalizer, f"std_{m}")
        if mask is not None:
            by_hand = by_hand * mask[..., None]
        a = fitted.encode(batch.features[m], m, mask=mask, layers=(1, 2))
        b = twin.encode(by_hand, m, mask=mask, layers=(1, 2))
        for x, y in zip(a.quantized, b.quantized):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_normalize_inputs_false_never_fits():
    gen = torch.Generator().manual_seed(8)
    model = tiny(normalize_inputs=False)
    assert model.fit_input_stats([raw_batch(4, gen)]) is False and not model.normalizer.is_fitted


def test_export_carries_the_statistics_and_an_old_state_loads_as_the_identity(tmp_path):
    gen = torch.Generator().manual_seed(9)
    model = tiny()
    model.fit_input_stats([raw_batch(8, gen)])
    path = export_model(model, variant="srcid", config=model.config, input_shapes=SMALL_SHAPES, path=tmp_path / "m.safetensors")
    loaded, _ = load_model(path)
    assert loaded.normalizer.is_fitted
    torch.testing.assert_close(loaded.normalizer.mean_audio, model.normalizer.mean_audio, rtol=0, atol=0)
    # a file written before the normaliser existed: no normalizer.* tensors
    old = {k: v for k, v in load_file(str(path)).items() if not k.startswith("normalizer.")}
    twin = tiny()
    twin.load_state_dict(old)
    assert not twin.normalizer.is_fitted and float(twin.normalizer.fitted) == 0.0


@pytest.fixture(scope="module")
def realistic_dir(tmp_path_factory):
    from srcid.data.synth import synthesize

    out = tmp_path_factory.mktemp("realistic")
    synthesize("tiny", out, seed=0, progress=False, style="realistic")
    return out / "pretrain"


def codes_after_training(data, *, normalize: bool, seed: int, steps: int = 12) -> dict:
    """Distinct layer-1 codes per modality on the val split after a few DCID training steps."""
    from helpers_training import train_for_steps
    from srcid.data.reader import ShardLoader
    from srcid.model import build_model_from_manifest

    torch.manual_seed(seed)
    cfg = model_config("tiny")
    cfg.normalize_inputs = normalize
    loader = ShardLoader(data, "train", batch_size=32, shuffle=True, seed=seed)
    model = build_model_from_manifest("dcid", cfg, loader.manifest)
    assert model.fit_input_stats(loader.epoch(0)) is normalize
    train_for_steps(model, loader, steps, layer2_weight=0.0)
    model.eval()
    codes = {}
    with torch.no_grad():
        for batch in ShardLoader(data, "val", batch_size=32, shuffle=False).epoch(0):
            for m, idx in model(batch).layers[0].indices.items():
                codes.setdefault(m, set()).update(idx.reshape(-1).tolist())
    return {m: len(v) for m, v in codes.items()}


@pytest.mark.parametrize("seed", [0, 1])
def test_on_raw_scale_features_normalisation_multiplies_code_use(realistic_dir, seed):
    """The realistic synthetic features (audio around -5 with std 3, sparse video, small text) collapse the
    codebook when fed raw; standardised, the same training uses several times as many codes."""
    raw = codes_after_training(realistic_dir, normalize=False, seed=seed)
    normalised = codes_after_training(realistic_dir, normalize=True, seed=seed)
    assert sum(normalised.values()) >= 1.5 * sum(raw.values()), (raw, normalised)
    for m in ("audio", "video"):
        assert normalised[m] > raw[m], (raw, normalised)
