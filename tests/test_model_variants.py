"""Variants, presets, the text front end, inference and input errors."""
import math

import pytest
import torch

from helpers_model import TINY_SHAPES, random_batch, tiny_model
from srcid.config import apply_overrides, from_dict, to_dict
from srcid.errors import SrcidError
from srcid.model import VARIANTS, ModelConfig, build_mi_fitter, build_model, model_config
from srcid.model.encoders import TextFrontEnd
from helpers_training import build_optimizer, train_step


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_trains_a_step(variant):
    model = tiny_model(variant)
    fitter = build_mi_fitter(model)
    optimizer = build_optimizer(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    terms = train_step(model, fitter, optimizer, random_batch(), layer2_weight=1.0)
    assert all(math.isfinite(float(v)) for v in terms.values()), terms
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert terms["grad_norm"] > 0
    for key in ("L1/recon/audio", "L1/recon/video", "L1/recon/text", "L1/commit", "L1/cpc", "L1/mi/video",
                "L1/perplexity/text", "L1/codes_used", "L1/club_loglik/audio", "loss"):
        assert key in terms, key
    assert ("L1/cmcm" in terms) == (variant in ("srcid", "dcid"))
    assert ("L2/mi/audio" in terms) == (variant == "srcid")
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    if variant != "dcid-fsq":
        assert "layers.0.quantizer.book.codebook" in changed or "layers.0.quantizer.books.0.codebook" in changed
    assert model.steps.value == 1


@pytest.mark.parametrize("variant,layers", [("srcid", (1,)), ("srcid", (1, 2)), ("srcid", (2, 1)), ("dcid", (1,)),
                                            ("dcid-rvq3", (1,)), ("dcid-fsq", (1,))])
def test_encode_shapes_and_no_update(variant, layers):
    model = tiny_model(variant)
    batch = random_batch(batch=3)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for m in TINY_SHAPES:
        out = model.encode(batch.features[m], m, mask=batch.masks[m], layers=layers)
        assert len(out.indices) == len(layers) == len(out.quantized)
        for idx, q in zip(out.indices, out.quantized):
            assert idx.shape[:2] == (3, 10) and q.shape == (3, 10, 16)
            assert idx.shape == ((3, 10, 3) if variant == "dcid-rvq3" else (3, 10))
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    if layers == (2, 1):
        one = model.encode(batch.features["audio"], "audio", layers=(1,))
        assert torch.equal(one.indices[0], model.encode(batch.features["audio"], "audio", layers=(2, 1)).indices[1])


def test_encode_matches_the_forward_pass():
    model = tiny_model("srcid")
    model.eval()
    batch = random_batch(batch=4)
    out = model(batch)
    for m in TINY_SHAPES:
        enc = model.encode(batch.features[m], m, mask=batch.masks[m], layers=(1, 2))
        for k in range(2):
            assert torch.equal(enc.indices[k], out.layers[k].indices[m])
            torch.testing.assert_close(enc.quantized[k], out.layers[k].quantized[m].detach())


def test_unknown_variant_lists_the_valid_ones():
    with pytest.raises(SrcidError) as err:
        build_model("dcid-rvq9", model_config("tiny"), TINY_SHAPES)
    assert all(name in str(err.value) for name in VARIANTS)


def test_presets_and_config_validation():
    paper = model_config("paper")
    assert (paper.hidden, paper.quantizer.codebook_size, paper.quantizer.beta, paper.quantizer.decay) == (256, 400, 0.25, 0.99)
    assert (paper.club.hidden, paper.club.hidden_layers, paper.club.inner_steps, paper.club.lr) == (128, 3, 5, 1e-3)
    assert paper.club.estimator == "all_pairs" and paper.cpc.lstm_layers == 1 and paper.quantizer.dead_code_steps == 300
    assert math.prod(paper.quantizer.fsq_levels) == 1000
    for name in ("small", "tiny"):
        assert model_config(name).hidden < paper.hidden
    with pytest.raises(SrcidError, match="huge"):
        model_config("huge")
    with pytest.raises(SrcidError, match="transformer.heads"):
        apply_overrides(model_config("tiny"), ["transformer.heads=3"])
    with pytest.raises(SrcidError, match="club.estimator"):
        apply_overrides(model_config("tiny"), ["club.estimator=exact"])
    with pytest.raises(SrcidError, match="quantizer.decay"):
        apply_overrides(model_config("tiny"), ["quantizer.decay=1.5"])
    with pytest.raises(SrcidError, match="quantizer.fsq_levels"):
        apply_overrides(model_config("tiny"), ["quantizer.fsq_levels=[8,1]"])
    restored = from_dict(ModelConfig, to_dict(model_config("small")))
    assert restored == model_config("small")


def test_video_grids_of_other_sizes_and_two_modalities():
    shapes = {"video": (6, 7, 7, 8), "text": (None, 12)}
    model = tiny_model("srcid", shapes)
    fitter = build_mi_fitter(model)
    terms = train_step(model, fitter, build_optimizer(model), random_batch(shapes, batch=4, words=9), layer2_weight=0.3)
    assert math.isfinite(float(terms["loss"]))
    out = model(random_batch(shapes, batch=2))
    assert out.layers[0].reconstructions["video"].shape == (2, 6, 7, 7, 8)
    flat = {"audio": (10, 5), "video": (10, 9)}  # flat video features work like audio
    model = tiny_model("dcid", flat)
    terms = train_step(model, build_mi_fitter(model), build_optimizer(model), random_batch(flat, batch=3), layer2_weight=0.0)
    assert math.isfinite(float(terms["loss"]))


@pytest.mark.parametrize("shapes,message", [
    ({"audio": (10, 16)}, "at least two modalities"),
    ({"audio": (10, 16), "video": (8, 5, 5, 3)}, "disagree"),
    ({"audio": (10, 16), "video": (10, 4, 4, 3)}, "at least 5"),
    ({"audio": (None, 16), "text": (None, 3)}, "only text"),
    ({"audio": (10, 16), "smell": (10, 3)}, "smell"),
])
def test_bad_input_shapes_at_build(shapes, message):
    with pytest.raises(SrcidError, match=message):
        build_model("dcid", model_config("tiny"), shapes)


def test_bad_batches_name_the_modality_and_shapes():
    model = tiny_model("srcid")
    batch = random_batch(batch=2)
    batch.features["video"] = torch.zeros(2, 10, 7, 7, 24)
    with pytest.raises(SrcidError) as err:
        model(batch)
    assert str(err.value) == "video features: expected shape [B, 10, 5, 5, 24], got [2, 10, 7, 7, 24]"
    batch = random_batch(batch=2)
    batch.features["text"] = torch.zeros(2, 4, 31)
    with pytest.raises(SrcidError, match=r"text features: expected shape \[B, S, 32\], got \[2, 4, 31\]"):
        model(batch)
    batch = random_batch(batch=3).select(("audio", "text"))
    with pytest.raises(SrcidError, match="batch lacks video features: the srcid model needs audio, video, text"):
        model(batch)
    batch = random_batch(batch=3)
    batch.features["audio"][1, 4, 2] = float("nan")
    with pytest.raises(SrcidError, match=r"audio features contain NaN or Inf \(clip clip1\)"):
        model(batch)
    batch.features["audio"][1, 4, 2] = float("inf")
    model.config.check_finite = False
    model.eval()
    model(batch)  # the check can be switched off
    with pytest.raises(SrcidError, match=r"audio features: expected shape \[B, 10, 16\], got \[3, 10, 17\]"):
        model.encode(torch.zeros(3, 10, 17), "audio")
    with pytest.raises(SrcidError, match="modality 'smell'"):
        model.encode(torch.zeros(3, 10, 17), "smell")
    with pytest.raises(SrcidError, match="layer"):
        tiny_model("dcid").encode(torch.zeros(3, 10, 16), "audio", layers=(1, 2))


def test_text_front_end_matches_a_packed_bidirectional_lstm():
    torch.manual_seed(3)
    front = TextFrontEnd(5, 4, 2)
    ref = torch.nn.LSTM(5, 4, num_layers=2, bidirectional=True, batch_first=True)
    with torch.no_grad():
        for layer in range(2):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(ref, f"{name}_l{layer}").copy_(getattr(front.forward_lstms[layer], f"{name}_l0"))
                getattr(ref, f"{name}_l{layer}_reverse").copy_(getattr(front.backward_lstms[layer], f"{name}_l0"))
    x = torch.randn(4, 6, 5)
    lengths = torch.tensor([6, 3, 1, 4])
    mask = torch.arange(6)[None] < lengths[:, None]
    x = x * mask[..., None]
    got = front(x, mask)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    expected, _ = torch.nn.utils.rnn.pad_packed_sequence(ref(packed)[0], batch_first=True, total_length=6)
    torch.testing.assert_close(got.detach(), expected.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("target, dim", [("lstm", 16), ("features", 32)])  # front-end output 2 x 8; input tokens
def test_text_is_cut_or_padded_and_the_mask_is_honoured(target, dim):
    model = tiny_model("dcid", text_target=target)
    model.eval()
    batch = random_batch(batch=3, words=14)  # longer than T = 10: cut
    out = model(batch)
    assert out.layers[0].targets["text"].shape == (3, 10, dim)
    if target == "features":
        torch.testing.assert_close(out.layers[0].targets["text"], batch.features["text"][:, :10], rtol=0, atol=0)
    short = random_batch(batch=3, words=4)  # shorter: zero-padded
    out = model(short)
    mask = out.layers[0].masks["text"]
    assert mask.shape == (3, 10) and not mask[:, 4:].any()
    assert torch.equal(out.layers[0].targets["text"][~mask], torch.zeros(int((~mask).sum()), dim))
    # changing padded words changes nothing of the real steps' targets and general features
    noisy = random_batch(batch=3, words=4)
    noisy.features["text"] = short.features["text"] + (~short.masks["text"])[..., None] * 5.0
    again = model(noisy)
    torch.testing.assert_close(again.layers[0].targets["text"], out.layers[0].targets["text"])
    torch.testing.assert_close(again.layers[0].general["text"][mask], out.layers[0].general["text"][mask])


def test_state_dict_round_trip_keeps_codebooks_and_steps():
    model = tiny_model("srcid")
    fitter = build_mi_fitter(model)
    optimizer = build_optimizer(model)
    for seed in range(2):
        train_step(model, fitter, optimizer, random_batch(seed=seed), layer2_weight=1.0)
    copy = tiny_model("srcid")
    copy.load_state_dict(model.state_dict())
    assert copy.steps.value == 2 and copy.layers[0].quantizer.steps.value == 2
    assert torch.equal(copy.layers[1].quantizer.book.codebook, model.layers[1].quantizer.book.codebook)
    assert all(p.is_floating_point() or p.dtype == torch.int64 for p in model.state_dict().values())
