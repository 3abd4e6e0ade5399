"""The collapse check (``srcid inspect``): statistics against numpy on the same forward pass, collapse, bad input."""
import json
import math

import numpy as np
import pytest
import torch

import srcid.cli
from srcid.data.reader import ShardLoader
from srcid.eval.representations import representation_stats, to_markdown
from srcid.model import build_model_from_manifest, model_config
from srcid.model.export import export_model

pytestmark = pytest.mark.usefixtures("one_thread")


def batches(synth_dir, batch_size=24, count=2):
    loader = ShardLoader(synth_dir / "pretrain", "train", batch_size=batch_size, shuffle=False, tail="drop")
    return [b for _, b in zip(range(count), loader.epoch(0))]


def model_for(synth_dir, variant, seed=0):
    torch.manual_seed(seed)
    loader = ShardLoader(synth_dir / "pretrain", "train", batch_size=1)
    return build_model_from_manifest(variant, model_config("tiny"), loader.manifest)


def expected_stats(model, batch_list, live_std):
    """The same numbers from the forward outputs, concatenated and computed with numpy in float64."""
    model.eval()
    collected = {}
    with torch.no_grad():
        for batch in batch_list:
            out = model(batch)
            for k, layer in enumerate(out.layers, start=1):
                for m in out.modalities:
                    keep = layer.masks.get(m)
                    keep = np.ones(layer.indices[m].shape[:2], bool) if keep is None else keep.numpy()
                    keep = keep.reshape(-1)
                    rows = lambda t: t.reshape(t.shape[0] * t.shape[1], -1).double().numpy()[keep]  # noqa: E731
                    parts = collected.setdefault((k, m), {"y": [], "t": [], "r": [], "i": []})
                    parts["y"].append(rows(layer.specific[m]))
                    parts["t"].append(rows(layer.targets[m]))
                    parts["r"].append(rows(layer.reconstructions[m]))
                    parts["i"].append(rows(layer.indices[m]))
    expected = {}
    for key, parts in collected.items():
        y, t, r, i = (np.concatenate(parts[n]) for n in "ytri")
        _, counts = np.unique(i, axis=0, return_counts=True)
        p = counts / counts.sum()
        y_std = y.std(0)
        mse = ((r - t) ** 2).mean()
        expected[key] = {
            "steps": y.shape[0], "distinct_codes": len(counts), "code_perplexity": math.exp(-(p * np.log(p)).sum()),
            "specific_std": y_std.mean(), "specific_live_dims": int((y_std > live_std).sum()),
            "target_std": t.std(0).mean(), "recon_mse": mse, "recon_relative": mse / t.var(0).mean(),
        }
    return expected


@pytest.mark.parametrize("variant", ["srcid", "dcid-rvq2"])
def test_stats_match_numpy(synth_dir, variant):
    model = model_for(synth_dir, variant)
    model.train()
    batch_list = batches(synth_dir)
    codebooks = [b.clone() for b in model.buffers()]
    step = model.steps.value
    stats = representation_stats(model, batch_list, live_std=0.05)
    assert model.training and model.steps.value == step  # mode restored, no step counted
    assert all(torch.equal(a, b) for a, b in zip(codebooks, model.buffers()))  # no codebook update
    expected = expected_stats(model, batch_list, live_std=0.05)
    assert [(s.layer, s.modality) for s in stats] == list(expected)
    assert len(stats) == 3 * len(model.layers)
    for s in stats:
        e = expected[(s.layer, s.modality)]
        assert s.steps == e["steps"] and s.distinct_codes == e["distinct_codes"]
        assert s.specific_live_dims == e["specific_live_dims"]
        for name in ("code_perplexity", "specific_std", "target_std", "recon_mse", "recon_relative"):
            assert getattr(s, name) == pytest.approx(e[name], rel=1e-6, abs=1e-9), (s.layer, s.modality, name)
    text = next(s for s in stats if s.modality == "text")
    audio = next(s for s in stats if s.modality == "audio")
    assert text.steps < audio.steps  # padded text steps are left out
    if variant == "dcid-rvq2":
        assert len(model.layers) == 1 and text.distinct_codes > 1


def test_constant_specific_output_is_collapsed(synth_dir):
    model = model_for(synth_dir, "srcid")
    linear = model.layers[0].specific["audio"].linear
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.fill_(0.5)  # y = relu(0.5): the same for every clip and step
    stats = {(s.layer, s.modality): s for s in representation_stats(model, batches(synth_dir, count=1))}
    l1, l2 = stats[(1, "audio")], stats[(2, "audio")]
    assert l1.collapsed and l1.specific_live_dims == 0 and l1.specific_std == pytest.approx(0.0, abs=1e-7)
    assert l2.target_std == pytest.approx(0.0, abs=1e-7) and l2.recon_relative is None  # layer 2 rebuilds a constant
    assert not stats[(1, "video")].collapsed
    table = to_markdown(list(stats.values()))
    assert "0 / 16 (collapsed)" in table.replace(str(l1.specific_dim), "16") and "| - |" in table


@pytest.fixture(scope="module")
def exported(synth_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    model = model_for(synth_dir, "srcid")
    export_model(model, variant="srcid", config=model.config, input_shapes=model.input_shapes,
                 path=run / "model.safetensors", extra={"step": 0})
    return run


def test_cli_prints_table_and_writes_json(exported, synth_dir, tmp_path, capsys):
    out = tmp_path / "inspect.json"
    rc = srcid.cli.main(["inspect", "--run", str(exported), "--data", str(synth_dir / "pretrain"), "--clips", "50",
                         "--batch-size", "20", "--json", str(out), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "40 clips" in printed and "| 2 | text |" in printed
    data = json.loads(out.read_text())
    assert data["clips"] == 40 and data["split"] == "train" and len(data["stats"]) == 6
    assert {"layer", "modality", "distinct_codes", "specific_live_dims", "recon_relative", "collapsed"} <= set(data["stats"][0])


@pytest.mark.parametrize("args, message", [
    (["--split", "nope"], "nope"),
    (["--clips", "0"], "--clips 0"),
    (["--live-std", "0"], "--live-std 0"),
    (["--data-folder", "ave"], "declares no text modality"),
    (["--run-missing"], "no such run directory"),
])
def test_cli_bad_input_is_one_line(exported, synth_dir, tmp_path, capsys, args, message):
    data, run = synth_dir / "pretrain", exported
    if args == ["--data-folder", "ave"]:
        data, args = synth_dir / "ave", []
    if args == ["--run-missing"]:
        run, args = tmp_path / "missing", []
    rc = srcid.cli.main(["inspect", "--run", str(run), "--data", str(data), "--device", "cpu", *args])
    err = capsys.readouterr().err
    assert rc != 0
    assert len(err.strip().splitlines()) == 1 and err.startswith("srcid: error:") and message in err
