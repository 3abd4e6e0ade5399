"""srcid.files: whole-or-nothing writes and JSON read with one-line errors."""
import errno
import math

import pytest

from srcid.errors import DataError, SrcidError
from srcid.files import read_json_object, write_atomic, write_json_atomic


def test_json_round_trip_and_errors(tmp_path):
    state = {"step": 1234, "epoch": 2, "position": 17, "warm_start": {"window": [[10, 0.25]]},
             "config": {"lr": 4e-4}}
    path = tmp_path / "sub" / "train_state.json"
    write_json_atomic(path, state)
    assert read_json_object(path) == state
    assert [p.name for p in path.parent.iterdir()] == ["train_state.json"]
    with pytest.raises(SrcidError, match="missing.json: file not found"):
        read_json_object(tmp_path / "missing.json")
    with pytest.raises(DataError, match="missing.json: written by srcid train"):
        read_json_object(tmp_path / "missing.json", error=DataError, missing="written by srcid train")
    (tmp_path / "broken.json").write_text("{\"step\": ")
    with pytest.raises(SrcidError, match="broken.json: not valid JSON"):
        read_json_object(tmp_path / "broken.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(SrcidError, match="list.json: must be a JSON object, found list"):
        read_json_object(tmp_path / "list.json")
    (tmp_path / "latin.json").write_bytes(b"{\"a\": \"\xff\"}")
    with pytest.raises(SrcidError, match="latin.json: not valid JSON"):
        read_json_object(tmp_path / "latin.json")
    with pytest.raises(SrcidError, match="cannot write as JSON"):
        write_json_atomic(tmp_path / "bad.json", {"x": object()})
    with pytest.raises(SrcidError, match="nan.json: cannot write as JSON"):
        write_json_atomic(tmp_path / "nan.json", {"x": math.nan})
    write_json_atomic(tmp_path / "nan.json", {"x": math.nan}, allow_nan=True)
    assert math.isnan(read_json_object(tmp_path / "nan.json")["x"])
    assert not (tmp_path / "bad.json").exists()
    assert read_json_object(path) == state


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "out.txt"
    write_atomic(path, "old\n")
    real_fsync = __import__("os").fsync

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("srcid.files.os.fsync", full_disk)
    with pytest.raises(SrcidError, match=r"out.txt: cannot write: No space left on device$"):
        write_atomic(path, "new\n")
    monkeypatch.setattr("srcid.files.os.fsync", real_fsync)
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    write_atomic(path, b"bytes\n", sync_folder=True)
    assert path.read_bytes() == b"bytes\n"
