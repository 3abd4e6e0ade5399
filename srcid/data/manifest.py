"""The dataset manifest ``dataset.json`` (see docs/DATA-FORMAT.md)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

from srcid.errors import DataError
from srcid.files import read_json_object, write_json_atomic

FORMAT_VERSION = 1
MODALITIES = ("audio", "video", "text")
DTYPES = ("float16", "float32")
MANIFEST_NAME = "dataset.json"


@dataclasses.dataclass
class ModalitySpec:
    shape: tuple  # ints, or None for a dimension that varies per clip
    dtype: str
    max_steps: Optional[int] = None  # the most steps a clip may have, where the first dimension varies (optional)

    def matches(self, shape) -> bool:
        return len(shape) == len(self.shape) and all(e is None or e == s for e, s in zip(self.shape, shape))

    @property
    def feature_shape(self) -> tuple:
        """The per-step feature shape (every dimension after the first)."""
        return tuple(self.shape[1:])

    def to_json(self) -> dict:
        data = {"shape": list(self.shape), "dtype": self.dtype}
        if self.max_steps is not None:
            data["max_steps"] = self.max_steps
        return data


@dataclasses.dataclass
class SplitInfo:
    samples: int
    shards: int


@dataclasses.dataclass
class Manifest:
    name: str
    modalities: dict  # name -> ModalitySpec
    classes: list
    splits: dict  # name -> SplitInfo
    tasks: list
    format_version: int = FORMAT_VERSION
    path: Optional[Path] = None  # the dataset folder it was read from (not saved)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def shard_paths(self, split: str) -> list:
        if split not in self.splits:
            raise DataError(f"{self._where()}: no split {split!r}; splits: {', '.join(self.splits) or 'none'}")
        return [self.path / shard_name(split, i) for i in range(self.splits[split].shards)]

    def _where(self) -> str:
        return str(self.path / MANIFEST_NAME) if self.path else MANIFEST_NAME

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "format_version": self.format_version,
            "modalities": {m: s.to_json() for m, s in self.modalities.items()},
            "classes": list(self.classes),
            "splits": {k: {"samples": v.samples, "shards": v.shards} for k, v in self.splits.items()},
            "tasks": list(self.tasks),
        }

    def save(self, folder) -> Path:
        folder = Path(folder)
        target = write_json_atomic(folder / MANIFEST_NAME, self.to_json())
        self.path = folder
        return target


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def _is_int(value) -> bool:
    """A JSON integer: ``true`` is a bool and ``1.0`` a float here, though Python finds both equal to 1."""
    return isinstance(value, int) and not isinstance(value, bool)


def _require(cond: bool, where: str, field: str, message: str):
    if not cond:
        raise DataError(f"{where}: field {field}: {message}")


def parse_manifest(data, where: str) -> Manifest:
    """Validate the decoded JSON of a manifest; errors name the file and the field."""
    _require(isinstance(data, dict), where, "(top level)", "must be a JSON object")
    known = {"name", "format_version", "modalities", "classes", "splits", "tasks"}
    unknown = sorted(set(data) - known)
    _require(not unknown, where, ", ".join(unknown), f"unknown key; valid keys: {', '.join(sorted(known))}")
    for key in ("name", "modalities", "classes", "splits"):
        _require(key in data, where, key, "missing")
    version = data.get("format_version", FORMAT_VERSION)
    _require(_is_int(version), where, "format_version",
             f"{json.dumps(version)} must be an integer (this reader reads {FORMAT_VERSION})")
    _require(version == FORMAT_VERSION, where, "format_version", f"{version!r} is not supported (expected {FORMAT_VERSION})")
    _require(isinstance(data["name"], str) and data["name"], where, "name", "must be a non-empty string")
    mods = data["modalities"]
    _require(isinstance(mods, dict) and mods, where, "modalities", "must be a non-empty object")
    modalities = {}
    for m, spec in mods.items():
        f = f"modalities.{m}"
        _require(m in MODALITIES, where, f, f"unknown modality; valid: {', '.join(MODALITIES)}")
        _require(isinstance(spec, dict) and {"shape", "dtype"} <= set(spec) <= {"shape", "dtype", "max_steps"}, where, f,
                 "must hold shape and dtype, and optionally max_steps")
        shape = spec["shape"]
        _require(
            isinstance(shape, list) and len(shape) >= 2 and all(s is None or (_is_int(s) and s > 0) for s in shape),
            where, f + ".shape", f"{shape!r} must be a list of at least 2 positive ints or nulls",
        )
        _require(all(s is not None for s in shape[1:]), where, f + ".shape", "only the first (time/token) dimension may be null")
        _require(spec["dtype"] in DTYPES, where, f + ".dtype", f"{spec['dtype']!r}; valid: {', '.join(DTYPES)}")
        max_steps = spec.get("max_steps")
        if max_steps is not None:
            _require(shape[0] is None, where, f + ".max_steps",
                     f"only for a varying first dimension (shape {json.dumps(shape)} fixes it)")
            _require(_is_int(max_steps) and max_steps > 0, where,
                     f + ".max_steps", f"{json.dumps(max_steps)} must be a positive integer")
        modalities[m] = ModalitySpec(tuple(shape), spec["dtype"], max_steps)
    classes = data["classes"]
    _require(isinstance(classes, list) and all(isinstance(c, str) for c in classes), where, "classes", "must be a list of strings")
    _require(len(set(classes)) == len(classes), where, "classes", "names must be unique")
    splits = {}
    _require(isinstance(data["splits"], dict) and data["splits"], where, "splits", "must be a non-empty object")
    for name, info in data["splits"].items():
        f = f"splits.{name}"
        _require(isinstance(name, str) and name and "-" not in name and "/" not in name, where, f, "split names must be non-empty, without '-' or '/'")
        _require(isinstance(info, dict) and set(info) == {"samples", "shards"}, where, f, "must hold exactly samples and shards")
        _require(all(_is_int(info[k]) and info[k] >= 0 for k in info), where, f, "samples and shards must be non-negative ints")
        splits[name] = SplitInfo(info["samples"], info["shards"])
    tasks = data.get("tasks", [])
    _require(isinstance(tasks, list) and all(isinstance(t, str) for t in tasks), where, "tasks", "must be a list of strings")
    return Manifest(name=data["name"], modalities=modalities, classes=list(classes), splits=splits, tasks=list(tasks), format_version=version)


def load_manifest(folder) -> Manifest:
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise DataError(f"{folder}: not a dataset folder (no such directory)")
    if not path.is_file():
        raise DataError(f"{path}: missing: a dataset folder holds a {MANIFEST_NAME} manifest")
    data = read_json_object(path, error=DataError)
    manifest = parse_manifest(data, str(path))
    manifest.path = folder
    return manifest
