"""Small feature datasets for the reader and checker tests, and ways to damage them."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np

from srcid.data.shards import DatasetWriter

NUM_CLASSES = 6
MODALITIES = {
    "audio": ([4, 3], "float16"),
    "video": ([4, 2, 2, 3], "float32"),
    "text": ([None, 5], "float16"),
}


def write_dataset(folder, *, n=45, shard_size=7, split="train", seed=0, modalities=None, extra_splits=None,
                  carried=None):
    """Write ``n`` clips in shards of ``shard_size``; return ``{key: (features, meta)}`` as written.

    ``extra_splits`` maps more split names to their clip counts; ``carried``
    maps a split to the modalities its clips carry (default: all). Text has
    1..6 tokens; every fifth clip has a null label; audio and video carry
    per-segment labels; clips with an even index have a caption.
    """
    rng = np.random.default_rng(seed)
    modalities = MODALITIES if modalities is None else modalities
    clips = {}
    with DatasetWriter(folder, name="test-set", modalities=modalities, classes=[f"c{i}" for i in range(NUM_CLASSES)],
                       tasks=["pretrain"], max_samples_per_shard=shard_size) as writer:
        splits = [(split, n)] + list((extra_splits or {}).items())
        for split_name, count in splits:
            for i in range(count):
                key = f"{split_name}{seed}clip{i:04d}"
                features = {}
                for m, (shape, dtype) in modalities.items():
                    if carried and split_name in carried and m not in carried[split_name]:
                        continue
                    concrete = [int(rng.integers(1, 7)) if s is None else s for s in shape]
                    features[m] = rng.standard_normal(concrete).astype(dtype)
                meta = {"label": None if i % 5 == 4 else int(rng.integers(NUM_CLASSES))}
                segs = {}
                for m in ("audio", "video"):
                    if m in features:
                        steps = modalities[m][0][0]
                        segs[m] = [sorted({int(c) for c in rng.integers(NUM_CLASSES, size=int(rng.integers(0, 3)))}) for _ in range(steps)]
                if segs:
                    meta["segments"] = segs
                if i % 2 == 0:
                    meta["caption"] = f"clip number {i}"
                writer.write(split_name, key, features, meta)
                clips[key] = (features, meta)
    return clips


def read_tar(path) -> list:
    """All members of a tar as ``[(name, bytes)]``, in order."""
    with tarfile.open(path, "r:") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def write_tar(path, members) -> None:
    with tarfile.open(path, "w:") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def npy_bytes(array, allow_pickle=False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


def edit_member(path, key, member, make):
    """Replace ``key.member`` in the tar at ``path`` by ``make(old_bytes)``; ``None`` drops it."""
    path = Path(path)
    members = []
    found = False
    for name, data in read_tar(path):
        if name == f"{key}.{member}":
            found = True
            data = make(data)
            if data is None:
                continue
        members.append((name, data))
    assert found, f"{key}.{member} not in {path}"
    write_tar(path, members)


def edit_meta(path, key, change):
    """Apply ``change(meta_dict)`` to ``key``'s meta.json in the tar at ``path``."""
    def make(data):
        meta = json.loads(data)
        change(meta)
        return json.dumps(meta).encode()

    edit_member(path, key, "meta.json", make)


def first_key(path) -> str:
    return read_tar(path)[0][0].split(".", 1)[0]


def read_split(folder, split) -> dict:
    """``{key: {member: value}}`` of one split, read with tarfile + np.load (independent of the reader)."""
    folder = Path(folder)
    info = json.loads((folder / "dataset.json").read_text())["splits"][split]
    records = {}
    for i in range(info["shards"]):
        with tarfile.open(folder / f"{split}-{i:06d}.tar") as tar:
            for member in tar.getmembers():
                key, _, name = member.name.partition(".")
                data = tar.extractfile(member).read()
                records.setdefault(key, {})[name] = json.loads(data) if name == "meta.json" else np.load(io.BytesIO(data))
    assert len(records) == info["samples"]
    return records


def assert_input_statistics_of_split(weights: dict, data_dir, split: str = "train") -> None:
    """The normaliser buffers of exported ``weights`` equal the float64 moments of every real step of the split."""
    from srcid.data.reader import ShardLoader
    from srcid.model.normalize import STD_FLOOR

    loader = ShardLoader(data_dir, split, batch_size=64, shuffle=False)
    for m in loader.manifest.modalities:
        rows = []
        for batch in loader.epoch(0):
            x = batch.features[m].double().numpy()
            rows.append(x[batch.masks[m].numpy()].reshape(-1, x.shape[-1]))
        rows = np.concatenate(rows)
        std = rows.std(0)
        np.testing.assert_allclose(weights[f"normalizer.mean_{m}"].numpy(), rows.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(weights[f"normalizer.std_{m}"].numpy(), np.maximum(std, std.mean() * STD_FLOOR),
                                   rtol=1e-5)
