"""The synthetic default datasets: layout, shapes, labels, determinism and what a linear probe sees."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers_data import read_split
from srcid.data import synth
from srcid.data.manifest import load_manifest
from srcid.errors import SrcidError

REPO = Path(__file__).resolve().parents[1]
TINY = synth.PRESETS["tiny"]




@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    return out, synth.synthesize("tiny", out, seed=3)


def test_tiny_writes_six_valid_datasets(tiny):
    out, paths = tiny
    assert paths == [out / name / "dataset.json" for name in synth.DATASETS]
    world_classes = synth.class_names(TINY.num_classes)
    expected_modalities = {
        "pretrain": {"audio", "video", "text"}, "ave": {"audio", "video"}, "avvp": {"audio", "video"},
        "ave_avvp": {"audio", "video"}, "ucf_vgg": {"audio", "video"}, "retrieval": {"audio", "video", "text"},
    }
    expected_classes = {"pretrain": 8, "ave": 6, "avvp": 6, "ave_avvp": 4, "ucf_vgg": 4, "retrieval": 8}
    for name in synth.DATASETS:
        manifest = load_manifest(out / name)
        assert set(manifest.modalities) == expected_modalities[name]
        assert {s: i.samples for s, i in manifest.splits.items()} == TINY.splits[name]
        assert len(manifest.classes) == expected_classes[name] and set(manifest.classes) <= set(world_classes)
        assert "background" not in manifest.classes
        assert sum(i.shards for i in manifest.splits.values()) >= 2
    assert load_manifest(out / "pretrain").classes == world_classes
    shared = set(load_manifest(out / "ave_avvp").classes)
    assert shared <= set(load_manifest(out / "ave").classes) and shared <= set(load_manifest(out / "avvp").classes)
    assert load_manifest(out / "pretrain").tasks == ["pretrain"]
    assert load_manifest(out / "ave_avvp").tasks == ["classification", "localization"]
    assert load_manifest(out / "retrieval").tasks == ["retrieval"]


def test_tiny_samples_match_their_manifest(tiny):
    out, _ = tiny
    shapes = {"audio": (10, 16), "video": (10, 5, 5, 24)}
    for name in synth.DATASETS:
        manifest = load_manifest(out / name)
        for split in manifest.splits:
            token_counts = set()
            for key, rec in read_split(out / name, split).items():
                meta = rec["meta.json"]
                carried = {m.split(".")[0] for m in rec if m.endswith(".npy")}
                if name == "ucf_vgg":
                    assert carried == ({"video"} if split.startswith("ucf") else {"audio"})
                else:
                    assert carried == set(manifest.modalities)
                for m in carried:
                    array = rec[f"{m}.npy"]
                    assert array.dtype == np.float32 and np.isfinite(array).all()
                    if m == "text":
                        assert array.ndim == 2 and array.shape[1] == 32
                        token_counts.add(array.shape[0])
                        assert len(meta["caption"].split()) == array.shape[0]
                    else:
                        assert array.shape == shapes[m]
                label = meta["label"]
                assert label is None or 0 <= label < manifest.num_classes
                assert set(meta["segments"]) == carried - {"text"}
                for segs in meta["segments"].values():
                    assert len(segs) == 10 and all(0 <= c < manifest.num_classes for s in segs for c in s)
                if label is not None:  # one event class over a contiguous run of segments
                    for segs in meta["segments"].values():
                        on = [t for t, s in enumerate(segs) if s]
                        assert on == list(range(on[0], on[-1] + 1)) and all(s == [label] for s in segs if s)
            if "text" in manifest.modalities:
                assert len(token_counts) >= 3  # sentence lengths vary


def test_avvp_audio_and_video_segments_differ(tiny):
    out, _ = tiny
    differ = audio_only = video_only = overlap = 0
    for rec in read_split(out / "avvp", "train").values():
        segs = rec["meta.json"]["segments"]
        assert rec["meta.json"]["label"] is None
        differ += segs["audio"] != segs["video"]
        audio_only += any(set(a) - set(v) for a, v in zip(segs["audio"], segs["video"]))
        video_only += any(set(v) - set(a) for a, v in zip(segs["audio"], segs["video"]))
        overlap += any(len(s) > 1 for s in segs["audio"] + segs["video"])
    assert differ > 10 and audio_only > 5 and video_only > 5 and overlap > 5


def test_deterministic_for_a_seed(tiny, tmp_path):
    out, _ = tiny
    again = tmp_path / "again"
    synth.synthesize("tiny", again, seed=3)
    other = tmp_path / "other"
    synth.synthesize("tiny", other, seed=4)
    for name, split in (("ave", "train"), ("pretrain", "val"), ("ucf_vgg", "vgg_test")):
        a, b, c = read_split(out / name, split), read_split(again / name, split), read_split(other / name, split)
        assert list(a) == list(b)
        for key in a:
            assert a[key]["meta.json"] == b[key]["meta.json"]
            for member in a[key]:
                if member.endswith(".npy"):
                    np.testing.assert_array_equal(a[key][member], b[key][member])
        key = next(iter(a))
        assert not np.array_equal(a[key]["audio.npy" if "audio.npy" in a[key] else "video.npy"],
                                  c[key]["audio.npy" if "audio.npy" in c[key] else "video.npy"])
    assert (out / "ave" / "dataset.json").read_bytes() == (again / "ave" / "dataset.json").read_bytes()


def test_video_events_sit_at_varying_places(tiny):
    out, _ = tiny
    places = set()
    for rec in read_split(out / "ave", "train").values():
        segs = rec["meta.json"]["segments"]["video"]
        event = [t for t, s in enumerate(segs) if s]
        quiet = [t for t, s in enumerate(segs) if not s]
        if not quiet:
            continue
        video = rec["video.npy"].astype(np.float64)
        change = np.linalg.norm(video[event].mean(0) - video[quiet].mean(0), axis=-1)  # [H, W]
        places.add(int(change.argmax()))
    assert len(places) >= 8


def _ridge_probe(x_train, y_train, x_test, y_test, classes, lam=1.0):
    """Accuracy of a one-vs-all least-squares linear probe (float64, standardized inputs)."""
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    a = np.c_[(x_train - mu) / sd, np.ones(len(x_train))]
    w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ np.eye(classes)[y_train])
    b = np.c_[(x_test - mu) / sd, np.ones(len(x_test))]
    return float(((b @ w).argmax(1) == y_test).mean())


def test_linear_probe_within_a_modality_but_not_across(tmp_path):
    splits = {name: dict.fromkeys(s, 8) for name, s in TINY.splits.items()}
    splits["pretrain"] = {"train": 560, "val": 240}
    preset = dataclasses.replace(TINY, name="probe", splits=splits)
    synth.synthesize(preset, tmp_path, seed=0)
    train, test = read_split(tmp_path / "pretrain", "train"), read_split(tmp_path / "pretrain", "val")

    def pooled(records, modality):  # mean over time (and the video grid, and text tokens)
        return np.stack([r[f"{modality}.npy"].astype(np.float64).reshape(-1, r[f"{modality}.npy"].shape[-1]).mean(0)
                         for r in records.values()])

    y_train = np.array([r["meta.json"]["label"] for r in train.values()])
    y_test = np.array([r["meta.json"]["label"] for r in test.values()])
    chance = 1 / 8
    feats = {m: (pooled(train, m), pooled(test, m)) for m in ("audio", "video", "text")}
    assert len({f[0].shape[1] for f in feats.values()}) == 3  # a real modality gap: sizes differ
    for m, (x_train, x_test) in feats.items():
        assert _ridge_probe(x_train, y_train, x_test, y_test, 8) > chance + 0.2, m
    for source, target in (("audio", "video"), ("audio", "text"), ("video", "audio"), ("text", "video")):
        d = min(feats[source][0].shape[1], feats[target][0].shape[1])
        accuracy = _ridge_probe(feats[source][0][:, :d], y_train, feats[target][1][:, :d], y_test, 8)
        assert accuracy < chance + 0.12, (source, target, accuracy)


def test_presets_follow_the_paper_setting():
    paper = synth.PRESETS["paper"]
    assert (paper.audio_dim, paper.video_grid, paper.video_dim, paper.text_dim) == (128, 7, 512, 768)
    assert (paper.num_classes, paper.ave_classes, paper.avvp_classes, paper.shared_classes, paper.ucf_vgg_classes) == (141, 28, 25, 12, 16)
    assert sum(paper.splits["pretrain"].values()) == 40000 and paper.dtype == "float16"
    small = synth.PRESETS["small"]
    assert (small.audio_dim, small.video_grid, small.video_dim, small.text_dim, small.dtype) == (64, 7, 64, 96, "float16")
    names = synth.class_names(synth.MAX_CLASSES)
    assert len(set(names)) == len(names) == synth.MAX_CLASSES >= 141
    with pytest.raises(SrcidError, match="unknown preset 'huge'"):
        synth.synthesize("huge", "unused")


def test_cli_synth(tmp_path):
    done = subprocess.run([sys.executable, "-m", "srcid.cli", "data", "synth", "--preset", "tiny", "--out", str(tmp_path), "--seed", "1"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"wrote {tmp_path / name / 'dataset.json'}" for name in synth.DATASETS]
