"""Importers of the original feature layouts, and the restricted unpickler.

Each test writes a small fixture in exactly the original layout (csv files,
per-clip zips of pickled arrays, HDF5 files), imports it and reads the shards
back with ``tarfile`` + ``np.load``.
"""
import csv
import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from helpers_data import read_split
from srcid.data import importers
from srcid.data.importers import AVE_CLASSES, AVVP_CLASSES, T, run_importer
from srcid.data.safe_pickle import load_pickled_array
from srcid.errors import DataError, SrcidError

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers


def read_dataset(folder):
    """``{split: {key: {member: value}}}`` and the manifest, read with tarfile + np.load."""
    folder = Path(folder)
    manifest = json.loads((folder / "dataset.json").read_text())
    return manifest, {split: read_split(folder, split) for split in manifest["splits"]}


def write_zip(path, array, member="feature.pkl", protocol=4):
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        if member.endswith(".npy"):
            buf = io.BytesIO()
            np.save(buf, array, allow_pickle=False)
            z.writestr(member, buf.getvalue())
        else:
            z.writestr(member, pickle.dumps(array, protocol=protocol))


def write_csv(path, header, rows, delimiter=","):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)


def fitted(array):
    """The rule for T: repeat the last row, or cut (independent re-statement)."""
    rows = [array[min(t, len(array) - 1)] for t in range(T)]
    return np.stack(rows)


class Evil:
    """A pickle whose loading would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ----------------------------------------------------------------------------- safe pickle


@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
def test_safe_pickle_reads_arrays_of_every_protocol(protocol):
    rng = np.random.default_rng(protocol)
    for array in (rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal((2, 2, 3)), np.arange(5, dtype=np.int64),
                  np.asfortranarray(rng.standard_normal((4, 3))).astype(np.float16)):
        got = load_pickled_array(pickle.dumps(array, protocol=protocol), "x.pkl")
        np.testing.assert_array_equal(got, array)
        assert got.dtype == array.dtype


def test_safe_pickle_refuses_code_and_non_arrays(tmp_path):
    marker = tmp_path / "marker"
    with pytest.raises(DataError) as err:
        load_pickled_array(pickle.dumps(Evil(marker)), "clip.pkl")
    assert not marker.exists()
    assert "clip.pkl" in str(err.value) and "system" in str(err.value) and "\n" not in str(err.value)
    for payload, words in ((pickle.dumps({"a": 1}), "dict"), (pickle.dumps(np.array(["a", "b"], dtype=object)), "object"),
                           (b"not a pickle", "pickle")):
        with pytest.raises(DataError, match=words):
            load_pickled_array(payload, "clip.pkl")


# ----------------------------------------------------------------------------- vggsound-avel


def make_vggsound(root, rng, video_shape=(2, 2, 6)):
    classes = ["dog barking", "church bell ringing", "playing drums"]
    (root).mkdir(parents=True, exist_ok=True)
    (root / "VggsoundAVEL40kCategories.txt").write_text("\n".join(classes) + "\n")
    write_csv(root / "vggsoundCategories2Prompts.csv", ["label", "prompt"], [[c, f"the sound of {c}"] for c in classes])
    text = {c: rng.standard_normal((3 + i, 5)).astype(np.float32) for i, c in enumerate(classes)}
    np.savez(root / "prompt_features.npz", **text)
    clips = []
    for i, (cat, split, rows) in enumerate([(2, "train", 10), (0, "train", 8), (1, "val", 12), (0, "test", 10), (1, "train", 10)]):
        vid = f"-vid{i}_x{i * 1000}"
        audio = rng.standard_normal((rows, 4)).astype(np.float32)
        video = rng.standard_normal((10, *video_shape)).astype(np.float32)
        presence = (rng.random(10) < 0.6).astype(np.int64)
        write_zip(root / "audio" / "zip" / f"{vid}.zip", audio, member=f"{vid}.pkl")
        write_zip(root / "video" / "zip" / f"{vid}.zip", video, member=f"{vid}.npy" if i % 2 else f"{vid}.pkl")
        write_zip(root / "label" / "zip" / f"{vid}.zip", presence)
        clips.append(dict(id=vid, category=classes[cat], label=cat, split=split, audio=audio, video=video, presence=presence))
    write_csv(root / "vggsound-avel40k.csv", ["category", "video_id", "split"], [[c["category"], c["id"], c["split"]] for c in clips])
    return classes, clips, text


def test_vggsound_avel(tmp_path):
    rng = np.random.default_rng(0)
    classes, clips, text = make_vggsound(tmp_path / "src", rng)
    paths = run_importer("vggsound-avel", tmp_path / "src", tmp_path / "out", max_samples_per_shard=2)
    assert paths == [tmp_path / "out" / "dataset.json"]
    manifest, splits = read_dataset(tmp_path / "out")
    assert manifest["classes"] == classes and manifest["tasks"] == ["pretrain"]
    assert manifest["modalities"] == {"audio": {"shape": [10, 4], "dtype": "float32"},
                                      "video": {"shape": [10, 2, 2, 6], "dtype": "float32"},
                                      "text": {"shape": [None, 5], "dtype": "float32"}}
    assert manifest["splits"]["train"] == {"samples": 3, "shards": 2}
    for c in clips:
        rec = splits[c["split"]][c["id"]]
        np.testing.assert_array_equal(rec["audio.npy"], fitted(c["audio"]))
        np.testing.assert_array_equal(rec["video.npy"], c["video"])
        np.testing.assert_array_equal(rec["text.npy"], text[c["category"]])
        meta = rec["meta.json"]
        assert meta["label"] == c["label"] and meta["caption"] == f"the sound of {c['category']}"
        expected = [[c["label"]] if p else [] for p in c["presence"]]
        assert meta["segments"] == {"audio": expected, "video": expected}


def test_vggsound_avel_without_optional_files(tmp_path):
    rng = np.random.default_rng(1)
    classes, clips, _ = make_vggsound(tmp_path / "src", rng)
    for name in ("VggsoundAVEL40kCategories.txt", "vggsoundCategories2Prompts.csv", "prompt_features.npz"):
        (tmp_path / "src" / name).unlink()
    run_importer("vggsound-avel", tmp_path / "src", tmp_path / "out")
    manifest, splits = read_dataset(tmp_path / "out")
    assert manifest["classes"] == sorted(classes) and set(manifest["modalities"]) == {"audio", "video"}
    rec = splits["val"][clips[2]["id"]]
    assert manifest["classes"][rec["meta.json"]["label"]] == clips[2]["category"] and "caption" not in rec["meta.json"]


# ----------------------------------------------------------------------------- ave


def make_ave(root, rng, n=7):
    root.mkdir(parents=True, exist_ok=True)
    audio = rng.standard_normal((n, 10, 4)).astype(np.float32)
    video = rng.standard_normal((n, 10, 2, 2, 3)).astype(np.float16)
    labels = np.zeros((n, 10, 29))
    truth = []
    for i in range(n):
        c = int(rng.integers(28))
        on = int(rng.integers(0, 6))
        off = int(rng.integers(on + 1, 11))
        labels[i, :, 28] = 1
        labels[i, on:off, c] = 1
        labels[i, on:off, 28] = 0
        truth.append((c, on, off))
    for name, data in (("audio_feature.h5", audio), ("visual_feature.h5", video), ("labels.h5", labels)):
        with h5py.File(root / name, "w") as f:
            f["avadataset"] = data
    orders = {"train": [0, 2, 4, 6], "val": [1], "test": [5, 3]}
    for split, order in orders.items():
        with h5py.File(root / f"{split}_order.h5", "w") as f:
            f["order"] = np.array(order)
    return audio, video, truth, orders


def test_ave(tmp_path):
    audio, video, truth, orders = make_ave(tmp_path / "src", np.random.default_rng(2))
    run_importer("ave", tmp_path / "src", tmp_path / "out", max_samples_per_shard=3)
    manifest, splits = read_dataset(tmp_path / "out")
    assert manifest["classes"] == list(AVE_CLASSES) and len(AVE_CLASSES) == 28
    assert manifest["modalities"]["video"] == {"shape": [10, 2, 2, 3], "dtype": "float16"}
    assert manifest["modalities"]["audio"] == {"shape": [10, 4], "dtype": "float32"}
    for split, order in orders.items():
        assert len(splits[split]) == len(order)
        for index in order:
            rec = splits[split][f"ave{index:05d}"]
            np.testing.assert_array_equal(rec["audio.npy"], audio[index])
            np.testing.assert_array_equal(rec["video.npy"], video[index])
            c, on, off = truth[index]
            segs = [[c] if on <= t < off else [] for t in range(10)]
            assert rec["meta.json"]["label"] == c
            assert rec["meta.json"]["segments"] == {"audio": segs, "video": segs}


def test_ave_bad_labels(tmp_path):
    make_ave(tmp_path / "src", np.random.default_rng(3))
    with h5py.File(tmp_path / "src" / "labels.h5", "w") as f:
        f["avadataset"] = np.zeros((7, 10, 26))
    with pytest.raises(DataError, match=r"labels\.h5.*\[N, 10, 29\]"):
        run_importer("ave", tmp_path / "src", tmp_path / "out")
    make_ave(tmp_path / "src2", np.random.default_rng(3))
    with h5py.File(tmp_path / "src2" / "test_order.h5", "w") as f:
        f["order"] = np.array([3, 99])
    with pytest.raises(DataError, match=r"test_order\.h5: row index 99"):
        run_importer("ave", tmp_path / "src2", tmp_path / "out2")


# ----------------------------------------------------------------------------- avvp


def test_avvp(tmp_path):
    rng = np.random.default_rng(4)
    src = tmp_path / "src"
    names = ["AAAAAAAAAAA_30_40", "BBBBBBBBBBB_0_10", "CCCCCCCCCCC_5_15"]
    feats = {}
    for n in names:
        feats[n] = (rng.standard_normal((8, 4)).astype(np.float32), rng.standard_normal((10, 3)).astype(np.float32))
        write_zip(src / "feature" / "audio" / "zip" / f"{n[:11]}.zip", feats[n][0])
        write_zip(src / "feature" / "video" / "zip" / f"{n[:11]}.zip", feats[n][1])
    # audio: one row per event; visual: one row per clip with comma-separated lists
    write_csv(src / "AVVP_eval_audio.csv", ["filename", "onset", "offset", "event_labels"],
              [[names[0], 0, 5, "Speech"], [names[0], 3, 10, "Dog"], [names[1], 2, 4, "Speech"], [names[1], 6, 8, "Speech"]],
              delimiter="\t")
    write_csv(src / "AVVP_eval_visual.csv", ["filename", "onset", "offset", "event_labels"],
              [[names[0], "0,7", "4,9", "Dog,Car"], [names[2], "0", "10", "Cello"]], delimiter="\t")
    run_importer("avvp", src, tmp_path / "out")
    manifest, splits = read_dataset(tmp_path / "out")
    assert manifest["classes"] == list(AVVP_CLASSES) and manifest["tasks"] == ["localization"]
    records = {k: v for recs in splits.values() for k, v in recs.items()}
    assert set(records) == set(names)
    c = {n: i for i, n in enumerate(AVVP_CLASSES)}
    expect_audio = {
        names[0]: [sorted(({c["Speech"]} if t < 5 else set()) | ({c["Dog"]} if 3 <= t < 10 else set())) for t in range(10)],
        names[1]: [[c["Speech"]] if (2 <= t < 4 or 6 <= t < 8) else [] for t in range(10)],
        names[2]: [[] for _ in range(10)],
    }
    expect_video = {
        names[0]: [[c["Dog"]] if t < 4 else ([c["Car"]] if 7 <= t < 9 else []) for t in range(10)],
        names[1]: [[] for _ in range(10)],
        names[2]: [[c["Cello"]] for _ in range(10)],
    }
    for n in names:
        meta = records[n]["meta.json"]
        assert meta["label"] is None
        assert meta["segments"] == {"audio": expect_audio[n], "video": expect_video[n]}
        np.testing.assert_array_equal(records[n]["audio.npy"], fitted(feats[n][0]))
        np.testing.assert_array_equal(records[n]["video.npy"], feats[n][1])
    for split, recs in splits.items():
        assert all(importers.holdout_split(k) == split for k in recs)


def test_avvp_bad_rows(tmp_path):
    src = tmp_path / "src"
    write_zip(src / "audio" / "zip" / "AAAAAAAAAAA.zip", np.zeros((10, 4)))
    write_zip(src / "video" / "zip" / "AAAAAAAAAAA.zip", np.zeros((10, 3)))
    header = ["filename", "onset", "offset", "event_labels"]
    write_csv(src / "AVVP_eval_visual.csv", header, [["AAAAAAAAAAA_1_2", 0, 3, "Dog"]], delimiter="\t")
    for row, pattern in (([0, 3, "Unicorn"], r"line 2: field 'event_labels': class 'Unicorn' is not one of the 25"),
                         ([4, 3, "Dog"], r"line 2: fields 'onset', 'offset': 4\.\.3"),
                         (["0,1", "3", "Dog"], r"line 2: fields 'onset', 'offset', 'event_labels' list 2, 1, 1")):
        write_csv(src / "AVVP_eval_audio.csv", header, [["AAAAAAAAAAA_1_2", *row]], delimiter="\t")
        with pytest.raises(DataError, match=pattern):
            run_importer("avvp", src, tmp_path / "out")


# ----------------------------------------------------------------------------- ucf-vgg


def test_ucf_vgg(tmp_path):
    rng = np.random.default_rng(5)
    src = tmp_path / "src"
    ucf_names, vgg_names = ["PlayingGuitar", "Skiing", "Drumming"], ["playing acoustic guitar", "skiing", "playing drum kit"]
    src.mkdir()
    (src / "UCF101sameVGGSound.txt").write_text("\n".join(ucf_names))
    (src / "VGGSoundsameUCF101.txt").write_text("\n".join(vgg_names))
    ucf_rows, vgg_rows, truth = [], [], {}
    for i in range(6):
        vid = f"v_{ucf_names[i % 3]}_g0{i}_c01"
        video = rng.standard_normal((12, 2, 2, 3)).astype(np.float32)
        write_zip(src / "UCF101" / "feature" / "video" / "zip" / f"{vid}.zip", video)
        ucf_rows.append([ucf_names[i % 3], vid, "train" if i < 4 else "test"])
        truth[vid] = ("video", i % 3, video[:10], f"ucf_{'train' if i < 4 else 'test'}")
        aid = f"aud{i}_000"
        audio = rng.standard_normal((10, 4)).astype(np.float32)
        write_zip(src / "vggsound40k" / "feature" / "audio" / "zip" / f"{aid}.zip", audio)
        vgg_rows.append([vgg_names[(i + 1) % 3], aid])
        truth[aid] = ("audio", (i + 1) % 3, audio, "vgg_" + importers.holdout_split(aid))
    write_csv(src / "ucf2vggsound.csv", ["category", "video_id", "split"], ucf_rows)
    write_csv(src / "vggsound2ucf.csv", ["category", "video_id"], vgg_rows)
    run_importer("ucf-vgg", src, tmp_path / "out")
    manifest, splits = read_dataset(tmp_path / "out")
    assert manifest["classes"] == ucf_names and set(manifest["modalities"]) == {"audio", "video"}
    for key, (modality, label, array, split) in truth.items():
        rec = splits[split][key]
        assert set(rec) == {f"{modality}.npy", "meta.json"}
        np.testing.assert_array_equal(rec[f"{modality}.npy"], array)
        assert rec["meta.json"]["label"] == label and rec["meta.json"]["segments"] == {modality: [[label]] * 10}
    for split, recs in splits.items():
        assert len({tuple(sorted(r)) for r in recs.values()}) == 1  # modality-homogeneous splits


# ----------------------------------------------------------------------------- clotho


def test_clotho(tmp_path):
    rng = np.random.default_rng(6)
    src = tmp_path / "src"
    files = {"development": ["Santa Motor.wav", "rain (1).wav"], "evaluation": ["birds.wav"]}
    audio, text = {}, {}
    for part, names in files.items():
        rows = []
        for j, name in enumerate(names):
            audio[name] = rng.standard_normal((23 - 9 * j, 4)).astype(np.float32)
            write_zip(src / "feature" / "zip" / f"{name[:-4]}.zip", audio[name])
            caps = [f"{name} caption {i}" for i in range(1, 6)]
            rows.append([name, *caps])
            for i in range(1, 6):
                text[f"{name}#{i}"] = rng.standard_normal((2 + i, 6)).astype(np.float32)
        write_csv(src / f"clotho_captions_{part}.csv", ["file_name"] + [f"caption_{i}" for i in range(1, 6)], rows)
    np.savez(src / "caption_features.npz", **text)
    run_importer("clotho", src, tmp_path / "out")
    manifest, splits = read_dataset(tmp_path / "out")
    assert set(splits) == {"train", "test"} and manifest["tasks"] == ["retrieval"]
    assert len(splits["train"]) == 10 and len(splits["test"]) == 5
    by_source = {}
    for recs in splits.values():
        for key, rec in recs.items():
            by_source.setdefault(rec["meta.json"]["source"], []).append(rec)
    for name, a in audio.items():
        recs = by_source[name]
        assert sorted(r["meta.json"]["caption"] for r in recs) == [f"{name} caption {i}" for i in range(1, 6)]
        if len(a) >= 10:  # averaged into 10 contiguous bins, the first len % 10 one row longer
            sizes = [len(a) // 10 + (k < len(a) % 10) for k in range(10)]
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            expected = np.stack([a[s:s + n].astype(np.float64).mean(0) for s, n in zip(starts, sizes)])
        else:
            expected = fitted(a)
        for r in recs:
            np.testing.assert_allclose(r["audio.npy"], expected, rtol=1e-6, atol=1e-6)
            i = int(r["meta.json"]["caption"].rsplit(" ", 1)[1])
            np.testing.assert_array_equal(r["text.npy"], text[f"{name}#{i}"])


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_are_one_line_errors(tmp_path):
    rng = np.random.default_rng(7)
    cases = []

    def fresh(name):
        src = tmp_path / name
        _, clips, _ = make_vggsound(src, rng)
        return src, clips

    src, clips = fresh("missing_column")
    write_csv(src / "vggsound-avel40k.csv", ["category", "vid", "split"], [["dog barking", "x", "train"]])
    cases.append((src, r"vggsound-avel40k\.csv: missing column 'video_id'"))

    src, clips = fresh("missing_zip")
    (src / "video" / "zip" / f"{clips[3]['id']}.zip").unlink()
    cases.append((src, rf"{clips[3]['id']}\.zip: missing \(video features of clip"))

    src, clips = fresh("zip_without_array")
    with zipfile.ZipFile(src / "audio" / "zip" / f"{clips[1]['id']}.zip", "w") as z:
        z.writestr("readme.txt", "no array here")
    cases.append((src, r"no \.pkl or \.npy array member \(holds readme\.txt\)"))

    src, clips = fresh("wrong_shape")
    write_zip(src / "video" / "zip" / f"{clips[2]['id']}.zip", np.zeros((10, 2, 3, 6), np.float32))
    cases.append((src, r"video array of shape \[10, 2, 3, 6\]: expected \[10, 2, 2, 6\] like the first clip"))

    src, clips = fresh("label_outside")
    rows = [[c["category"], c["id"], c["split"]] for c in clips]
    rows[4][0] = "cat meowing"
    write_csv(src / "vggsound-avel40k.csv", ["category", "video_id", "split"], rows)
    cases.append((src, r"vggsound-avel40k\.csv: line 6: class 'cat meowing' is not one of the 3 classes"))

    src, clips = fresh("missing_prompt_feature")
    np.savez(src / "prompt_features.npz", **{"dog barking": np.zeros((2, 5), np.float32)})
    cases.append((src, r"prompt_features\.npz: no entry 'playing drums'"))

    for src, pattern in cases:
        with pytest.raises(DataError, match=pattern) as err:
            run_importer("vggsound-avel", src, tmp_path / f"out_{src.name}")
        assert "\n" not in str(err.value)
        assert not (tmp_path / f"out_{src.name}" / "dataset.json").exists()
        assert not list((tmp_path / f"out_{src.name}").glob(".*tmp*"))
    with pytest.raises(SrcidError, match="unknown layout 'nope'"):
        run_importer("nope", tmp_path, tmp_path / "o")
    with pytest.raises(DataError, match="not a folder"):
        run_importer("ave", tmp_path / "absent", tmp_path / "o")


def test_malicious_pickle_in_a_clip_zip_does_not_run(tmp_path):
    rng = np.random.default_rng(8)
    src = tmp_path / "src"
    _, clips, _ = make_vggsound(src, rng)
    marker = tmp_path / "pwned"
    with zipfile.ZipFile(src / "audio" / "zip" / f"{clips[2]['id']}.zip", "w") as z:
        z.writestr("feature.pkl", pickle.dumps(Evil(marker)))
    with pytest.raises(DataError, match=r"feature\.pkl: refused to unpickle (posix|nt|os)\.system") as err:
        run_importer("vggsound-avel", src, tmp_path / "out")
    assert "\n" not in str(err.value) and clips[2]["id"] in str(err.value)
    assert not marker.exists()


# ----------------------------------------------------------------------------- command line


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "srcid.cli", "data", "import", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


def test_cli_import_and_bad_input(tmp_path):
    make_ave(tmp_path / "src", np.random.default_rng(9))
    done = _cli("ave", "--src", tmp_path / "src", "--out", tmp_path / "out", "--shard-size", "2")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"wrote {tmp_path / 'out' / 'dataset.json'}"
    manifest, splits = read_dataset(tmp_path / "out")
    assert manifest["splits"]["train"] == {"samples": 4, "shards": 2}
    write_csv(tmp_path / "bad" / "ucf2vggsound.csv", ["category"], [["x"]])
    write_csv(tmp_path / "bad" / "vggsound2ucf.csv", ["category", "video_id"], [["x", "y"]])
    (tmp_path / "bad" / "UCF101" / "video" / "zip").mkdir(parents=True)
    (tmp_path / "bad" / "vggsound40k" / "audio" / "zip").mkdir(parents=True)
    bad = _cli("ucf-vgg", "--src", tmp_path / "bad", "--out", tmp_path / "out2")
    assert bad.returncode != 0
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in bad.stderr
    assert "ucf2vggsound.csv: missing column 'video_id'" in lines[0]


# ----------------------------------------------------------------------------- no silent overwrite


def test_a_used_out_folder_is_refused_and_overwrite_replaces_it_whole(tmp_path, capsys):
    """docs/RELIABILITY.md: an import never mixes with what --out held; --overwrite leaves no stale shard."""
    import srcid.cli

    make_ave(tmp_path / "src", np.random.default_rng(4))
    out = tmp_path / "out"
    run_importer("ave", tmp_path / "src", out, max_samples_per_shard=1)
    (out / "notes.txt").write_text("mine")
    before = sorted(p.name for p in out.iterdir())
    assert "train-000003.tar" in before
    with pytest.raises(SrcidError, match=r"--out .*out: exists and is not empty; pass --overwrite to replace it"):
        run_importer("ave", tmp_path / "src", out, max_samples_per_shard=3)
    assert srcid.cli.main(["data", "import", "ave", "--src", str(tmp_path / "src"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0]
    assert sorted(p.name for p in out.iterdir()) == before

    # a failing import with --overwrite leaves the old folder as it was and no temporary folder behind
    bad = tmp_path / "bad"
    make_ave(bad, np.random.default_rng(4))
    (bad / "labels.h5").unlink()
    with pytest.raises(DataError):
        run_importer("ave", bad, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "out", "src"]

    paths = run_importer("ave", tmp_path / "src", out, max_samples_per_shard=3, overwrite=True)
    assert paths == [out / "dataset.json"]
    manifest = json.loads((out / "dataset.json").read_text())
    shards = {f"{split}-{i:06d}.tar" for split, info in manifest["splits"].items() for i in range(info["shards"])}
    assert sorted(p.name for p in out.iterdir()) == sorted(shards | {"dataset.json"})
    assert manifest["splits"]["train"] == {"samples": 4, "shards": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "out", "src"]
    # an empty folder is used as it is; --out inside the source is never replaced
    (tmp_path / "empty").mkdir()
    run_importer("ave", tmp_path / "src", tmp_path / "empty")
    assert (tmp_path / "empty" / "dataset.json").is_file()
    with pytest.raises(SrcidError, match="would delete the source"):
        run_importer("ave", tmp_path / "src", tmp_path, overwrite=True)
