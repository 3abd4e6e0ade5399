"""Collapse seen while training (the monitor, then a real run), and the input statistics a run fits."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers_data import assert_input_statistics_of_split
from helpers_model import evaluation_codes_of_split
from srcid.errors import SrcidError
from srcid.train.collapse import CollapseConfig, CollapseMonitor

REPO = Path(__file__).resolve().parents[1]


def scalars(codes=40.0, y=0.5, target=1.0, layer=1, modality="audio"):
    return {f"L{layer}/codes/{modality}": codes, f"L{layer}/y_std/{modality}": y, f"L{layer}/target_std/{modality}": target,
            "loss": 1.0}


def test_a_condition_is_reported_once_after_patience_and_its_recovery_once():
    monitor = CollapseMonitor(CollapseConfig(max_codes=2, min_y_rel=0.01, patience=20))
    assert monitor.observe(10, scalars()) == []
    assert monitor.observe(20, scalars(codes=2.0)) == []  # starts holding at 20
    assert monitor.observe(30, scalars(codes=1.0)) == []
    events = monitor.observe(40, scalars(codes=1.0))
    assert [name for name, _ in events] == ["collapse"]
    info = events[0][1]
    assert info["kind"] == "codebook" and info["layer"] == 1 and info["modality"] == "audio" and info["since"] == 20
    assert "layer 1 audio" in info["message"] and "since step 20" in info["message"]
    assert monitor.observe(50, scalars(codes=1.0)) == []  # once
    events = monitor.observe(60, scalars(codes=30.0))
    assert [name for name, _ in events] == ["collapse_recovered"]
    assert monitor.observe(70, scalars(codes=1.0)) == []  # a new run of the condition starts over


def test_a_gap_restarts_the_patience():
    monitor = CollapseMonitor(CollapseConfig(patience=20))
    monitor.observe(10, scalars(codes=1.0))
    monitor.observe(20, scalars(codes=5.0))
    assert monitor.observe(30, scalars(codes=1.0)) == [] and monitor.observe(40, scalars(codes=1.0)) == []
    assert [n for n, _ in monitor.observe(50, scalars(codes=1.0))] == ["collapse"]


def test_flat_specific_output_is_relative_to_the_target_spread():
    monitor = CollapseMonitor(CollapseConfig(min_y_rel=0.01, patience=0))
    # the same y std is flat against a large target and alive against a small one
    assert [i["kind"] for _, i in monitor.observe(1, scalars(y=0.05, target=10.0, layer=2, modality="video"))] == ["specific"]
    other = CollapseMonitor(CollapseConfig(min_y_rel=0.01, patience=0))
    assert other.observe(1, scalars(y=0.05, target=1.0, layer=2, modality="video")) == []


def test_state_survives_a_resume_and_a_disabled_monitor_is_silent():
    monitor = CollapseMonitor(CollapseConfig(patience=10))
    monitor.observe(10, scalars(codes=1.0))
    again = CollapseMonitor(CollapseConfig(patience=10))
    again.load_state_dict(json.loads(json.dumps(monitor.state_dict())))
    assert [n for n, _ in again.observe(20, scalars(codes=1.0))] == ["collapse"]
    assert CollapseMonitor(CollapseConfig(enabled=False, patience=0)).observe(1, scalars(codes=0.0)) == []


def test_a_few_codes_of_a_large_codebook_count_as_collapsed():
    """The relative bound: 6 codes per step of a 128-code codebook is collapse (0.05 * 128 = 6.4), 7 is not;
    a layer without a learned codebook (no size given) keeps the absolute bound."""
    config = CollapseConfig(max_codes=2, max_codes_frac=0.05, patience=0)
    monitor = CollapseMonitor(config, codebook_sizes={1: 128})
    assert monitor.codes_bound(1) == pytest.approx(6.4) and monitor.codes_bound(2) == 2.0
    events = monitor.observe(1, scalars(codes=6.0))
    assert [(n, i["kind"], i["bound"]) for n, i in events] == [("collapse", "codebook", pytest.approx(6.4))]
    assert CollapseMonitor(config, codebook_sizes={1: 128}).observe(1, scalars(codes=7.0)) == []
    assert CollapseMonitor(config, codebook_sizes={1: 128}).observe(1, scalars(codes=6.0, layer=2)) == []
    assert CollapseMonitor(CollapseConfig(max_codes=2, max_codes_frac=0.0, patience=0),
                           codebook_sizes={1: 128}).observe(1, scalars(codes=6.0)) == []


@pytest.mark.parametrize("variant,sizes", [("srcid", {1: 16, 2: 16}), ("dcid-rvq2", {1: 16}), ("dcid-fsq", {})])
def test_the_trainer_gives_the_monitor_each_learned_codebook_size(variant, sizes):
    from srcid.model.config import model_config
    from srcid.model.variants import build_model
    from srcid.train.trainer import learned_codebook_sizes

    config = model_config("tiny")
    config.quantizer.codebook_size = 16
    model = build_model(variant, config, {"audio": (10, 6), "video": (10, 5, 5, 4), "text": (None, 7)})
    assert learned_codebook_sizes(model) == sizes


@pytest.mark.parametrize("key,value", [("max_codes", -1), ("min_y_rel", -0.1), ("patience", -5), ("max_codes_frac", 1.5)])
def test_bad_settings_are_one_line_errors(key, value):
    with pytest.raises(SrcidError, match=f"collapse.{key}"):
        CollapseConfig(**{key: value}).validate()


@pytest.fixture(scope="module")
def forced_run(synth_dir, tmp_path_factory):
    """A real tiny run where every layer and modality counts as collapsed (max_codes above the codebook size)."""
    out = tmp_path_factory.mktemp("collapse") / "run"
    cmd = [sys.executable, str(REPO / "launcher" / "train.py"), "--model", "srcid", "--preset", "tiny",
           "--data", str(synth_dir / "pretrain"), "--out", str(out), "--max-steps", "8", "--quiet",
           "--set", "batch_size=32", "--set", "log_every=2", "--set", "collapse.max_codes=1000",
           "--set", "collapse.patience=2", "--set", "num_workers=0", "--set", "model.layer2_center=true"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stderr


def test_the_trainer_warns_and_writes_collapse_events(forced_run):
    out, stderr = forced_run
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    collapses = [e for e in events if e["name"] == "collapse"]
    seen = {(e["info"]["layer"], e["info"]["modality"]) for e in collapses if e["info"]["kind"] == "codebook"}
    assert seen == {(k, m) for k in (1, 2) for m in ("audio", "video", "text")}
    assert all(e["step"] == 4 and e["info"]["since"] == 2 for e in collapses if e["info"]["kind"] == "codebook")
    assert stderr.count("warning: layer ") == len(collapses)
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in ("L1/codes/audio", "L2/codes/text", "L1/y_std/video", "L1/target_std/video", "L2/y_std/audio"):
        assert key in header, key


def test_the_run_counts_its_codes_in_evaluation_mode_at_the_end(forced_run, synth_dir):
    """After the last step the trainer counts each layer's codes on the training clips in evaluation mode (the
    per-step counts include dropout noise): the same numbers as the exported model gives here, clip by clip,
    and a warning for each one at or below the (forced) collapse bound."""
    out, stderr = forced_run
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    final = [e for e in events if e["name"] == "final_code_use"]
    assert len(final) == 1 and final[0]["step"] == 8
    clips, codes, reading = evaluation_codes_of_split(out / "model.safetensors", synth_dir / "pretrain")
    assert final[0]["info"]["clips"] == clips == 224
    assert final[0]["info"]["codes"] == codes
    # the class read back from the codes on the held-out clips, as computed with Python dicts
    got = final[0]["info"]["class_from_codes"]
    assert got.keys() == reading.keys() and all(got[k].keys() == reading[k].keys() for k in reading)
    for layer, per in reading.items():
        for m, value in per.items():
            assert got[layer][m] == pytest.approx(value, abs=1e-12), (layer, m)
    assert all(0.0 < v < 1.0 for per in final[0]["info"]["class_most_frequent"].values() for v in per.values())
    everything = {(k, m) for k in (1, 2) for m in ("audio", "video", "text")}
    assert sorted(final[0]["info"]["collapsed"]) == sorted(f"L{k}/{m}" for k, m in everything)
    at_end = [e["info"] for e in events if e["name"] == "collapse" and e["info"]["kind"] == "codebook_at_end"]
    assert {(i["layer"], i["modality"]) for i in at_end} == everything
    assert all(i["bound"] == 1000 and i["value"] == codes[f"L{i['layer']}"][i["modality"]] for i in at_end)
    assert stderr.count("training clips in evaluation mode (<= 1e+03) at the end of training") == 6


def test_the_run_fits_input_statistics_over_the_whole_training_split(forced_run, synth_dir):
    out, _ = forced_run
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    stats = [e for e in events if e["name"] == "input_stats"]
    assert len(stats) == 1 and stats[0]["info"]["clips"] == 224
    weights = load_file(str(out / "model.safetensors"))
    assert float(weights["normalizer.fitted"]) == 1.0
    assert_input_statistics_of_split(weights, synth_dir / "pretrain")


def test_the_run_sets_layer2_centre_to_the_mean_under_the_final_weights(forced_run, synth_dir):
    """After the last step the centre holds the plain mean of layer 2's general features over the training split
    (224 clips, under 2000: all of it), computed here independently from the exported model in float64."""
    import torch

    from srcid.data.reader import ShardLoader
    from srcid.model.export import load_model

    out, _ = forced_run
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    calibrations = [e for e in events if e["name"] == "centre_calibration"]
    assert len(calibrations) == 1 and calibrations[0]["step"] == 8 and calibrations[0]["info"]["steps"] == 7
    model = load_model(out / "model.safetensors")[0].eval()
    layer = model.layers[1]
    raw = {m: [] for m in layer.centre.modalities}
    hooks = [layer.general[m].register_forward_hook(lambda mod, args, z, m=m: raw[m].append((z.double(), args[1])))
             for m in raw]
    loader = ShardLoader(synth_dir / "pretrain", "train", batch_size=50, shuffle=False,
                         modalities=tuple(model.input_shapes), tail="merge")
    with torch.no_grad():
        for batch in loader.epoch(0):
            model(batch)
    for h in hooks:
        h.remove()
    for i, m in enumerate(layer.centre.modalities):
        rows = torch.cat([z[mask] if mask is not None else z.reshape(-1, z.shape[-1]) for z, mask in raw[m]])
        assert rows.shape[0] >= 224 * 2
        torch.testing.assert_close(layer.centre.running_mean[i].double(), rows.mean(0), rtol=1e-4, atol=1e-5)
