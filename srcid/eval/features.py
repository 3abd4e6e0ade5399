"""What a frozen model makes of a dataset split: quantized features for the heads, codes for ``srcid encode``.

* :func:`resolve_model_path` turns ``--run`` (a run directory or an exported
  ``*.safetensors`` file) into the weights file; :func:`parse_layers` reads
  ``--layers``.
* :func:`scan_split` reads a split's ``meta.json`` entries and which
  modalities each clip carries, so a task can name exactly what is missing
  before anything is encoded.
* :class:`FeatureEncoder` reads a split with
  :class:`~srcid.data.reader.ShardLoader` (every clip once, in order) and
  encodes one modality: the quantized general sequences of the chosen
  layers, concatenated along the feature axis (``[N, T, D * layers]``), with
  the valid-step mask, labels and per-segment labels.
* :func:`encode_dataset` writes every clip's code indices as shards of a new
  dataset (see ``docs/EVALUATION.md``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from srcid.data import shard_format
from srcid.data.manifest import MANIFEST_NAME, Manifest, load_manifest
from srcid.data.reader import ShardLoader
from srcid.data.shards import DatasetWriter
from srcid.errors import DataError, SrcidError, check_writable_folder
from srcid.files import write_json_atomic
from srcid.model.export import WEIGHTS_SUFFIX, load_model
from srcid.model.inputs import fit_steps
from srcid.run import MODEL_FILE

DEFAULT_BATCH = 256
LAYER_CHOICES = {"1": (1,), "1,2": (1, 2)}
CODES_TASK = "codes"
CODES_INFO = "codes.json"


# --------------------------------------------------------------------------- the model


def resolve_model_path(run) -> Path:
    """The weights file of ``run``: a run directory holding ``model.safetensors``, or the file itself."""
    run = Path(run)
    if run.is_dir():
        weights = run / MODEL_FILE
        if not weights.is_file():
            raise SrcidError(f"no exported model in {run}: {MODEL_FILE} is missing (write it with `srcid export --run {run}`)")
        return weights
    if run.is_file():
        if run.suffix == ".json" and run.with_suffix(WEIGHTS_SUFFIX).is_file():
            return run.with_suffix(WEIGHTS_SUFFIX)
        if run.suffix != WEIGHTS_SUFFIX:
            raise SrcidError(f"{run}: not an exported model (expected a run directory or a *{WEIGHTS_SUFFIX} file)")
        return run
    raise SrcidError(f"{run}: no such run directory or model file")


def resolve_device(name: Optional[str]) -> torch.device:
    """``cpu``, ``cuda`` (an error without a GPU), or ``None``: CUDA when available."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SrcidError(f"--device {name}: CUDA is not available on this machine")
    return device


def open_model(run, device: Optional[str] = None) -> tuple:
    """``(model, info, weights path)`` for ``--run`` on ``device``."""
    path = resolve_model_path(run)
    model, info = load_model(path, device=resolve_device(device))
    return model, info, path


def parse_layers(text: Optional[str], model) -> tuple:
    """``--layers`` as a tuple: ``"1"`` (the paper's "only1") or ``"1,2"``; default: every layer of the model."""
    count = len(model.layers)
    if text is None:
        return tuple(range(1, count + 1))
    layers = LAYER_CHOICES.get(text.replace(" ", ""))
    if layers is None:
        raise SrcidError(f"--layers {text}: choose {' or '.join(LAYER_CHOICES)}")
    if max(layers) > count:
        raise SrcidError(f"--layers {text}: the {model.variant} model has {count} layer{'s' if count > 1 else ''}; use --layers 1")
    return layers


def check_model_input(model, manifest: Manifest, modality: str, needed_by: str) -> None:
    """The model encodes ``modality`` and the dataset's shape of it is one the model was built for."""
    where = Path(manifest.path) / MANIFEST_NAME
    if modality not in manifest.modalities:
        declared = ", ".join(manifest.modalities)
        raise SrcidError(f"{where}: declares no {modality} modality, which {needed_by} needs (declared: {declared})")
    if modality not in model.input_shapes:
        raise SrcidError(f"{needed_by} needs {modality} features, but the {model.variant} model encodes only "
                         f"{', '.join(model.input_shapes)}")
    built, found = tuple(model.input_shapes[modality]), tuple(manifest.modalities[modality].shape)
    fits = len(built) == len(found) and all(b is None or b == f for b, f in zip(built, found))
    if not fits:
        show = lambda shape: "[" + ", ".join("S" if s is None else str(s) for s in shape) + "]"  # noqa: E731
        raise SrcidError(f"{where}: {modality} shape {show(found)} does not fit the model, built for {show(built)}")


# --------------------------------------------------------------------------- what a split holds


@dataclasses.dataclass
class SplitScan:
    """The clips of one split in shard order: their ``meta.json`` and the modalities each carries."""

    folder: Path
    split: str
    keys: list
    metas: dict  # key -> meta.json content
    carried: dict  # key -> tuple of modalities whose .npy the clip holds

    def __len__(self) -> int:
        return len(self.keys)

    def where(self) -> str:
        return f"{self.folder}: split {self.split}"

    def lacking(self, predicate) -> list:
        """Keys of the clips for which ``predicate(key)`` is false."""
        return [k for k in self.keys if not predicate(k)]

    def modalities(self) -> tuple:
        """The modalities every clip of the split carries."""
        if not self.keys:
            return ()
        common = set(self.carried[self.keys[0]])
        for key in self.keys[1:]:
            common &= set(self.carried[key])
        return tuple(m for m in ("audio", "video", "text") if m in common)


def scan_split(folder, split: str, *, needed_by: str) -> SplitScan:
    """Index ``split`` of the dataset in ``folder`` and read every clip's ``meta.json``."""
    folder = Path(folder)
    manifest = load_manifest(folder)
    if split not in manifest.splits:
        raise SrcidError(f"{folder}: no split {split!r}, which {needed_by} needs (splits: {', '.join(manifest.splits)})")
    shard_format.check_shard_files(manifest, split)
    index = shard_format.index_split(manifest, split)
    keys, metas, carried = [], {}, {}
    for shard in index.shards:
        for raw in shard_format.read_raw_samples(shard, shard.samples):
            key = raw["__key__"]
            if shard_format.META_MEMBER not in raw:
                raise DataError("missing; every clip holds a meta.json", shard=shard.path, key=key, member=shard_format.META_MEMBER)
            try:
                meta = json.loads(raw[shard_format.META_MEMBER])
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise DataError(f"not valid JSON ({exc})", shard=shard.path, key=key, member=shard_format.META_MEMBER) from None
            if not isinstance(meta, dict):
                raise DataError("must be a JSON object", shard=shard.path, key=key, member=shard_format.META_MEMBER)
            keys.append(key)
            metas[key] = meta
            carried[key] = tuple(m for m in manifest.modalities if f"{m}.npy" in raw)
    if not keys:
        raise SrcidError(f"{folder}: split {split} holds no clips, which {needed_by} needs")
    return SplitScan(folder, split, keys, metas, carried)


# --------------------------------------------------------------------------- features


@dataclasses.dataclass
class SplitFeatures:
    """One modality of one split, encoded by the frozen model (CPU tensors, clips in shard order)."""

    folder: Path
    split: str
    modality: str
    keys: list
    x: torch.Tensor  # [N, T, D * layers] float32 quantized general sequences
    mask: torch.Tensor  # [N, T] bool, True on real steps (text shorter than T is padded)
    labels: torch.Tensor  # [N] int64 clip labels, -1 where a clip has none
    segments: Optional[torch.Tensor]  # [N, T, C] 0/1 per-segment labels of this modality, or None
    digests: list  # per clip, a hash of its raw features (identical recordings share it); empty unless asked
    metas: list  # per clip, its meta.json
    part: Optional[str] = None  # which part of the split the rows are (e.g. "fit", "held-out"); None: all of it

    def __len__(self) -> int:
        return len(self.keys)

    def describe(self) -> dict:
        described = {"dataset": str(self.folder), "split": self.split, "modality": self.modality, "clips": len(self.keys)}
        if self.part is not None:
            described["part"] = self.part
        return described

    def subset(self, indices, part: Optional[str] = None) -> "SplitFeatures":
        """A new ``SplitFeatures`` of the rows ``indices`` (in that order), named ``part`` (default: this one's)."""
        rows = [int(i) for i in indices]
        index = torch.tensor(rows, dtype=torch.long)
        return dataclasses.replace(
            self, keys=[self.keys[i] for i in rows], x=self.x[index], mask=self.mask[index], labels=self.labels[index],
            segments=None if self.segments is None else self.segments[index],
            digests=[self.digests[i] for i in rows] if self.digests else [], metas=[self.metas[i] for i in rows],
            part=self.part if part is None else part,
        )

    def pooled(self) -> torch.Tensor:
        """``[N, D]``: the mean of each clip's features over its valid steps."""
        weights = self.mask.to(self.x.dtype).unsqueeze(-1)
        return (self.x * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class FeatureEncoder:
    """Encodes (and caches) one modality of a split with a frozen model: the chosen layers' quantized sequences."""

    def __init__(self, model, layers: tuple, device=None, batch_size: int = DEFAULT_BATCH):
        self.model, self.layers, self.batch_size = model, tuple(layers), batch_size
        self.device = next(model.parameters()).device if device is None else torch.device(device)
        self._cache: dict = {}

    @property
    def feature_dim(self) -> int:
        """Size of one step's feature: the model's hidden size times the number of layers."""
        return self.model.config.hidden * len(self.layers)

    def encode_batch(self, features: torch.Tensor, modality: str, mask: Optional[torch.Tensor]):
        """``(x [B, T, D * layers], mask [B, T], indices per layer)`` of one batch."""
        features = features.to(self.device)
        if modality == "text":
            mask = mask.to(self.device)
            encoded = self.model.encode(features, modality, mask=mask, layers=self.layers)
            steps = encoded.quantized[0].shape[1]
            valid = fit_steps(features, mask, steps)[1]
        else:
            encoded = self.model.encode(features, modality, layers=self.layers)
            valid = torch.ones(encoded.quantized[0].shape[:2], dtype=torch.bool, device=self.device)
        x = torch.cat([q.float() for q in encoded.quantized], dim=-1)
        return x, valid, encoded.indices

    def split(self, scan: SplitScan, modality: str, *, digests: bool = False) -> SplitFeatures:
        """The features of ``modality`` for every clip of the scanned split.

        ``digests``: also hash each clip's raw features (to find clips of
        the same recording); otherwise ``SplitFeatures.digests`` is empty.
        """
        cache_key = (str(scan.folder), scan.split, modality, digests)
        if cache_key in self._cache:
            return self._cache[cache_key]
        loader = ShardLoader(scan.folder, scan.split, batch_size=self.batch_size, shuffle=False, tail="merge",
                             modalities=(modality,))
        keys, xs, masks, labels, segments, hashes = [], [], [], [], [], []
        has_segments = all(modality in (scan.metas[k].get("segments") or {}) for k in scan.keys)
        for batch in loader.epoch(0):
            raw, raw_mask = batch.features[modality], batch.masks[modality]
            x, valid, _ = self.encode_batch(raw, modality, raw_mask)
            keys += list(batch.keys)
            xs.append(x.cpu())
            masks.append(valid.cpu())
            labels.append(batch.labels)
            if has_segments:
                segments.append(batch.segments[modality])
            for i in range(len(batch) if digests else 0):
                clip = raw[i, : int(raw_mask[i].sum())].numpy()
                hashes.append(hashlib.blake2b(np.ascontiguousarray(clip).tobytes(), digest_size=16).hexdigest())
        if keys != scan.keys:
            raise SrcidError(f"{scan.where()}: the reader returned the clips in another order than the shards hold them")
        result = SplitFeatures(
            folder=scan.folder, split=scan.split, modality=modality, keys=keys, x=torch.cat(xs), mask=torch.cat(masks),
            labels=torch.cat(labels), segments=torch.cat(segments) if has_segments else None, digests=hashes,
            metas=[scan.metas[k] for k in keys],
        )
        self._cache[cache_key] = result
        return result


# --------------------------------------------------------------------------- srcid encode


def code_columns(model, layers: tuple) -> list:
    """Names of the columns of a clip's code array: one per layer (RVQ: one per layer and stage)."""
    columns = []
    for k in layers:
        books = getattr(model.layers[k - 1].quantizer, "books", None)  # RVQ: one codebook per stage
        if books is not None:
            columns += [f"layer{k}.stage{s + 1}" for s in range(len(books))]
        else:
            columns.append(f"layer{k}")
    return columns


def _codes(indices: list) -> torch.Tensor:
    """Per-layer indices ``[B, T]`` (RVQ ``[B, T, S]``) -> float32 ``[B, T, columns]``."""
    parts = [i.unsqueeze(-1) if i.dim() == 2 else i for i in indices]
    return torch.cat(parts, dim=-1).to(torch.float32)


def encode_dataset(model, info: dict, dataset_dir, out_dir, *, layers: tuple, splits=None,
                   batch_size: int = DEFAULT_BATCH) -> Manifest:
    """Write the code indices of every clip of ``splits`` (default: all) of ``dataset_dir`` to ``out_dir``.

    Each modality member holds float32 codes ``[T, columns]`` (text: its
    valid steps only); ``meta.json`` is copied. Returns the new manifest.
    """
    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    manifest = load_manifest(dataset_dir)
    if out_dir.resolve() == dataset_dir.resolve():
        raise SrcidError(f"--out {out_dir}: the codes need a folder of their own, not the dataset folder")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise SrcidError(f"--out {out_dir}: exists and is not an empty folder")
    check_writable_folder(out_dir, "--out")  # before anything is encoded
    splits = list(manifest.splits) if splits is None else list(splits)
    unknown = [s for s in splits if s not in manifest.splits]
    if unknown:
        raise SrcidError(f"--splits: {dataset_dir} has no split {unknown[0]!r} (splits: {', '.join(manifest.splits)})")
    encodable = [m for m in manifest.modalities if m in model.input_shapes]
    if not encodable:
        raise SrcidError(f"{dataset_dir}: none of its modalities ({', '.join(manifest.modalities)}) is one the "
                         f"{model.variant} model encodes ({', '.join(model.input_shapes)})")
    for m in encodable:
        check_model_input(model, manifest, m, "srcid encode")
    encoder = FeatureEncoder(model, layers, batch_size=batch_size)
    columns = code_columns(model, layers)
    steps = model.steps_per_clip
    shapes = {m: ([None if m == "text" else steps, len(columns)], "float32") for m in encodable}
    scans = {split: scan_split(dataset_dir, split, needed_by="srcid encode") for split in splits}
    carried_by_split = {split: _encodable_carried(scan, encodable) for split, scan in scans.items()}
    with DatasetWriter(out_dir, name=f"{manifest.name}-{CODES_TASK}", modalities=shapes, classes=manifest.classes,
                       tasks=list(manifest.tasks) + [CODES_TASK]) as writer:
        for split, scan in scans.items():
            carried = carried_by_split[split]
            loader = ShardLoader(dataset_dir, split, batch_size=batch_size, shuffle=False, tail="merge", modalities=carried)
            for batch in loader.epoch(0):
                codes, valid = {}, {}
                for m in carried:
                    _, valid[m], indices = encoder.encode_batch(batch.features[m], m, batch.masks[m])
                    codes[m] = _codes(indices).cpu().numpy()
                    valid[m] = valid[m].cpu().numpy()
                for i, key in enumerate(batch.keys):
                    clip = {m: codes[m][i][valid[m][i]] for m in carried}
                    writer.write(split, key, clip, scan.metas[key])
    result = writer.manifest
    _write_codes_info(out_dir, {
        "source": str(dataset_dir),
        "model": info.get("path"),
        "variant": model.variant,
        "step": info.get("extra", {}).get("step"),
        "layers": list(layers),
        "columns": columns,
        "codebook_size": getattr(model.layers[0].quantizer, "num_codes", None),
        "steps": steps,
        "dtype": "float32 (integer code indices)",
    })
    return result


def _encodable_carried(scan: SplitScan, encodable) -> tuple:
    """The modalities the model encodes that the split's clips carry, the same for every clip."""
    carried = tuple(m for m in scan.modalities() if m in encodable)
    if not carried:
        raise SrcidError(f"{scan.where()}: its clips share no modality the model encodes ({', '.join(encodable)})")
    mixed = [k for k in scan.keys if set(scan.carried[k]) & set(encodable) != set(carried)]
    if mixed:
        raise SrcidError(f"{scan.where()}: clip {mixed[0]} carries {', '.join(scan.carried[mixed[0]])}, others "
                         f"{', '.join(carried)}: srcid encode needs splits whose clips carry the same modalities")
    return carried


def _write_codes_info(folder: Path, info: dict) -> None:
    write_json_atomic(folder / CODES_INFO, info, allow_nan=True)
