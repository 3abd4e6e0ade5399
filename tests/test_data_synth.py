"""The synthetic default datasets: layout, shapes, labels, determinism and what a linear probe sees."""
import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers_data import read_split
from srcid import cli
from srcid.data import synth
from srcid.data.manifest import load_manifest
from srcid.errors import SrcidError

REPO = Path(__file__).resolve().parents[1]
TINY = synth.PRESETS["tiny"]

# The tiny preset with seed 3 as written before the realistic style existed (commit 33c8e32): the digest of
# _content_digest over all six datasets, and a few values of pretrain's first training clip.
STANDARD_TINY_SEED3_SHA256 = "c73b9ede151d92a873c3075e526b30fa64e524f16dbf2248cc49f88617baa11b"
STANDARD_TINY_SEED3_FIRST_CLIP = {
    "audio": [-0.167976975440979, 0.14818231761455536, 0.479094922542572, -1.209830403327942],  # audio[0, :4]
    "video": [-0.4597216248512268, -0.8715131282806396, -0.10091415047645569, -1.4752991199493408],  # video[0, 0, 0, :4]
    "text": [-2.0444538593292236, -0.20830635726451874, -0.6798838376998901, 1.255847454071045],  # text[0, :4]
}


def _content_digest(out) -> str:
    """SHA-256 of what the datasets under ``out`` hold: manifests, keys, arrays (dtype, shape, bytes) and metadata.

    Tar headers are left out (they carry the time of writing).
    """
    total = hashlib.sha256()
    for name in synth.DATASETS:
        h = hashlib.sha256()
        manifest = json.loads((Path(out) / name / "dataset.json").read_text())
        h.update(json.dumps(manifest, sort_keys=True).encode())
        for split in manifest["splits"]:
            for key, rec in read_split(Path(out) / name, split).items():
                h.update(key.encode())
                for member in sorted(rec):
                    value = rec[member]
                    h.update(member.encode())
                    if member == "meta.json":
                        h.update(json.dumps(value, sort_keys=True).encode())
                    else:
                        h.update(str(value.dtype).encode())
                        h.update(str(value.shape).encode())
                        h.update(value.tobytes())
        total.update(h.hexdigest().encode())
    return total.hexdigest()


def _all_values(out) -> dict:
    """Per modality, every vector in all six datasets as rows ``[N, D]`` (float64)."""
    rows = {}
    for name in synth.DATASETS:
        for split in load_manifest(out / name).splits:
            for rec in read_split(out / name, split).values():
                for member, array in rec.items():
                    if member.endswith(".npy"):
                        rows.setdefault(member[:-4], []).append(array.astype(np.float64).reshape(-1, array.shape[-1]))
    return {m: np.concatenate(r) for m, r in rows.items()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    return out, synth.synthesize("tiny", out, seed=3)


@pytest.fixture(scope="module")
def tiny_realistic(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_realistic")
    return out, synth.synthesize("tiny", out, seed=3, progress=False, style="realistic")


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


# ----------------------------------------------------------------------------- styles


def test_standard_style_is_unchanged(tiny, tmp_path):
    out, _ = tiny
    assert _content_digest(out) == STANDARD_TINY_SEED3_SHA256
    first = read_split(out / "pretrain", "train")["train-000000"]
    assert first["meta.json"]["source"] == "synth:tiny:seed=3"
    assert first["audio.npy"][0, :4].tolist() == STANDARD_TINY_SEED3_FIRST_CLIP["audio"]
    assert first["video.npy"][0, 0, 0, :4].tolist() == STANDARD_TINY_SEED3_FIRST_CLIP["video"]
    assert first["text.npy"][0, :4].tolist() == STANDARD_TINY_SEED3_FIRST_CLIP["text"]
    world = synth.World(TINY, 3, style="standard")  # the default, spelt out
    synth.write_dataset(world, "pretrain", tmp_path, progress=False)
    for split in ("train", "val"):
        a, b = read_split(out / "pretrain", split), read_split(tmp_path / "pretrain", split)
        assert list(a) == list(b)
        for key in a:
            assert a[key]["meta.json"] == b[key]["meta.json"]
            for member in a[key]:
                if member.endswith(".npy"):
                    assert a[key][member].tobytes() == b[key][member].tobytes()


def test_realistic_scales_offsets_and_sparsity(tiny_realistic):
    out, _ = tiny_realistic
    for name in synth.DATASETS:  # still float32 and finite at the declared shapes
        manifest = load_manifest(out / name)
        assert {m: s.dtype for m, s in manifest.modalities.items()} == dict.fromkeys(manifest.modalities, "float32")
    values = _all_values(out)
    audio = values["audio"]  # VGGish-like log-mel: offset around -5, per-dimension std around 3
    assert np.isfinite(audio).all()
    assert audio.mean() < -2 and audio.std() > 1.5
    assert 2.0 < np.median(audio.std(0)) < 5.0
    assert audio.mean(0).max() < 0 and audio.mean(0).std() > 0.5  # every offset negative, varying per dimension
    video = values["video"]  # VGG19-pool5-like: non-negative, sparse, small, with dead channels
    assert video.min() >= 0
    assert 0.5 < (video == 0).mean() < 0.75
    assert ((video == 0).mean(0) > 0.99).sum() >= 1
    assert 0.15 < np.median(video.std(0)) < 0.4
    text = values["text"]  # BERT-like: small per-dimension std, a shared offset, outlier dimensions
    sd = text.std(0)
    assert np.median(sd) < 0.5
    assert sd.max() > 3 * np.median(sd)
    rng = np.random.default_rng(0)
    a, b = text[rng.integers(len(text), size=500)], text[rng.integers(len(text), size=500)]
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.mean() > 0.3  # tokens share a common direction


def test_realistic_keeps_the_clips_and_labels(tiny, tiny_realistic):
    standard, _ = tiny
    realistic, paths = tiny_realistic
    assert paths == [realistic / name / "dataset.json" for name in synth.DATASETS]
    for name in synth.DATASETS:
        m_std, m_real = load_manifest(standard / name), load_manifest(realistic / name)
        assert (m_std.name, m_real.name) == (f"synthetic-{name}", f"synthetic-realistic-{name}")
        assert (m_real.classes, m_real.splits, m_real.tasks, m_real.modalities) == (m_std.classes, m_std.splits, m_std.tasks, m_std.modalities)
        split = next(iter(m_std.splits))
        a, b = read_split(standard / name, split), read_split(realistic / name, split)
        assert list(a) == list(b)
        for key in a:
            assert b[key]["meta.json"].pop("source") == "synth:tiny:seed=3:style=realistic"
            assert a[key]["meta.json"].pop("source") == "synth:tiny:seed=3"
            assert a[key]["meta.json"] == b[key]["meta.json"]
            assert {m for m in a[key] if m.endswith(".npy")} == {m for m in b[key] if m.endswith(".npy")}
            for member in a[key]:
                if member.endswith(".npy"):
                    assert a[key][member].shape == b[key][member].shape
                    assert not np.array_equal(a[key][member], b[key][member])


def test_realistic_is_deterministic(tiny_realistic, tmp_path):
    out, _ = tiny_realistic
    synth.synthesize("tiny", tmp_path / "again", seed=3, progress=False, style="realistic")
    assert _content_digest(tmp_path / "again") == _content_digest(out)
    assert (out / "ave" / "dataset.json").read_bytes() == (tmp_path / "again" / "ave" / "dataset.json").read_bytes()
    synth.write_dataset(synth.World(TINY, 4, style="realistic"), "ave", tmp_path / "other", progress=False)
    a, c = read_split(out / "ave", "test"), read_split(tmp_path / "other" / "ave", "test")
    assert not np.array_equal(a["test-000000"]["audio.npy"], c["test-000000"]["audio.npy"])


def test_realistic_classes_are_harder_but_above_chance(tmp_path):
    splits = {name: dict.fromkeys(s, 8) for name, s in TINY.splits.items()}
    splits["pretrain"] = {"train": 560, "val": 240}
    preset = dataclasses.replace(TINY, name="probe", splits=splits)
    accuracy = {}
    for style in synth.STYLES:
        synth.write_dataset(synth.World(preset, 0, style), "pretrain", tmp_path / style, progress=False)
        train, test = read_split(tmp_path / style / "pretrain", "train"), read_split(tmp_path / style / "pretrain", "val")
        y_train = np.array([r["meta.json"]["label"] for r in train.values()])
        y_test = np.array([r["meta.json"]["label"] for r in test.values()])
        for m in ("audio", "video", "text"):
            x_train, x_test = (np.stack([r[f"{m}.npy"].astype(np.float64).reshape(-1, r[f"{m}.npy"].shape[-1]).mean(0)
                                         for r in records.values()]) for records in (train, test))
            accuracy[style, m] = _ridge_probe(x_train, y_train, x_test, y_test, 8)
    chance = 1 / 8
    for m in ("audio", "video", "text"):
        assert chance + 0.15 < accuracy["realistic", m] < accuracy["standard", m] - 0.05, (m, accuracy)
    assert accuracy["realistic", "audio"] < accuracy["standard", "audio"] - 0.2, accuracy


def test_unknown_style():
    with pytest.raises(SrcidError, match="unknown style 'fancy'; valid: standard, realistic"):
        synth.synthesize("tiny", "unused", style="fancy")


def test_cli_synth_style(tmp_path, capsys):
    assert cli.main(["data", "synth", "--preset", "tiny", "--out", str(tmp_path), "--seed", "2", "--style", "realistic"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"wrote {tmp_path / name / 'dataset.json'}" for name in synth.DATASETS]
    first = next(iter(read_split(tmp_path / "pretrain", "val").values()))
    assert first["meta.json"]["source"] == "synth:tiny:seed=2:style=realistic"
    assert first["video.npy"].min() >= 0 and first["audio.npy"].mean() < -2
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["data", "synth", "--preset", "tiny", "--out", str(tmp_path / "bad"), "--style", "fancy"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --style: invalid choice: 'fancy' (choose from 'standard', 'realistic')" in err
    assert not (tmp_path / "bad").exists()
