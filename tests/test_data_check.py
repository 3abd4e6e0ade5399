"""``srcid data check``: every kind of bad input ends in one line on stderr naming
where it is, a good dataset gets one summary line per split, ``--skip-bad`` counts."""
import concurrent.futures
import contextlib
import io
import json
import shutil
import subprocess
import sys
import traceback

import numpy as np
import pytest

from helpers_data import MODALITIES, edit_member, edit_meta, first_key, npy_bytes, read_tar, write_dataset, write_tar
from srcid import cli
from srcid.data import check, shard_format
from srcid.data.manifest import load_manifest
from srcid.errors import DataError

# the helpers' modalities with a video grid the model accepts (H and W of at least 5): data check applies that rule
GRID_OK = dict(MODALITIES, video=([4, 5, 5, 3], "float32"))


def _damage_truncate(folder):
    shard = folder / "train-000002.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size * 6 // 10])
    return ["train-000002.tar", "truncated"]


def _damage_garbage(folder):
    shard = folder / "train-000001.tar"
    shard.write_bytes(np.random.default_rng(0).integers(0, 256, size=shard.stat().st_size, dtype=np.uint8).tobytes())
    return ["train-000001.tar", "corrupt"]


def _damage_header(folder):
    shard = folder / "train-000004.tar"
    start = shard_format.index_shard(shard).samples[2].start
    data = bytearray(shard.read_bytes())
    data[start:start + 512] = np.random.default_rng(1).integers(0, 256, size=512, dtype=np.uint8).tobytes()
    shard.write_bytes(bytes(data))
    return ["train-000004.tar", "corrupt"]


def _damage_not_whole_samples(folder):
    shard = folder / "train-000003.tar"
    members = read_tar(shard)
    members.append(members.pop(0))  # the first sample's first member moves to the end
    write_tar(shard, members)
    return ["train-000003.tar", f"key {first_key(folder / 'train-000003.tar')}", "not contiguous"]


def _in_shard(index, member, make):
    def damage(folder):
        shard = folder / f"train-{index:06d}.tar"
        key = first_key(shard)
        edit_member(shard, key, member, make)
        return [f"shard {shard}", f"key {key}", f"member {member}"]
    return damage


def _extra_member(folder):
    shard = folder / "train-000005.tar"
    key = first_key(shard)
    members = read_tar(shard)
    members.insert(1, (f"{key}.depth.npy", npy_bytes(np.zeros((2, 2), np.float32))))
    write_tar(shard, members)
    return [f"shard {shard}", f"key {key}", "member depth.npy", "unexpected"]


def _with_values(value, position):
    def make(data):
        array = np.load(io.BytesIO(data))
        array[position] = value
        return npy_bytes(array)
    return make


def _meta(change, *expected):
    def damage(folder):
        shard = folder / "train-000006.tar"
        key = first_key(shard)
        edit_meta(shard, key, change)
        return [f"shard {shard}", f"key {key}", "member meta.json", *expected]
    return damage


def _audio_in_video_split(folder):
    shard = folder / "vid-000000.tar"
    key = first_key(shard)
    members = read_tar(shard)
    members.insert(0, (f"{key}.audio.npy", npy_bytes(np.zeros((4, 3), np.float16))))
    write_tar(shard, members)
    return [f"shard {shard}", f"key {key}", "member audio.npy", "other samples of this split do not carry it"]


def _manifest(change, *expected):
    def damage(folder):
        path = folder / "dataset.json"
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))
        return [str(path), *expected]
    return damage


def _manifest_text(folder):
    (folder / "dataset.json").write_text('{"name": "x", ')
    return [str(folder / "dataset.json"), "not valid JSON"]


def _missing_shard(folder):
    (folder / "train-000003.tar").unlink()
    return [str(folder / "dataset.json"), "split 'train'", "train-000003.tar is missing"]


def _extra_shard(folder):
    shutil.copy(folder / "train-000000.tar", folder / "train-000009.tar")
    return [str(folder / "dataset.json"), "train-000009.tar", "not listed"]


DAMAGE = {
    "truncated tar": _damage_truncate,
    "garbage tar": _damage_garbage,
    "garbage header inside tar": _damage_header,
    "members not whole samples": _damage_not_whole_samples,
    "missing member": _in_shard(1, "video.npy", lambda data: None),
    "unexpected member": _extra_member,
    "modality the split does not carry": _audio_in_video_split,
    "wrong shape": _in_shard(2, "audio.npy", lambda data: npy_bytes(np.zeros((5, 3), np.float16))),
    "wrong dtype": _in_shard(3, "audio.npy", lambda data: npy_bytes(np.zeros((4, 3), np.float64))),
    "NaN": _in_shard(4, "video.npy", _with_values(np.nan, (1, 0, 1, 2))),
    "Inf": _in_shard(5, "text.npy", _with_values(np.inf, (0, 3))),
    "not an npy array": _in_shard(0, "text.npy", lambda data: b"not numpy at all"),
    "pickled npy": _in_shard(0, "audio.npy", lambda data: npy_bytes(np.array([None] * 3, dtype=object), allow_pickle=True)),
    "npy data cut short": _in_shard(1, "audio.npy", lambda data: data[:-6]),
    "label outside classes": _meta(lambda m: m.update(label=6), "label 6"),
    "segment class outside classes": _meta(lambda m: m["segments"]["audio"][2].append(9), "segments.audio[2]", "9"),
    "segments of wrong length": _meta(lambda m: m["segments"]["video"].pop(), "segments.video", "4"),
    "caption not a string": _meta(lambda m: m.update(caption=3), "caption"),
    "meta not an object": _in_shard(6, "meta.json", lambda data: b"[1, 2]"),
    "sample count mismatch": _manifest(lambda d: d["splits"]["train"].update(samples=46), "split 'train'", "46", "45"),
    "missing shard": _missing_shard,
    "extra shard": _extra_shard,
    "manifest not JSON": _manifest_text,
    "manifest bad field": _manifest(lambda d: d["modalities"]["audio"].update(dtype="int8"), "modalities.audio.dtype"),
    "format_version true": _manifest(lambda d: d.update(format_version=True), "format_version", "must be an integer"),
    "format_version 1.0": _manifest(lambda d: d.update(format_version=1.0), "format_version", "must be an integer"),
    "empty train split": _manifest(lambda d: d["splits"].update(train={"samples": 0, "shards": 0}),
                                   "dataset 'test-set'", "split 'train' is empty", "nothing to train on"),
    "video grid too small for the model": _manifest(lambda d: d["modalities"]["video"].update(shape=[4, 4, 5, 3]),
                                                    "dataset 'test-set', modality video", "[4, 4, 5, 3]",
                                                    "the video conv stack needs H and W of at least 5"),
}


# the kinds of bad input checked through a separate `srcid` process; the others
# go through the same command line in this process (the import of torch makes
# each process cost about a second)
IN_SUBPROCESS = {
    "truncated tar", "garbage tar", "missing member", "wrong shape", "wrong dtype", "NaN", "Inf",
    "label outside classes", "segment class outside classes", "sample count mismatch", "missing shard",
    "manifest not JSON", "manifest bad field", "good", "skip", "NaN with workers",
}


def run_check_process(*args):
    proc = subprocess.run([sys.executable, "-m", "srcid.cli", "data", "check", *map(str, args)],
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def run_check_here(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(["data", "check", *map(str, args)])
        except BaseException:  # reported as the test's failure, not the fixture's
            code = -1
            traceback.print_exc(file=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every damaged copy, the good dataset and the skip-bad runs, checked by the command line."""
    root = tmp_path_factory.mktemp("check")
    good = root / "good" / "ds"
    write_dataset(good, n=45, shard_size=7, extra_splits={"val": 9, "vid": 5}, carried={"vid": ("video",)},
                  modalities=GRID_OK)
    write_dataset(root / "good" / "other", n=5, shard_size=2, seed=1, modalities=GRID_OK)
    runs, expected = {}, {}
    for name, damage in DAMAGE.items():
        folder = root / name.replace(" ", "_")
        shutil.copytree(good, folder)
        expected[name] = damage(folder)
        runs[name] = (folder,)
    skip = root / "skip"
    shutil.copytree(good, skip)
    expected["skip"] = _in_shard(4, "video.npy", _with_values(np.nan, (0, 0, 0, 0)))(skip)
    cut = root / "skip_cut"
    shutil.copytree(good, cut)
    _damage_truncate(cut)
    (root / "empty").mkdir()
    runs.update({
        "good": (good,), "folder of datasets": (root / "good",), "neither": (root / "empty",),
        "skip": (skip, "--skip-bad"), "skip with workers": (skip, "--skip-bad", "--workers", "2"),
        "NaN with workers": (root / "NaN", "--workers", "2"), "skip truncated": (cut, "--skip-bad"),
    })
    assert IN_SUBPROCESS <= set(runs)
    separate = [name for name in runs if name in IN_SUBPROCESS]
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        done = dict(zip(separate, pool.map(lambda name: run_check_process(*runs[name]), separate)))
    done.update({name: run_check_here(*args) for name, args in runs.items() if name not in IN_SUBPROCESS})
    return done, expected, root


def assert_one_line_error(result, *parts):
    code, out, err = result
    assert code != 0
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for part in parts:
        assert part in lines[0], (part, lines[0])


@pytest.mark.parametrize("name", list(DAMAGE))
def test_bad_input_fails_with_one_line_naming_where(results, name):
    done, expected, _ = results
    assert_one_line_error(done[name], "srcid: error:", *expected[name])


def test_workers_report_the_same_error(results):
    done, _, _ = results
    assert done["NaN with workers"][2] == done["NaN"][2]


def test_good_dataset_gets_one_summary_line_per_split(results):
    done, _, root = results
    code, out, err = done["good"]
    assert code == 0 and err == ""
    assert out.splitlines() == [
        f"{root / 'good' / 'ds'} [train]: 45 good samples in 7 shards, OK",
        f"{root / 'good' / 'ds'} [val]: 9 good samples in 2 shards, OK",
        f"{root / 'good' / 'ds'} [vid]: 5 good samples in 1 shard, OK",
    ]
    code, out, err = done["folder of datasets"]
    assert code == 0 and len(out.splitlines()) == 4 and "[train]: 5 good samples in 3 shards, OK" in out


def test_folder_without_datasets_is_an_error(results):
    done, _, root = results
    assert_one_line_error(done["neither"], str(root / "empty"), "dataset.json")


def test_skip_bad_reports_the_count_and_reason(results):
    done, expected, _ = results
    for name in ("skip", "skip with workers"):
        code, out, err = done[name]
        assert code == 0, err
        train = [line for line in out.splitlines() if "[train]" in line]
        assert len(train) == 1
        assert "44 good samples in 7 shards, 1 bad sample skipped" in train[0]
        for part in expected["skip"]:
            assert part in train[0]
    code, out, err = done["skip truncated"]
    assert code == 0, err
    train = next(line for line in out.splitlines() if "[train]" in line)
    kept = int(train.split(": ")[1].split()[0])
    skipped = int(train.split(", ")[1].split()[0])
    assert kept + skipped == 45 and skipped > 0 and "train-000002.tar" in train


def test_check_in_process_matches_across_worker_counts(results):
    _, _, root = results
    serial = [r.summary() for r in check.check_path(root / "good")]
    parallel = [r.summary() for r in check.check_path(root / "good", workers=2)]
    assert serial == parallel and len(serial) == 4


def test_decode_sample_checks_headers_of_arrays_it_does_not_load(tmp_path):
    folder = tmp_path / "ds"
    clips = write_dataset(folder, n=3, shard_size=3)
    manifest = load_manifest(folder)
    index = shard_format.index_shard(folder / "train-000000.tar")
    raws = list(shard_format.read_raw_samples(index, index.samples))
    assert [r["__key__"] for r in raws] == sorted(clips)
    for raw in raws:
        features, meta = clips[raw["__key__"]]
        light = shard_format.decode_sample(raw, manifest, index.path, decode=False)
        assert light.features == {}
        assert light.lengths == {m: a.shape[0] for m, a in features.items()}
        assert light.label == meta["label"] and light.caption == meta.get("caption")
        some = shard_format.decode_sample(raw, manifest, index.path, modalities=("text",))
        assert list(some.features) == ["text"] and np.array_equal(some.features["text"], features["text"])
    raw = dict(raws[0], **{"video.npy": npy_bytes(np.zeros((4, 2, 2, 3), np.float16))})
    with pytest.raises(DataError, match="member video.npy: dtype float16, expected float32"):
        shard_format.decode_sample(raw, manifest, index.path, decode=False)
    raw = dict(raws[0], **{"audio.npy": npy_bytes(np.full((4, 3), np.nan, np.float16))})
    shard_format.decode_sample(raw, manifest, index.path, modalities=("video",))  # NaN in an array it does not load
    with pytest.raises(DataError, match="12 NaN"):
        shard_format.decode_sample(raw, manifest, index.path)
