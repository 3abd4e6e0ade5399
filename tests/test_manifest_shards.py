import json
import tarfile

import numpy as np
import pytest

from srcid.data.manifest import load_manifest, shard_name
from srcid.data.shards import DatasetWriter
from srcid.errors import DataError

MODS = {"audio": ([4, 3], "float16"), "text": ([None, 5], "float32")}


def _write(folder, n=7, per_shard=3):
    rng = np.random.default_rng(0)
    with DatasetWriter(folder, name="t", modalities=MODS, classes=["a", "b"], tasks=["pretrain"],
                       max_samples_per_shard=per_shard) as w:
        for i in range(n):
            w.write("train", f"clip{i}", {"audio": rng.normal(size=(4, 3)), "text": rng.normal(size=(2 + i % 3, 5))}, {"label": i % 2})
    return w.manifest


def test_writer_shards_and_manifest(tmp_path):
    manifest = _write(tmp_path)
    assert manifest.splits["train"].samples == 7 and manifest.splits["train"].shards == 3
    loaded = load_manifest(tmp_path)
    assert loaded.modalities["text"].shape == (None, 5)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["dataset.json", shard_name("train", 0), shard_name("train", 1), shard_name("train", 2)]
    with tarfile.open(tmp_path / shard_name("train", 2)) as tar:
        assert sorted(tar.getnames()) == ["clip6.audio.npy", "clip6.meta.json", "clip6.text.npy"]


def test_writer_refuses_bad_samples(tmp_path):
    w = DatasetWriter(tmp_path, name="t", modalities=MODS, classes=["a"], tasks=[])
    with pytest.raises(DataError, match="audio.npy"):
        w.write("train", "k1", {"audio": np.zeros((5, 3))}, {})
    with pytest.raises(DataError, match="NaN"):
        w.write("train", "k2", {"audio": np.full((4, 3), np.nan)}, {})
    with pytest.raises(DataError, match="key"):
        w.write("train", "bad.key", {"audio": np.zeros((4, 3))}, {})


def test_interrupted_writer_leaves_no_final_shard(tmp_path):
    with pytest.raises(RuntimeError):
        with DatasetWriter(tmp_path, name="t", modalities=MODS, classes=["a"], tasks=[], max_samples_per_shard=10) as w:
            w.write("train", "k1", {"audio": np.zeros((4, 3))}, {})
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "patch,field",
    [
        ({"modalities": {"smell": {"shape": [1, 2], "dtype": "float32"}}}, "modalities.smell"),
        ({"modalities": {"audio": {"shape": [4, 3], "dtype": "int8"}}}, "modalities.audio.dtype"),
        ({"splits": {"train": {"samples": -1, "shards": 1}}}, "splits.train"),
        ({"format_version": 9}, "format_version"),
        ({"format_version": True}, "format_version: true must be an integer"),
        ({"format_version": 1.0}, "format_version: 1.0 must be an integer"),
        ({"format_version": "1"}, "format_version: \"1\" must be an integer"),
        ({"splits": {"train": {"samples": True, "shards": 1}}}, "splits.train"),
        ({"modalities": {"audio": {"shape": [4, True], "dtype": "float16"}}}, "modalities.audio.shape"),
        ({"modalities": {"audio": {"shape": [4, 3], "dtype": "float16", "max_steps": 9}}}, "modalities.audio.max_steps"),
        ({"modalities": {"text": {"shape": [None, 5], "dtype": "float32", "max_steps": 0}}}, "modalities.text.max_steps"),
        ({"extra": 1}, "extra"),
    ],
)
def test_manifest_errors_name_the_field(tmp_path, patch, field):
    _write(tmp_path)
    data = json.loads((tmp_path / "dataset.json").read_text())
    data.update(patch)
    (tmp_path / "dataset.json").write_text(json.dumps(data))
    with pytest.raises(DataError) as err:
        load_manifest(tmp_path)
    assert field in str(err.value) and "dataset.json" in str(err.value)


def test_max_steps_is_kept_and_an_integer_format_version_is_read(tmp_path):
    _write(tmp_path)
    path = tmp_path / "dataset.json"
    data = json.loads(path.read_text())
    data["modalities"]["text"]["max_steps"] = 12
    data["format_version"] = 1
    path.write_text(json.dumps(data))
    manifest = load_manifest(tmp_path)
    assert manifest.modalities["text"].max_steps == 12 and manifest.modalities["audio"].max_steps is None
    assert manifest.to_json()["modalities"] == data["modalities"]  # written back only where declared
