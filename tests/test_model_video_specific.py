"""The video specific output: the authors' head, or the pooled map the decoder reads (the paper's one output)."""
import pytest
import torch

from helpers_model import SMALL_SHAPES
from srcid.data.batch import Batch
from srcid.errors import SrcidError
from srcid.model import build_mi_fitter, build_model, model_config
from srcid.model.export import export_model, load_model
from helpers_training import build_optimizer, train_step


pytestmark = pytest.mark.usefixtures("one_thread")


def model(mode, variant="srcid"):
    torch.manual_seed(0)
    config = model_config("tiny")
    config.video_specific = mode
    return build_model(variant, config, SMALL_SHAPES)


def batch(n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    features = {"audio": torch.randn(n, 10, 6, generator=gen), "video": torch.relu(torch.randn(n, 10, 5, 5, 4, generator=gen)),
                "text": torch.randn(n, 8, 7, generator=gen)}
    masks = {m: torch.ones(n, x.shape[1], dtype=torch.bool) for m, x in features.items()}
    return Batch(keys=[str(i) for i in range(n)], features=features, masks=masks, labels=torch.full((n,), -1))


def test_map_output_is_the_pooled_grid_the_decoder_reads():
    m = model("map")
    m.eval()
    out = m(batch())
    layer1 = out.layers[0]
    encoder = m.layers[0].specific["video"]
    y, grid = encoder(layer1.targets["video"])
    torch.testing.assert_close(layer1.specific["video"], grid.mean(dim=(2, 3)), rtol=0, atol=0)
    torch.testing.assert_close(y, layer1.specific["video"], rtol=0, atol=0)
    conv = m.config.video_conv
    assert encoder.head is None and layer1.specific["video"].shape == (6, 10, conv)
    # layer 2 reads it and rebuilds it; CLUB's y has its size
    assert out.layers[1].targets["video"].shape == (6, 10, conv)
    assert out.layers[1].reconstructions["video"].shape == (6, 10, conv)
    assert m.club_dims()["L1_video"] == (m.config.hidden, conv) and m.club_dims()["L2_video"] == (m.config.hidden, conv)


def test_head_output_keeps_the_authors_size():
    m = model("head")
    assert m.layers[0].specific["video"].head is not None
    assert m.club_dims()["L1_video"][1] == 4  # the input channels


def test_reconstruction_trains_the_map_output_before_layer_2_is_on():
    """With layer 2 off and CLUB weight 0, only reconstruction reaches y: the head gets no gradient, the map does."""
    grads = {}
    for mode in ("head", "map"):
        m = model(mode)
        m.config.weights.mi = 0.0
        fitter = build_mi_fitter(m)
        total, _ = m.loss(m(batch()), fitter.estimator, layer2_weight=0.0)
        total.backward()
        encoder = m.layers[0].specific["video"]
        grads[mode] = encoder.convs[0].weight.grad.abs().sum()
        if mode == "head":
            assert all(p.grad is None or p.grad.abs().sum() == 0 for p in encoder.head.parameters())
    assert grads["map"] > 0 and grads["head"] > 0  # the conv stack learns through the decoder either way


def test_map_model_trains_and_round_trips_through_export(tmp_path):
    m = model("map")
    fitter, optimizer = build_mi_fitter(m), build_optimizer(m)
    for seed in range(2):
        train_step(m, fitter, optimizer, batch(seed=seed), layer2_weight=1.0)
    path = export_model(m, variant="srcid", config=m.config, input_shapes=SMALL_SHAPES, path=tmp_path / "m.safetensors")
    loaded, _ = load_model(path)
    assert loaded.config.video_specific == "map" and loaded.layers[0].specific["video"].head is None
    video = batch(seed=5).features["video"]
    a, b = m.encode(video, "video", layers=(1, 2)), loaded.encode(video, "video", layers=(1, 2))
    for x, y in zip(a.indices, b.indices):
        assert torch.equal(x, y)


def test_unknown_mode_is_a_one_line_error():
    config = model_config("tiny")
    config.video_specific = "pooled"
    with pytest.raises(SrcidError, match="video_specific='pooled': choose one of head, map"):
        config.validate()
