"""The collapse check (``srcid inspect``): statistics against numpy on the same forward pass, each kind of
collapse (codebook, dead y, dead units), the code-usage PNG, bad input."""
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from helpers_model import layer_outputs
import srcid.cli
from srcid.data.reader import ShardLoader
from srcid.eval.representations import (
    LIVE_REL, codebook_size, hidden_relu_module, plot_code_usage, representation_stats, to_markdown,
)
from srcid.model import build_model_from_manifest, model_config
from srcid.model.encoders import VectorSpecificEncoder, VideoSpecificEncoder
from srcid.model.export import export_model

pytestmark = pytest.mark.usefixtures("one_thread")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def batches(synth_dir, batch_size=24, count=2):
    loader = ShardLoader(synth_dir / "pretrain", "train", batch_size=batch_size, shuffle=False, tail="drop")
    return [b for _, b in zip(range(count), loader.epoch(0))]


def model_for(synth_dir, variant, seed=0):
    """A tiny model; a ``-map`` / ``-head`` suffix sets ``video_specific`` (otherwise the default, "map")."""
    torch.manual_seed(seed)
    loader = ShardLoader(synth_dir / "pretrain", "train", batch_size=1)
    config = model_config("tiny")
    for mode in ("map", "head"):
        if variant.endswith("-" + mode):
            variant, config.video_specific = variant[: -len(mode) - 1], mode
    return build_model_from_manifest(variant, config, loader.manifest)


def _hidden_activations(encoder, target):
    """The hidden pre-activations feeding y ``[B*T, units]``, recomputed from the encoder's input without hooks."""
    if isinstance(encoder, VectorSpecificEncoder):
        return None  # y = relu(linear(x)): y's own units, read from the forward output
    b, t, h, w, c = target.shape
    maps = encoder.convs(target.reshape(b * t, h, w, c).permute(0, 3, 1, 2))
    if encoder.head is None:  # video "map": a channel fires where any cell of its (ReLU'd) map is positive
        return maps.amax(dim=(2, 3))
    return encoder.head[0](maps.mean(dim=(2, 3)))


def expected_stats(model, batch_list, *, live_rel=LIVE_REL, live_std=None, collapse_codes=2):
    """The same numbers from the forward outputs, concatenated and computed with numpy in float64."""
    collected = {}
    with torch.no_grad():  # _hidden_activations runs modules outside the forward pass
        for _, k, m, layer, real in layer_outputs(model, batch_list):
            keep = real.reshape(-1)
            rows = lambda t: t.reshape(t.shape[0] * t.shape[1], -1).double().numpy()[keep]  # noqa: E731
            parts = collected.setdefault((k, m), {"y": [], "t": [], "r": [], "i": [], "h": []})
            parts["y"].append(rows(layer.specific[m]))
            parts["t"].append(rows(layer.targets[m]))
            parts["r"].append(rows(layer.reconstructions[m]))
            parts["i"].append(rows(layer.indices[m]))
            hidden = _hidden_activations(model.layers[k - 1].specific[m], layer.targets[m])
            parts["h"].append(parts["y"][-1] if hidden is None else hidden.double().numpy()[keep])
    expected = {}
    for key, parts in collected.items():
        y, t, r, i, h = (np.concatenate(parts[n]) for n in "ytrih")
        _, counts = np.unique(i, axis=0, return_counts=True)
        p = counts / counts.sum()
        y_std = y.std(0)
        mse = ((r - t) ** 2).mean()
        size = codebook_size(model.layers[key[0] - 1].quantizer)
        stage_codes = [len(np.unique(i[:, s])) for s in range(i.shape[1])]
        threshold = live_std if live_std is not None else live_rel * t.std(0).mean()
        fired = (h > 0).any(0)
        expected[key] = {
            "steps": y.shape[0], "distinct_codes": len(counts), "code_perplexity": math.exp(-(p * np.log(p)).sum()),
            "specific_std": y_std.mean(), "specific_live_dims": int((y_std > threshold).sum()),
            "target_std": t.std(0).mean(), "recon_mse": mse, "recon_relative": mse / t.var(0).mean(),
            "live_threshold": threshold, "stage_distinct_codes": stage_codes,
            "codebook_fraction": np.mean(stage_codes) / size, "collapsed_codebook": len(counts) <= collapse_codes,
            "hidden_units": fired.size, "dead_units": int((~fired).sum()), "dead_unit_fraction": (~fired).mean(),
            "code_counts": sorted(counts.tolist(), reverse=True),
        }
    return expected


def check_against_numpy(stats, expected):
    assert [(s.layer, s.modality) for s in stats] == list(expected)
    for s in stats:
        e = expected[(s.layer, s.modality)]
        for name in ("steps", "distinct_codes", "specific_live_dims", "stage_distinct_codes", "collapsed_codebook",
                     "hidden_units", "dead_units", "code_counts"):
            assert getattr(s, name) == e[name], (s.layer, s.modality, name)
        for name in ("code_perplexity", "specific_std", "target_std", "recon_mse", "recon_relative", "live_threshold",
                     "codebook_fraction", "dead_unit_fraction"):
            assert getattr(s, name) == pytest.approx(e[name], rel=1e-6, abs=1e-9), (s.layer, s.modality, name)


@pytest.mark.parametrize("variant", ["srcid", "srcid-head", "dcid-rvq2", "dcid-fsq"])
def test_stats_match_numpy(synth_dir, variant):
    model = model_for(synth_dir, variant)
    model.train()
    batch_list = batches(synth_dir)
    codebooks = [b.clone() for b in model.buffers()]
    step = model.steps.value
    stats = representation_stats(model, batch_list, live_rel=0.05)
    assert model.training and model.steps.value == step  # mode restored, no step counted
    assert all(torch.equal(a, b) for a, b in zip(codebooks, model.buffers()))  # no codebook update
    assert all(not m._forward_hooks for m in model.modules())  # the hooks are gone
    expected = expected_stats(model, batch_list, live_rel=0.05)
    assert len(stats) == 3 * len(model.layers)
    check_against_numpy(stats, expected)
    text = next(s for s in stats if s.modality == "text")
    audio = next(s for s in stats if s.modality == "audio")
    assert text.steps < audio.steps  # padded text steps are left out
    quantizer = model.layers[0].quantizer
    if variant == "dcid-rvq2":
        assert len(model.layers) == 1 and text.distinct_codes > 1
        assert len(audio.stage_distinct_codes) == 2 and audio.codebook_size == quantizer.books[0].num_codes
    elif variant == "dcid-fsq":
        assert audio.codebook_size == math.prod(model.config.quantizer.fsq_levels)
    else:
        assert audio.codebook_size == quantizer.num_codes == model.config.quantizer.codebook_size
    # the hidden units: y's own for vectors, the head's hidden layer for video
    assert audio.hidden_units == audio.specific_dim
    video = next(s for s in stats if s.modality == "video")
    encoder = model.layers[0].specific["video"]
    if model.config.video_specific == "map":  # the pooled map is y: its channels are the units
        assert encoder.head is None and video.hidden_units == video.specific_dim == model.config.video_conv
    else:
        assert video.hidden_units == encoder.head[0].out_features


def test_absolute_live_threshold_overrides_the_relative_one(synth_dir):
    model = model_for(synth_dir, "srcid")
    batch_list = batches(synth_dir, count=1)
    stats = representation_stats(model, batch_list, live_std=0.02)
    assert all(s.live_threshold == 0.02 for s in stats)
    check_against_numpy(stats, expected_stats(model, batch_list, live_std=0.02))


def test_relative_threshold_follows_the_target_scale(synth_dir):
    """Layer 1's audio y scaled by s (its weights and bias) and layer 2's audio bias scaled by s scale layer 2's
    target and y alike (relu is positively homogeneous): layer 2's live dimensions stay under the relative
    threshold and vanish under an absolute one; layer 1's y, shrunk against unchanged features, is dead."""
    model = model_for(synth_dir, "srcid")
    batch_list = batches(synth_dir, count=1)
    before = {(s.layer, s.modality): s for s in representation_stats(model, batch_list)}
    scale = 1e-4
    with torch.no_grad():
        first = model.layers[0].specific["audio"].linear
        first.weight.mul_(scale)
        first.bias.mul_(scale)
        model.layers[1].specific["audio"].linear.bias.mul_(scale)
    after = {(s.layer, s.modality): s for s in representation_stats(model, batch_list)}
    l2_before, l2_after = before[(2, "audio")], after[(2, "audio")]
    assert l2_after.target_std == pytest.approx(scale * l2_before.target_std, rel=1e-3)
    assert l2_after.specific_std == pytest.approx(scale * l2_before.specific_std, rel=1e-3)
    assert l2_after.specific_live_dims == l2_before.specific_live_dims > 0
    assert before[(1, "audio")].specific_live_dims > 0 and after[(1, "audio")].dead_specific
    absolute = {(s.layer, s.modality): s for s in representation_stats(model, batch_list, live_std=0.01)}
    assert absolute[(2, "audio")].dead_specific


def test_constant_specific_output_is_dead(synth_dir):
    model = model_for(synth_dir, "srcid")
    linear = model.layers[0].specific["audio"].linear
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.fill_(0.5)  # y = relu(0.5): the same for every clip and step
    stats = {(s.layer, s.modality): s for s in representation_stats(model, batches(synth_dir, count=1))}
    l1, l2 = stats[(1, "audio")], stats[(2, "audio")]
    assert l1.dead_specific and l1.collapsed and l1.specific_live_dims == 0 and l1.specific_std == 0.0
    assert "dead y" in l1.flags and l1.dead_units == 0  # every unit fires (0.5 > 0): dead y, no dead units
    assert l2.target_std == 0.0 and l2.recon_relative is None  # layer 2 rebuilds a constant
    assert l2.dead_specific  # computed from a constant: nothing in it can be live
    assert not stats[(1, "video")].dead_specific
    table = to_markdown(list(stats.values()))
    row = next(line for line in table.splitlines() if line.startswith("| 1 | audio |"))
    assert f"| 0 / {l1.specific_dim} |" in row and row.endswith("dead y |")
    assert "| - |" in next(line for line in table.splitlines() if line.startswith("| 2 | audio |"))


def test_single_code_codebook_is_collapsed(synth_dir):
    model = model_for(synth_dir, "srcid")
    batch_list = batches(synth_dir, count=1)
    book = model.layers[0].quantizer.book
    with torch.no_grad():
        book.codebook.copy_(book.codebook[0].expand_as(book.codebook))  # every row equal: every step gets code 0
    stats = representation_stats(model, batch_list)
    check_against_numpy(stats, expected_stats(model, batch_list))
    layer1 = [s for s in stats if s.layer == 1]
    for s in layer1:
        assert s.distinct_codes == 1 and s.collapsed_codebook and "collapsed codebook" in s.flags
        assert s.codebook_fraction == pytest.approx(1 / book.num_codes) and s.code_perplexity == pytest.approx(1.0)
    assert not any(s.collapsed_codebook for s in stats if s.layer == 2 and s.distinct_codes > 2)
    # the threshold is --collapse-codes: with 0 nothing is flagged
    assert not any(s.collapsed_codebook for s in representation_stats(model, batch_list, collapse_codes=0))
    table = to_markdown(stats)
    assert "collapsed codebook" in next(line for line in table.splitlines() if line.startswith("| 1 | video |"))


def test_single_code_fsq_is_collapsed(synth_dir):
    model = model_for(synth_dir, "dcid-fsq")
    with torch.no_grad():
        model.layers[0].quantizer.project_in.weight.zero_()  # every step projects to the bias: one code
    stats = representation_stats(model, batches(synth_dir, count=1))
    levels = math.prod(model.config.quantizer.fsq_levels)
    assert all(s.collapsed_codebook and s.distinct_codes == 1 and s.codebook_size == levels for s in stats)


def test_dead_units_from_negative_biases(synth_dir):
    model = model_for(synth_dir, "srcid-head")
    batch_list = batches(synth_dir, count=1)
    layer = model.layers[0]
    with torch.no_grad():
        layer.specific["audio"].linear.bias[:5] = -1e4  # five of y's units never fire
        layer.specific["video"].head[0].bias[:3] = -1e4  # three hidden units of the video head never fire
    stats = {(s.layer, s.modality): s for s in representation_stats(model, batch_list)}
    check_against_numpy(list(stats.values()), expected_stats(model, batch_list))
    audio, video = stats[(1, "audio")], stats[(1, "video")]
    assert audio.dead_units >= 5 and audio.dead_unit_fraction == audio.dead_units / audio.specific_dim
    assert video.dead_units >= 3 and video.hidden_units == layer.specific["video"].head[0].out_features
    assert f"{audio.dead_units} / {audio.hidden_units}" in to_markdown(list(stats.values()))


def test_dead_units_leave_padded_text_steps_out(synth_dir):
    """A unit that fires only on padded text steps (where the front end outputs 0 and the unit gets its bias)
    is dead."""
    model = model_for(synth_dir, "srcid")
    batch_list = batches(synth_dir, count=1)
    with torch.no_grad():
        for lstm in [*model.text_frontend.forward_lstms, *model.text_frontend.backward_lstms]:
            lstm.weight_ih_l0.zero_()
            lstm.weight_hh_l0.zero_()
            lstm.bias_ih_l0.fill_(10.0)  # every gate open, the cell input 1: every real output in (0.76, 1)
        linear = model.layers[0].specific["text"].linear
        linear.weight[:4] = -1.0  # real steps: -sum(x) + 1 < 0; padded steps (x = 0): 1 > 0
        linear.bias[:4] = 1.0
        linear.bias[4:] = 1e4  # the others fire everywhere
    assert not bool(batch_list[0].masks["text"].all())  # there are padded steps
    stats = {(s.layer, s.modality): s for s in representation_stats(model, batch_list)}
    check_against_numpy(list(stats.values()), expected_stats(model, batch_list))
    assert stats[(1, "text")].dead_units == 4


def test_specific_encoder_without_hidden_relu_gives_no_dead_units(synth_dir):
    class TanhEncoder(nn.Module):
        def __init__(self, in_dim, out_dim):
            super().__init__()
            self.proj, self.out_dim = nn.Linear(in_dim, out_dim), out_dim

        def forward(self, x):
            y = torch.tanh(self.proj(x))
            return y, y

    model = model_for(synth_dir, "srcid-head")
    old = model.layers[0].specific["audio"]
    model.layers[0].specific["audio"] = TanhEncoder(old.linear.in_features, old.out_dim)
    assert hidden_relu_module(model.layers[0].specific["audio"]) is None
    assert isinstance(hidden_relu_module(model.layers[0].specific["video"]), nn.ReLU)
    assert isinstance(model.layers[0].specific["video"], VideoSpecificEncoder)
    stats = {(s.layer, s.modality): s for s in representation_stats(model, batches(synth_dir, count=1))}
    s = stats[(1, "audio")]
    assert s.hidden_units is None and s.dead_units is None and s.dead_unit_fraction is None
    assert stats[(1, "video")].hidden_units is not None
    row = next(line for line in to_markdown(list(stats.values())).splitlines() if line.startswith("| 1 | audio |"))
    assert row.split("|")[10].strip() == "-"  # the dead units column
    assert json.dumps(s.to_json(), allow_nan=False)


def test_code_usage_plot_is_a_png(synth_dir, tmp_path):
    from matplotlib.image import imread

    model = model_for(synth_dir, "dcid-rvq2")
    stats = representation_stats(model, batches(synth_dir, count=1))
    path = plot_code_usage(stats, tmp_path / "sub" / "codes.png", title="a title")
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = imread(path)
    assert image.shape[0] >= 200 and image.shape[1] >= 600
    assert sorted(p.name for p in path.parent.iterdir()) == ["codes.png"]  # no temporary file left


@pytest.fixture(scope="module")
def exported(synth_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    model = model_for(synth_dir, "srcid")
    export_model(model, variant="srcid", config=model.config, input_shapes=model.input_shapes,
                 path=run / "model.safetensors", extra={"step": 0})
    return run


def inspect_cli(exported, synth_dir, *args):
    return srcid.cli.main(["inspect", "--run", str(exported), "--data", str(synth_dir / "pretrain"), "--clips", "50",
                           "--batch-size", "20", "--device", "cpu", *map(str, args)])


def test_cli_prints_table_and_writes_json_and_plot(exported, synth_dir, tmp_path, capsys):
    out = tmp_path / "inspect.json"
    rc = inspect_cli(exported, synth_dir, "--json", out, "--collapse-codes", 3, "--live-rel", 0.02)
    printed = capsys.readouterr().out
    assert rc == 0
    assert "50 clips" in printed and "| 2 | text |" in printed and "codebook used" in printed
    plot = tmp_path / "inspect-codes.png"
    assert plot.read_bytes()[:8] == PNG_SIGNATURE and f"wrote {plot}" in printed
    data = json.loads(out.read_text())
    assert data["clips"] == 50 and data["split"] == "train" and len(data["stats"]) == 6
    assert data["live_rel"] == 0.02 and data["live_std"] is None and data["collapse_codes"] == 3
    assert data["plot"] == str(plot)
    first = data["stats"][0]
    assert {"layer", "modality", "distinct_codes", "specific_live_dims", "recon_relative", "collapsed",
            "codebook_size", "codebook_fraction", "stage_distinct_codes", "collapsed_codebook", "live_threshold",
            "hidden_units", "dead_units", "dead_unit_fraction", "dead_specific", "flags"} <= set(first)
    assert "code_counts" not in first
    assert first["live_threshold"] == pytest.approx(0.02 * first["target_std"])
    flagged = [(s["layer"], s["modality"], s["flags"]) for s in data["stats"] if s["flags"]]
    assert [(f["layer"], f["modality"], f["flags"]) for f in data["flagged"]] == flagged
    assert all(s["collapsed_codebook"] == (s["distinct_codes"] <= 3) for s in data["stats"])


def test_cli_plot_option_and_no_plot_without_it(exported, synth_dir, tmp_path, capsys):
    plot = tmp_path / "usage.png"
    assert inspect_cli(exported, synth_dir, "--plot", plot) == 0
    assert plot.read_bytes()[:8] == PNG_SIGNATURE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["usage.png"]
    plain = tmp_path / "plain"
    plain.mkdir()
    assert inspect_cli(exported, synth_dir, "--live-std", 0.01) == 0  # neither --json nor --plot: no file
    assert "std > 0.01)" in capsys.readouterr().out and not any(plain.iterdir())


@pytest.mark.parametrize("args, message", [
    (["--split", "nope"], "nope"),
    (["--clips", "0"], "--clips 0"),
    (["--live-std", "0"], "--live-std 0"),
    (["--live-rel", "0"], "--live-rel 0"),
    (["--live-rel", "-0.5"], "--live-rel -0.5"),
    (["--live-rel", "nan"], "--live-rel nan"),
    (["--live-rel", "0.1", "--live-std", "0.1"], "give one"),
    (["--collapse-codes", "0"], "--collapse-codes 0"),
    (["--collapse-codes", "-2"], "--collapse-codes -2"),
    (["--plot-folder"], "is a folder"),
    (["--data-folder", "ave"], "declares no text modality"),
    (["--run-missing"], "no such run directory"),
])
def test_cli_bad_input_is_one_line(exported, synth_dir, tmp_path, capsys, args, message):
    data, run = synth_dir / "pretrain", exported
    if args == ["--data-folder", "ave"]:
        data, args = synth_dir / "ave", []
    if args == ["--run-missing"]:
        run, args = tmp_path / "missing", []
    if args == ["--plot-folder"]:
        args = ["--plot", str(tmp_path)]
    rc = srcid.cli.main(["inspect", "--run", str(run), "--data", str(data), "--device", "cpu", *args])
    err = capsys.readouterr().err
    assert rc != 0
    assert len(err.strip().splitlines()) == 1 and err.startswith("srcid: error:") and message in err
