"""``srcid data check``: validating feature datasets against their manifests (see docs/DATA-FORMAT.md).

:func:`check_path` runs the checks of :mod:`srcid.data.shard_format` (shard
files, tar structure and member sizes, counts and keys, every sample decoded)
over a dataset, or a folder of datasets, and returns one :class:`SplitReport`
per split; it also applies the rules of the manifest as a whole
(:func:`check_manifest_rules`: no empty training split, video grids the model
accepts; warnings for a ``background`` class and other empty splits). Every
problem is a one-line :class:`DataError` naming the shard, key and member (or
the manifest, split and field). With ``skip_bad`` bad samples, and the
unreadable rest of a corrupt shard, are skipped and counted in the report
instead.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import sys
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from srcid.data.manifest import MANIFEST_NAME, Manifest, load_manifest
from srcid.data.shard_format import (
    MAX_REASONS,
    check_shard_files,
    decode_sample,
    index_shard,
    index_split,
    manifest_file,
    member_size_limits,
    read_raw_samples,
)
from srcid.errors import DataError, SrcidError
from srcid.model.inputs import MODALITY_ORDER, parse_input_shapes


@dataclasses.dataclass
class SplitReport:
    """What checking one split found."""

    folder: str
    split: str
    shards: int
    samples: int  # good samples
    skipped: int = 0
    reasons: list = dataclasses.field(default_factory=list)  # the first few skip reasons
    warnings: list = dataclasses.field(default_factory=list)  # about the dataset (on its first split's report)

    def summary(self) -> str:
        head = f"{self.folder} [{self.split}]: {self.samples} good samples in {self.shards} shard{'' if self.shards == 1 else 's'}"
        if not self.skipped:
            return head + ", OK"
        plural = "" if self.skipped == 1 else "s"
        return f"{head}, {self.skipped} bad sample{plural} skipped (first: {'; '.join(self.reasons)})"


def _index_task(task):
    """index_shard for a worker process: the index, or the error as data."""
    path, limits = task
    try:
        return index_shard(path, limits)
    except DataError as exc:
        return exc


def _is_training_split(split: str) -> bool:
    return split == "train" or split.endswith("_train")


def _model_shape_problem(modality: str, shape: tuple) -> Optional[str]:
    """What the model says of a ``[T, H, W, C]`` input shape (``srcid/model/inputs.py``, ``parse_input_shapes``), or None.

    The model's own rule is applied, not a copy of it: the shape is parsed together with a flat ``[T, 1]``
    companion modality, so that any complaint is about this modality's shape.
    """
    companion = next(m for m in MODALITY_ORDER if m != modality)
    try:
        parse_input_shapes({modality: tuple(shape), companion: (shape[0] or 1, 1)})
    except SrcidError as exc:
        return str(exc)
    return None


def check_manifest_rules(manifest: Manifest) -> list:
    """The rules of a manifest as a whole that ``srcid data check`` applies; returns its warnings.

    Errors (:class:`DataError`): a training split (``train``, ``*_train``) that holds no samples; a video
    grid ``[T, H, W, C]`` the model refuses (H or W below 5: the model's own rule). Warnings: another
    split that holds no samples; a class named ``background`` (class lists hold none: localization adds
    its own background column).
    """
    where = manifest_file(manifest)
    warnings = []
    for split, info in manifest.splits.items():
        if info.samples == 0:
            if _is_training_split(split):
                raise DataError(f"{where}: dataset {manifest.name!r}: split {split!r} is empty (0 samples in "
                                f"{info.shards} shards): there is nothing to train on")
            warnings.append(f"{where}: dataset {manifest.name!r}: split {split!r} is empty (0 samples)")
    for modality, spec in manifest.modalities.items():
        if len(spec.shape) == 4:
            problem = _model_shape_problem(modality, spec.shape)
            if problem is not None:
                raise DataError(f"{where}: dataset {manifest.name!r}, modality {modality}: {problem} "
                                "(the model's rule: srcid train and srcid eval would refuse it)")
    for i, name in enumerate(manifest.classes):
        if name.strip().lower() == "background":
            warnings.append(f"{where}: dataset {manifest.name!r}: classes[{i}] is {name!r}: class lists hold no "
                            "background entry (localization adds its own background column, docs/DATA-FORMAT.md); "
                            "this one counts as an event class")
    return warnings


@dataclasses.dataclass
class _ShardResult:
    good: int = 0
    skipped: int = 0
    reasons: list = dataclasses.field(default_factory=list)
    error: Optional[DataError] = None


def _check_samples(task) -> _ShardResult:
    """Decode and check every indexed sample of one shard (runs in a worker process too)."""
    index, manifest, carried, skip_bad = task
    result = _ShardResult()
    try:
        for raw in read_raw_samples(index, index.samples):
            try:
                decode_sample(raw, manifest, index.path, carried=carried)
            except DataError as exc:
                if not skip_bad:
                    raise
                result.skipped += 1
                if len(result.reasons) < MAX_REASONS:
                    result.reasons.append(str(exc))
                continue
            result.good += 1
    except DataError as exc:
        result.error = exc
    return result


def check_dataset(folder, *, skip_bad: bool = False, workers: int = 0) -> list:
    """Check one dataset folder; one :class:`SplitReport` per split.

    First the manifest's rules (:func:`check_manifest_rules`; its warnings go
    to the first report's ``warnings``), the shard files and tar structures
    (members capped by :func:`member_size_limits`), the counts and the keys,
    then every sample, shard by shard (by ``workers`` processes when > 0).
    """
    manifest = load_manifest(folder)
    warnings = check_manifest_rules(manifest)
    check_shard_files(manifest)
    limits = member_size_limits(manifest)
    paths = [path for split in manifest.splits for path in manifest.shard_paths(split)]
    pool = concurrent.futures.ProcessPoolExecutor(max_workers=workers) if workers > 0 and paths else None
    run = pool.map if pool else map
    progress = tqdm(total=2 * len(paths), desc=f"checking {manifest.name}", unit="shard", file=sys.stderr,
                    disable=not sys.stderr.isatty())
    try:
        indexes = []
        for index in run(_index_task, [(path, limits) for path in paths]):
            if isinstance(index, DataError):
                raise index
            indexes.append(index)
            progress.update()
        splits, owner, tasks = {}, {}, []
        for split, info in manifest.splits.items():
            sidx = splits[split] = index_split(manifest, split, skip_bad=skip_bad, shard_indexes=indexes[:info.shards])
            del indexes[:info.shards]
            for shard in sidx.shards:
                tasks.append((shard, manifest, sidx.modalities, skip_bad))
                for span in shard.samples:
                    if span.key in owner:
                        raise DataError(f"key is not unique in the dataset (also in {owner[span.key]})", shard=shard.path, key=span.key)
                    owner[span.key] = shard.path
        results = iter(run(_check_samples, tasks))
        reports = []
        for split, sidx in splits.items():
            report = SplitReport(str(folder), split, len(sidx.shards), 0, skipped=sidx.lost)
            report.reasons += [str(shard.error) for shard in sidx.shards if shard.error is not None]
            for _ in sidx.shards:
                result = next(results)
                if result.error is not None:
                    raise result.error
                progress.update()
                report.samples += result.good
                report.skipped += result.skipped
                report.reasons += result.reasons
            del report.reasons[MAX_REASONS:]
            reports.append(report)
        reports[0].warnings = warnings
    finally:
        progress.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return reports


def find_datasets(path) -> list:
    """``path`` itself when it is a dataset folder, else its dataset subfolders."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: no such folder")
    if (path / MANIFEST_NAME).is_file():
        return [path]
    datasets = []
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):
        if (sub / MANIFEST_NAME).is_file():
            datasets.append(sub)
        elif any(p.suffix == ".tar" for p in sub.iterdir()):
            raise DataError(f"{sub}: holds shards but no {MANIFEST_NAME} manifest")
    if not datasets:
        raise DataError(f"{path}: neither a dataset folder (no {MANIFEST_NAME}) nor a folder of dataset folders")
    return datasets


def check_path(path, *, skip_bad: bool = False, workers: int = 0) -> list:
    """Check a dataset folder or every dataset in a folder of them.

    Returns one :class:`SplitReport` per dataset and split; raises
    :class:`DataError` on the first problem unless ``skip_bad``.
    """
    if workers < 0:
        raise DataError(f"--workers must be >= 0, got {workers}")
    reports = []
    for folder in find_datasets(path):
        reports.extend(check_dataset(folder, skip_bad=skip_bad, workers=workers))
    return reports
