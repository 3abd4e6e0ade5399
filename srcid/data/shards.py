"""Writing feature shards: WebDataset tars written under a temporary name, then renamed.

A :class:`DatasetWriter` writes the shards of one or more splits into a
dataset folder and, on :meth:`DatasetWriter.close`, the manifest that
describes them. Nothing is ever visible under a final name until it is
complete: each shard is written as ``.<name>.tmp-<pid>`` and renamed when
full, and the manifest is written last.
"""
from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import webdataset as wds

from srcid.data.manifest import Manifest, ModalitySpec, SplitInfo, shard_name
from srcid.errors import DataError, SrcidError, write_error

DEFAULT_MAX_SAMPLES = 1000
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


class _SplitWriter:
    def __init__(self, folder: Path, split: str, max_samples: int):
        self.folder, self.split, self.max_samples = folder, split, max_samples
        self.shards = 0
        self.samples = 0
        self._in_shard = 0
        self._file = None
        self._tar = None
        self._tmp = None

    def _open(self):
        final = self.folder / shard_name(self.split, self.shards)
        self._tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        self._file = open(self._tmp, "wb")
        # An integer mtime keeps tar members free of PAX time headers (faster to index and read).
        self._tar = wds.TarWriter(self._file, mtime=int(time.time()))
        self._in_shard = 0

    def _seal(self):
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.folder / shard_name(self.split, self.shards))
        self.shards += 1
        self._tar = self._file = self._tmp = None

    def write(self, record: dict):
        if self._tar is None:
            self._open()
        self._tar.write(record)
        self._in_shard += 1
        self.samples += 1
        if self._in_shard >= self.max_samples:
            self._seal()

    def close(self):
        if self._tar is not None:
            self._seal()

    def abort(self):
        if self._file is not None:
            try:
                self._tar.close()
            finally:
                self._file.close()
            Path(self._tmp).unlink(missing_ok=True)


class DatasetWriter:
    """Write a dataset folder: shards per split, then ``dataset.json``.

    ``modalities`` maps a modality name to ``(shape, dtype)`` with ``None`` for
    a varying dimension; arrays are stored in that dtype. Use as a context
    manager: on an exception the temporary shard is removed and no manifest
    is written.
    """

    def __init__(self, folder, *, name: str, modalities: dict, classes: list, tasks: list,
                 max_samples_per_shard: int = DEFAULT_MAX_SAMPLES):
        if max_samples_per_shard < 1:
            raise DataError(f"max samples per shard must be >= 1, got {max_samples_per_shard}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.manifest = Manifest(
            name=name,
            modalities={m: ModalitySpec(tuple(shape), dtype) for m, (shape, dtype) in modalities.items()},
            classes=list(classes),
            splits={},
            tasks=list(tasks),
        )
        self.max_samples = max_samples_per_shard
        self._splits: dict[str, _SplitWriter] = {}
        self._keys: set[str] = set()

    def write(self, split: str, key: str, features: dict, meta: dict):
        """Add one clip: ``features`` maps modality -> array; ``meta`` is meta.json's content."""
        if not _KEY_RE.match(key):
            raise DataError(f"clip key {key!r}: use letters, digits, '_' and '-' only", key=key)
        if key in self._keys:
            raise DataError("clip key is not unique within the dataset", key=key)
        if not features:
            raise DataError("a clip needs at least one modality", key=key)
        record = {"__key__": key}
        for modality, array in features.items():
            spec = self.manifest.modalities.get(modality)
            if spec is None:
                raise DataError(f"modality not declared (declared: {', '.join(self.manifest.modalities)})", key=key, member=f"{modality}.npy")
            array = np.asarray(array)
            if not spec.matches(array.shape):
                raise DataError(f"shape {list(array.shape)} does not match {list(spec.shape)}", key=key, member=f"{modality}.npy")
            if not np.isfinite(array).all():
                raise DataError("NaN or Inf in features", key=key, member=f"{modality}.npy")
            record[f"{modality}.npy"] = np.ascontiguousarray(array.astype(spec.dtype, copy=False))
        record["meta.json"] = meta
        self._keys.add(key)
        writer = self._splits.get(split)
        if writer is None:
            writer = self._splits[split] = _SplitWriter(self.folder, split, self.max_samples)
        writer.write(record)

    def close(self) -> Manifest:
        for split, writer in self._splits.items():
            writer.close()
            self.manifest.splits[split] = SplitInfo(samples=writer.samples, shards=writer.shards)
        self.manifest.save(self.folder)
        return self.manifest

    def abort(self):
        for writer in self._splits.values():
            writer.abort()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


T = TypeVar("T")


def write_staged(out: Path, tag: str, what: str, write: Callable[[Path], T]) -> T:
    """Run ``write(staging)`` on a hidden sibling ``.OUT.TAG-<pid>`` and put the finished folder at ``out``.

    An existing non-empty ``out`` (the caller has checked it may go) is moved
    aside and deleted only after the rename; on any error the staging folder
    is removed and ``out`` is left as it was. ``what`` names the content in
    the error (``the datasets``, ``the import``). Returns what ``write`` returns.
    """
    base = out.absolute()
    staging = base.with_name(f".{base.name}.{tag}-{os.getpid()}")
    try:
        staging.parent.mkdir(parents=True, exist_ok=True)
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
    except OSError as exc:
        raise write_error(staging, exc) from None
    try:
        result = write(staging)
        old = None
        try:
            if out.is_dir() and any(out.iterdir()):
                old = base.with_name(f".{base.name}.replaced-{os.getpid()}")
                os.replace(out, old)
            os.replace(staging, out)  # an empty out folder is replaced by the rename itself
        except OSError as exc:
            raise SrcidError(f"--out {out}: cannot put {what} in place: {exc.strerror or exc}") from None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return result
