"""Hostile or mistaken input (docs/RELIABILITY.md, "Inputs"): one line naming where, before any harm.

* A tar member larger than the manifest allows is refused by its tar header's size, before a byte of it
  is read, by the reader and by ``srcid data check`` alike (a 5 GiB sparse member, a header that lies).
* A key that is a path (``../../evil``, ``/abs``, ``dir/key``) is refused by the reader.
* ``srcid data check`` fails an empty training split and a video grid the model refuses, and warns about
  a ``background`` class; ``--data`` that does not exist never creates the run folder.
* Every command's usage line names the command typed.
"""
import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

import srcid.cli
from helpers_data import read_tar, write_dataset
from srcid.data import check, shard_format
from srcid.data.manifest import load_manifest
from srcid.data.reader import ShardLoader
from srcid.errors import DataError, SrcidError
from helpers_training import train_in_process as _train

REPO = Path(__file__).resolve().parents[1]
MODS = {"audio": ([4, 3], "float16"), "video": ([4, 5, 5, 3], "float32"), "text": ([None, 5], "float16")}
HUGE = 5 << 30  # 5 GiB: more than 32 bits, less than a ustar header's 8 GiB
VIDEO_CAP = 4 * 5 * 5 * 3 * 4 + shard_format.NPY_HEADER_ALLOWANCE


def write_tar_claiming(path, members, claims, *, stop_after=None):
    """A tar of ``members`` where member ``name`` of ``claims`` has a header claiming ``claims[name]`` bytes.

    Its real bytes are written, then the file is extended to the claimed size by seeking (a hole: a
    sparse file, nothing written), so the archive is valid and a 5 GiB member costs no disk. With
    ``stop_after`` the file ends right after that member's real bytes (a header that lies).
    """
    with open(path, "wb") as f:
        for name, data in members:
            size = claims.get(name, len(data))
            info = tarfile.TarInfo(name)
            info.size = size
            f.write(info.tobuf(format=tarfile.USTAR_FORMAT))
            start = f.tell()
            f.write(data[:size])
            if name == stop_after:
                return
            f.seek(start + size + (-size) % tarfile.BLOCKSIZE)
        f.write(b"\0" * (2 * tarfile.BLOCKSIZE))


def run_cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = srcid.cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def dataset(tmp_path):
    folder = tmp_path / "ds"
    write_dataset(folder, n=9, shard_size=3, modalities=MODS)
    return folder


@pytest.fixture
def reads(monkeypatch):
    """The size of every read of shard bytes: tarfile's (headers, while indexing) and the sample reader's."""
    sizes = []
    header_read, pread = shard_format._HeaderReads.read, os.pread

    def spy_header(self, size=-1):
        data = header_read(self, size)
        sizes.append(len(data))
        return data

    def spy_pread(fd, size, offset):
        data = pread(fd, size, offset)
        sizes.append(len(data))
        return data

    monkeypatch.setattr(shard_format._HeaderReads, "read", spy_header)
    monkeypatch.setattr(os, "pread", spy_pread)
    return sizes


def _second_sample_claims(shard, member, size, *, lie=False):
    """Rewrite ``shard`` (3 samples) so that its second sample's ``member`` claims ``size`` bytes; returns that
    key. ``lie``: the file ends after the member's real bytes."""
    members = read_tar(shard)
    key = members[len(members) // 3][0].split(".", 1)[0]
    name = f"{key}.{member}"
    write_tar_claiming(shard, members, {name: size}, stop_after=name if lie else None)
    return key


# ------------------------------------------------------------------------------------------- member sizes


def test_a_huge_member_is_refused_by_its_header_by_check_and_reader(dataset, reads):
    shard = dataset / "train-000001.tar"
    key = _second_sample_claims(shard, "video.npy", HUGE)
    assert shard.stat().st_size > HUGE and shard.stat().st_blocks * 512 < 1 << 20  # sparse: nothing on disk
    started = time.monotonic()
    code, out, err = run_cli("data", "check", dataset)
    line = one_line(err)
    assert code == 1 and out == ""
    for part in (f"shard {shard}", f"key {key}", "member video.npy", f"{HUGE} bytes in its tar header",
                 f"more than the {VIDEO_CAP} bytes the manifest allows", "shape [4, 5, 5, 3] float32",
                 "its .npy header says float32 [4, 5, 5, 3]", "not read"):
        assert part in line, (part, line)
    with pytest.raises(DataError) as caught:
        ShardLoader(dataset, "train", batch_size=2)
    assert str(caught.value) == line.removeprefix("srcid: error: ")
    assert max(reads) <= tarfile.BLOCKSIZE and time.monotonic() - started < 20  # tar headers only
    # --skip-bad: the sample before it is read, the rest of the shard is counted as lost
    report = check.check_path(dataset, skip_bad=True)[0]
    assert (report.samples, report.skipped) == (7, 2) and "member video.npy" in report.reasons[0]


def test_a_header_that_lies_about_its_size_is_named_not_called_truncated(dataset, reads):
    shard = dataset / "train-000002.tar"
    key = _second_sample_claims(shard, "audio.npy", HUGE, lie=True)
    assert shard.stat().st_size < 1 << 20
    code, _, err = run_cli("data", "check", dataset)
    line = one_line(err)
    assert code == 1 and f"shard {shard}, key {key}, member audio.npy: {HUGE} bytes in its tar header" in line
    assert "truncated" not in line and max(reads) <= tarfile.BLOCKSIZE


def test_text_is_capped_by_the_manifests_max_steps_or_a_default(dataset):
    manifest = load_manifest(dataset)
    limits = {member: limit for member, limit, _ in shard_format.member_size_limits(manifest)}
    assert limits["text.npy"] == shard_format.DEFAULT_MAX_STEPS * 5 * 2 + shard_format.NPY_HEADER_ALLOWANCE
    assert limits["meta.json"] == limits["*"] == shard_format.OTHER_MEMBER_MAX_BYTES
    path = dataset / "dataset.json"
    data = json.loads(path.read_text())
    data["modalities"]["text"]["max_steps"] = 6  # the clips hold 1..6 tokens
    path.write_text(json.dumps(data))
    assert check.check_path(dataset)[0].samples == 9
    shard = dataset / "train-000000.tar"
    key = _second_sample_claims(shard, "text.npy", 6 * 5 * 2 + shard_format.NPY_HEADER_ALLOWANCE + 1)
    with pytest.raises(DataError, match=f"key {key}, member text.npy: .* bytes the manifest allows "
                                        r"\(shape \[null, 5\] float16 \(max_steps 6\)"):
        ShardLoader(dataset, "train", batch_size=2)


def test_more_steps_than_max_steps_within_the_header_allowance_is_an_error(tmp_path):
    folder = tmp_path / "ds"
    write_dataset(folder, n=3, shard_size=3, modalities=MODS)
    path = folder / "dataset.json"
    data = json.loads(path.read_text())
    data["modalities"]["text"]["max_steps"] = 1
    path.write_text(json.dumps(data))
    index = shard_format.index_shard(folder / "train-000000.tar")
    raws = list(shard_format.read_raw_samples(index, index.samples))
    long = next(raw for raw in raws if shard_format._npy_header(raw["text.npy"])[0][0] > 1)
    with pytest.raises(DataError, match="more than the manifest's max_steps 1"):
        shard_format.decode_sample(long, load_manifest(folder), "shard")


def test_a_huge_tar_header_extension_is_not_read(dataset, reads):
    shard = dataset / "train-000001.tar"
    with open(shard, "r+b") as f:  # a GNU long-name header claiming 5 GiB of name, in front of the shard
        rest = f.read()
        info = tarfile.TarInfo("././@LongLink")
        info.type, info.size = tarfile.GNUTYPE_LONGNAME, HUGE
        f.seek(0)
        f.write(info.tobuf(format=tarfile.USTAR_FORMAT) + rest)
    code, _, err = run_cli("data", "check", dataset)
    line = one_line(err)
    assert code == 1 and f"shard {shard}" in line and "a tar header extension (pax or GNU long name) of" in line
    assert max(reads) <= shard_format.TAR_EXTENSION_MAX_BYTES


# ------------------------------------------------------------------------------------------- keys


@pytest.mark.parametrize("bad", ["../../evil", "/abs/evil", "sub/evil"])
def test_a_key_that_is_a_path_is_refused_by_the_reader(dataset, bad):
    shard = dataset / "train-000001.tar"
    members = read_tar(shard)
    key = members[0][0].split(".", 1)[0]
    renamed = [(name.replace(key, bad, 1) if name.startswith(key + ".") else name, data) for name, data in members]
    write_tar_claiming(shard, renamed, {})
    with pytest.raises(DataError) as caught:
        ShardLoader(dataset, "train", batch_size=2)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"shard {shard}, key {bad!r}: a clip key may not hold '/'")
    code, _, err = run_cli("data", "check", dataset)
    assert code == 1 and one_line(err) == f"srcid: error: {message}"


# ------------------------------------------------------------------------------------------- data check


def test_an_empty_training_split_fails_and_another_empty_split_warns(tmp_path):
    folder = tmp_path / "ds"
    write_dataset(folder, n=4, shard_size=2, split="val", modalities=MODS)
    path = folder / "dataset.json"
    data = json.loads(path.read_text())
    data["splits"]["test"] = {"samples": 0, "shards": 0}
    path.write_text(json.dumps(data))
    code, out, err = run_cli("data", "check", folder)
    assert code == 0 and "[test]: 0 good samples" in out
    assert one_line(err) == f"srcid: warning: {path}: dataset 'test-set': split 'test' is empty (0 samples)"
    data["splits"]["train"] = {"samples": 0, "shards": 0}
    path.write_text(json.dumps(data))
    code, out, err = run_cli("data", "check", folder)
    assert code == 1 and out == ""
    assert one_line(err) == (f"srcid: error: {path}: dataset 'test-set': split 'train' is empty (0 samples in 0 "
                             "shards): there is nothing to train on")


def test_a_background_class_is_a_warning(dataset):
    path = dataset / "dataset.json"
    data = json.loads(path.read_text())
    data["classes"][0] = "Background"
    path.write_text(json.dumps(data))
    code, out, err = run_cli("data", "check", dataset)
    assert code == 0 and out.endswith("[train]: 9 good samples in 3 shards, OK\n")
    line = one_line(err)
    assert line.startswith(f"srcid: warning: {path}: dataset 'test-set': classes[0] is 'Background'")
    assert "localization adds its own background column" in line


@pytest.mark.parametrize("grid", [(4, 5), (5, 4), (5, 5), (6, 7)])
def test_data_check_refuses_exactly_the_grids_training_refuses(tmp_path, grid):
    """The data check's verdict on a video grid is the model's (srcid/model/inputs.py), shape for shape."""
    from srcid.model import build_model_from_manifest, model_config

    folder = tmp_path / "ds"
    mods = {"audio": ([4, 3], "float16"), "video": ([4, *grid, 3], "float32")}
    write_dataset(folder, n=2, shard_size=2, modalities=mods)
    try:
        build_model_from_manifest("srcid", model_config("tiny"), load_manifest(folder))
        trains = None
    except SrcidError as exc:
        trains = str(exc)
    code, _, err = run_cli("data", "check", folder)
    if trains is None:
        assert code == 0 and err == ""
    else:
        assert "the video conv stack needs H and W of at least 5" in trains
        assert code == 1 and one_line(err) == (f"srcid: error: {folder / 'dataset.json'}: dataset 'test-set', "
                                               f"modality video: {trains} (the model's rule: srcid train and "
                                               "srcid eval would refuse it)")


# ------------------------------------------------------------------------------------------- training, config




def test_missing_data_creates_no_run_folder(tmp_path, monkeypatch, capsys):
    out = tmp_path / "runs" / "new"
    assert _train(monkeypatch, "--data", tmp_path / "nowhere", "--out", out, "--preset", "tiny") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("srcid:")]
    assert err == [f"srcid: error: --data {tmp_path / 'nowhere'}: no such folder (the pretraining dataset folder, "
                   "holding dataset.json)"]
    assert not (tmp_path / "runs").exists()
    write_dataset(tmp_path / "root" / "pretrain", n=4, shard_size=2, modalities=MODS)
    assert _train(monkeypatch, "--data", tmp_path / "root", "--out", out, "--preset", "tiny") == 2
    assert f"pass --data {tmp_path / 'root' / 'pretrain'}" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_bad_literal_setting_lists_the_choices():
    from srcid.run import apply_profile_and_overrides, default_run_config

    with pytest.raises(SrcidError) as caught:
        apply_profile_and_overrides(default_run_config("srcid", "tiny"), ["warm_start.mode=bogus"])
    assert str(caught.value) == "config key warm_start.mode: 'bogus' is not one of mi, epoch, off"


def test_every_usage_line_names_the_command_typed(capsys):
    parser = srcid.cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        assert sub.format_usage().startswith(f"usage: srcid {name}"), name
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                for inner, subsub in action.choices.items():
                    assert subsub.format_usage().startswith(f"usage: srcid {name} {inner}"), (name, inner)
    with pytest.raises(SystemExit) as done:
        srcid.cli.main(["train", "--help"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("usage: srcid train ")
    proc = subprocess.run([sys.executable, "launcher/train.py", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: launcher/train.py "), proc.stderr[-2000:]
