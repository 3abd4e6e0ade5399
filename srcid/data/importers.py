"""Importers: the original feature releases converted into feature shards.

``srcid data import LAYOUT --src ROOT --out DIR`` reads one of the layouts
below under ``ROOT`` and writes one dataset folder (shards + ``dataset.json``)
with :class:`srcid.data.shards.DatasetWriter`. The folder is written as a
hidden sibling ``.DIR.import-<pid>`` and renamed to ``DIR`` once complete, so
``DIR`` never holds a half-written import; an existing ``DIR`` that is not
empty is refused unless ``--overwrite`` is given, and then replaced whole (no
stale shard of the old dataset is left). Every problem with the input
(a missing file, csv column or zip, a zip without an array, a wrong shape, a
label outside the classes) is a one-line :class:`DataError` naming the file
and the field.

Common rules:

* Per-clip features are zips holding one array: a ``.pkl``/``.pickle`` member
  (read with :mod:`srcid.data.safe_pickle`, which refuses anything but numpy
  arrays) or a ``.npy`` member (read with ``allow_pickle=False``).
  ``__MACOSX/`` entries are ignored; more than one array member is an error.
* Audio and video get T = 10 rows: a shorter clip repeats its last row, a
  longer one is cut to 10 (the authors' rule), except Clotho audio, which is
  averaged into 10 equal time bins so the whole recording is kept.
* The other dimensions are taken from the first clip and every clip must
  match them. Arrays are stored as float16 if the first clip's are float16,
  else as float32.
* Text features are not part of these releases (the original code embeds
  prompts and captions with BERT on the fly). Where a layout has text, an
  optional ``.npz`` of pre-extracted token features ``[S, Dt]`` supplies it
  (read with ``allow_pickle=False``); without that file the dataset has no
  text modality and the sentence is kept as ``caption`` in ``meta.json``.
* Class lists hold no background entry: a background segment has no label.
* A layout without split information puts a fixed 20% of clips (chosen by a
  hash of the clip id, so the same on every run) in ``test`` and the rest in
  ``train``.
* Keys are the clip ids; characters other than letters, digits, ``_`` and
  ``-`` become ``_`` followed by a short hash of the original id, which is
  kept as ``source`` in ``meta.json``.

Layouts (the paths relative to ``ROOT``; where two are listed, the first that
exists is used):

``vggsound-avel`` (pretraining, 141 classes)
    ``vggsound-avel40k.csv`` | ``data/vggsound-avel40k.csv``: columns
    ``category``, ``video_id``, ``split``. Features ``audio/zip/<id>.zip`` |
    ``feature/audio/zip/<id>.zip`` (``[T, 128]``) and ``video/zip/<id>.zip`` |
    ``feature/video/zip/<id>.zip`` (``[T, 7, 7, 512]``). Optional:
    ``label/zip/<id>.zip`` | ``feature/label/zip/<id>.zip`` (per-segment event
    presence ``[10]``, giving ``segments``); ``VggsoundAVEL40kCategories.txt``
    (class order, one per line; else the sorted csv categories);
    ``vggsoundCategories2Prompts.csv`` (columns ``label`` or ``class`` or
    ``category``, and ``prompt``: the caption); ``prompt_features.npz`` (one
    entry per class name: the prompt's token features, giving ``text``).
    Splits from the ``split`` column; tasks ``pretrain``.

``ave`` (28 classes)
    ``audio_feature.h5``, ``visual_feature.h5``, ``labels.h5`` (dataset key
    ``avadataset`` in all three; a file holding a single dataset may name it
    otherwise), ``{train,val,test}_order.h5`` (key ``order``: row indices;
    at least one). Labels ``[N, 10, 29]``: 28 classes in the standard AVE
    order, then background. ``label`` = the clip's event class; tasks
    ``classification``.

``avvp`` (25 classes)
    ``AVVP_eval_audio.csv`` and ``AVVP_eval_visual.csv`` (or the
    ``*_checked_combined.csv`` versions; also under ``data/``), tab-separated,
    columns ``filename``, ``onset``, ``offset``, ``event_labels``: one row per
    event, or one row per clip whose fields are comma-separated lists.
    Features ``feature/audio/zip/<id>.zip`` | ``audio/zip/<id>.zip`` and the
    same for ``video``, ``<id>`` being the filename or its first 11
    characters (the YouTube id). Optional ``AVVP_Categories.txt``; else the
    standard 25 LLP classes. Audio and visual events give separate
    ``segments``; ``label`` is null; tasks ``localization``.

``ucf-vgg`` (16 shared classes)
    ``ucf2vggsound.csv`` (``category``, ``video_id``, optional ``split``) with
    video features ``UCF101/feature/video/zip/<id>.zip`` |
    ``UCF101/video/zip/<id>.zip``; ``vggsound2ucf.csv`` (same columns) with
    audio features ``vggsound40k/feature/audio/zip/<id>.zip`` |
    ``vggsound40k/audio/zip/<id>.zip``. Optional ``UCF101sameVGGSound.txt``
    and ``VGGSoundsameUCF101.txt``: the class lists of the two sources,
    line i of one naming the same class as line i of the other (the dataset
    uses the UCF names); without them both csvs must use the same names.
    A clip carries only video (splits ``ucf_<split>``) or only audio
    (``vgg_<split>``); tasks ``classification``.

``clotho`` (retrieval)
    ``clotho_captions_development.csv``, ``..._validation.csv``,
    ``..._evaluation.csv`` (at least one; splits ``train``, ``val``,
    ``test``), columns ``file_name``, ``caption_1`` .. ``caption_5``. Audio
    features ``feature/zip/<stem>.zip`` | ``audio/zip/<stem>.zip`` with
    ``<stem>`` the file name without its extension. Optional
    ``caption_features.npz`` with entries ``<file_name>#<i>`` (i = 1..5).
    One sample per (audio, caption) pair, keyed ``<stem>-<i>``, with the
    caption as ``caption`` and the file name as ``source`` (group the five
    samples of an audio by ``source``); tasks ``retrieval``.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import math
import re
import zipfile
from pathlib import Path
from typing import Callable, Optional, Union

import h5py
import numpy as np
from tqdm import tqdm

from srcid.data.safe_pickle import load_npy_array, load_pickled_array
from srcid.data.shards import DEFAULT_MAX_SAMPLES, DatasetWriter, write_staged
from srcid.errors import DataError, SrcidError, check_writable_folder

T = 10
TEST_FRACTION = 0.2
PICKLE_SUFFIXES = (".pkl", ".pickle")

AVE_CLASSES = (
    "Church bell", "Male speech, man speaking", "Bark", "Fixed-wing aircraft, airplane", "Race car, auto racing",
    "Female speech, woman speaking", "Helicopter", "Violin, fiddle", "Flute", "Ukulele", "Frying (food)", "Truck",
    "Shofar", "Motorcycle", "Acoustic guitar", "Train horn", "Clock", "Banjo", "Goat", "Baby cry, infant cry", "Bus",
    "Chainsaw", "Cat", "Horse", "Toilet flush", "Rodents, rats, mice", "Accordion", "Mandolin",
)
AVVP_CLASSES = (
    "Speech", "Car", "Cheering", "Dog", "Cat", "Frying_(food)", "Basketball_bounce", "Fire_alarm", "Chainsaw", "Cello",
    "Banjo", "Singing", "Chicken_rooster", "Violin_fiddle", "Vacuum_cleaner", "Baby_laughter", "Accordion",
    "Lawn_mower", "Motorcycle", "Helicopter", "Acoustic_guitar", "Telephone_bell_ringing", "Baby_cry_infant_cry",
    "Blender", "Clapping",
)
CLOTHO_SPLITS = {"development": "train", "validation": "val", "evaluation": "test"}
CLOTHO_CAPTIONS = 5

_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-]+")


# ----------------------------------------------------------------------------- small readers


def _find(root: Path, candidates, what: str, required: bool = True) -> Optional[Path]:
    """The first existing ``root/candidate``; a DataError listing them if none and ``required``."""
    for candidate in candidates:
        path = root / candidate
        if path.exists():
            return path
    if required:
        also = f"; also looked for {', '.join(candidates[1:])}" if len(candidates) > 1 else ""
        raise DataError(f"{root / candidates[0]}: missing ({what}{also})")
    return None


def read_csv(path: Path, columns, delimiter: str = ",") -> list:
    """Rows of a csv as ``(line number, dict)``; a DataError names a missing column or empty field."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            header = [h.strip() for h in (reader.fieldnames or [])]
            reader.fieldnames = header
            for column in columns:
                if column not in header:
                    raise DataError(f"{path}: missing column {column!r} (columns: {', '.join(header) or 'none'})")
            rows = []
            for row in reader:
                for column in columns:
                    value = row.get(column)
                    if value is None or not value.strip():
                        raise DataError(f"{path}: line {reader.line_num}: empty field {column!r}")
                rows.append((reader.line_num, {k: (v.strip() if isinstance(v, str) else v) for k, v in row.items() if k}))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except csv.Error as exc:
        raise DataError(f"{path}: malformed csv ({exc})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return rows


def csv_header(path: Path, delimiter: str = ",") -> list:
    """The stripped column names of a csv."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return [h.strip() for h in (next(csv.reader(f, delimiter=delimiter), None) or [])]
    except (UnicodeDecodeError, csv.Error, OSError) as exc:
        raise DataError(f"{path}: cannot read its header ({exc})".replace("\n", " ")) from None


def read_lines(path: Path) -> list:
    """Non-empty stripped lines (a class list)."""
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    lines = [line for line in lines if line]
    if not lines:
        raise DataError(f"{path}: empty class list")
    if len(set(lines)) != len(lines):
        raise DataError(f"{path}: class names must be unique")
    return lines


def read_zip_array(path: Path, what: str = "features") -> np.ndarray:
    """The one numeric array in a per-clip zip (a pickled ``.pkl`` or a ``.npy`` member)."""
    if not path.is_file():
        raise DataError(f"{path}: missing ({what})")
    try:
        with zipfile.ZipFile(path) as archive:
            members = [
                info for info in archive.infolist()
                if not info.is_dir() and not info.filename.startswith("__MACOSX/") and not Path(info.filename).name.startswith("._")
            ]
            arrays = [m for m in members if m.filename.lower().endswith(PICKLE_SUFFIXES + (".npy",))]
            if not arrays:
                listed = ", ".join(m.filename for m in members) or "nothing"
                raise DataError(f"{path}: no .pkl or .npy array member (holds {listed})")
            if len(arrays) > 1:
                raise DataError(f"{path}: {len(arrays)} array members ({', '.join(m.filename for m in arrays)}); expected one")
            member = arrays[0]
            data = archive.read(member)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable zip ({exc})") from None
    where = f"{path}:{member.filename}"
    if member.filename.lower().endswith(".npy"):
        return load_npy_array(data, where)
    return load_pickled_array(data, where)


def fit_time(array: np.ndarray, where: str, modality: str, pool: bool = False) -> np.ndarray:
    """``array`` with exactly T rows: repeat the last row or cut (``pool``: average T bins when longer)."""
    if array.ndim < 2:
        raise DataError(f"{where}: {modality} array of shape {list(array.shape)}: expected [T, ...] with T rows")
    rows = array.shape[0]
    if rows == 0:
        raise DataError(f"{where}: {modality} array has no rows")
    if rows < T:
        return np.concatenate([array, np.repeat(array[-1:], T - rows, axis=0)])
    if rows > T:
        if pool:
            return np.stack([chunk.mean(axis=0) for chunk in np.array_split(array.astype(np.float64), T)]).astype(array.dtype)
        return array[:T]
    return array


def safe_key(name: str) -> str:
    """A clip key from an id: unchanged when already valid, else sanitized plus a short hash."""
    if name and not _KEY_CHARS.search(name):
        return name
    digest = hashlib.md5(name.encode("utf-8")).hexdigest()[:8]
    return f"{_KEY_CHARS.sub('_', name).strip('_')}_{digest}"


def holdout_split(clip_id: str) -> str:
    """``"test"`` for a fixed TEST_FRACTION of ids (by hash), else ``"train"``."""
    value = int(hashlib.md5(clip_id.encode("utf-8")).hexdigest()[:8], 16) / 2**32
    return "test" if value < TEST_FRACTION else "train"


def _check_split(name: str, where: str) -> str:
    if not name or "-" in name or "/" in name:
        raise DataError(f"{where}: split {name!r}: names must be non-empty, without '-' or '/'")
    return name


class TextFeatures:
    """Token features ``[S, Dt]`` by name, from an ``.npz`` read with ``allow_pickle=False``."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._npz = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise DataError(f"{path}: not a readable .npz ({type(exc).__name__}: {exc})".replace("\n", " ")) from None
        if not hasattr(self._npz, "files"):
            raise DataError(f"{path}: not an .npz archive of named arrays")
        self.names = set(self._npz.files)

    def get(self, name: str, needed_by: str) -> np.ndarray:
        if name not in self.names:
            raise DataError(f"{self.path}: no entry {name!r} (needed by {needed_by})")
        try:
            array = self._npz[name]
        except Exception as exc:
            raise DataError(f"{self.path}: entry {name!r} is unreadable ({type(exc).__name__})") from None
        if array.ndim != 2 or array.shape[0] == 0 or array.dtype.kind not in "biuf":
            raise DataError(f"{self.path}: entry {name!r}: expected numeric token features [S, Dt], got {array.dtype} {list(array.shape)}")
        return array

    def close(self):
        self._npz.close()


# ----------------------------------------------------------------------------- writing


@dataclasses.dataclass
class Clip:
    """One clip to write: ``features`` maps a modality to ``(loader, where)``, loaded when written;
    ``meta`` is meta.json's content or a function returning it (called when written)."""

    split: str
    key: str
    features: dict
    meta: Union[dict, Callable[[], dict]]


@functools.lru_cache(maxsize=8)
def _read_fitted(path: Path, modality: str, clip_id: str, pool: bool) -> np.ndarray:
    """A zip's array with T rows; cached so a first clip or an audio shared by captions is read once."""
    return fit_time(read_zip_array(path, f"{modality} features of clip {clip_id}"), str(path), modality, pool=pool)


def _zip_loader(path: Path, modality: str, clip_id: str, pool: bool = False) -> tuple:
    return (lambda: _read_fitted(path, modality, clip_id, pool)), str(path)


def _declared(clips: list) -> dict:
    """Per modality ``(shape, dtype, where)`` from the first clip that carries it."""
    declared = {}
    for clip in clips:
        for modality, (load, where) in clip.features.items():
            if modality in declared:
                continue
            array = load()
            dtype = "float16" if array.dtype == np.float16 else "float32"
            shape = [None if modality == "text" else T, *array.shape[1:]]
            declared[modality] = (shape, dtype, where)
    return declared


def write_clips(out, name: str, classes: list, tasks: list, clips: list, max_samples_per_shard: int,
                progress=None) -> Path:
    """Write ``clips`` as one dataset folder; returns its manifest path."""
    if not clips:
        raise DataError(f"{name}: the source lists no clips")
    if max_samples_per_shard < 1:
        raise SrcidError(f"--shard-size must be >= 1, got {max_samples_per_shard}")
    declared = _declared(clips)
    order = [m for m in ("audio", "video", "text") if m in declared]
    modalities = {m: (declared[m][0], declared[m][1]) for m in order}
    with DatasetWriter(out, name=name, modalities=modalities, classes=classes, tasks=tasks,
                       max_samples_per_shard=max_samples_per_shard) as writer:
        for clip in tqdm(clips, desc=f"import {name}", unit="clip", disable=None if progress is None else not progress):
            features = {}
            for modality, (load, where) in clip.features.items():
                array = load()
                shape, _, first = declared[modality]
                if array.ndim != len(shape) or any(e is not None and e != s for e, s in zip(shape, array.shape)):
                    expected = ", ".join("S" if e is None else str(e) for e in shape)
                    raise DataError(f"{where}: {modality} array of shape {list(array.shape)}: expected [{expected}] like the first clip ({first})")
                if not np.isfinite(array).all():
                    raise DataError(f"{where}: {modality} array holds NaN or Inf")
                features[modality] = array
            writer.write(clip.split, clip.key, features, clip.meta() if callable(clip.meta) else clip.meta)
    return Path(out) / "dataset.json"


def _class_index(classes: dict, name: str, where: str, source: str) -> int:
    if name not in classes:
        raise DataError(f"{where}: class {name!r} is not one of the {len(classes)} classes of {source}")
    return classes[name]


# ----------------------------------------------------------------------------- layouts


def _vggsound_meta(label: int, video_id: str, label_dir: Optional[Path], caption: Optional[str]) -> dict:
    meta = {"label": label}
    if label_dir is not None:
        label_zip = label_dir / f"{video_id}.zip"
        presence = read_zip_array(label_zip, f"event presence of clip {video_id}").reshape(-1)
        if presence.shape[0] != T:
            raise DataError(f"{label_zip}: event presence holds {presence.shape[0]} values; expected {T}")
        if not np.isin(presence, (0, 1)).all():
            raise DataError(f"{label_zip}: event presence values must be 0 or 1")
        segments = [[label] if v else [] for v in presence]
        meta["segments"] = {"audio": segments, "video": segments}
    if caption is not None:
        meta["caption"] = caption
    meta["source"] = video_id
    return meta


def import_vggsound_avel(src: Path, out: Path, max_samples_per_shard: int = DEFAULT_MAX_SAMPLES, progress=None) -> list:
    """VGGSound-AVEL 40k: csv + per-clip audio/video zips (+ optional labels, prompts, prompt features)."""
    meta_csv = _find(src, ("vggsound-avel40k.csv", "data/vggsound-avel40k.csv"), "the clip list csv")
    audio_dir = _find(src, ("audio/zip", "feature/audio/zip"), "audio feature zips")
    video_dir = _find(src, ("video/zip", "feature/video/zip"), "video feature zips")
    label_dir = _find(src, ("label/zip", "feature/label/zip"), "", required=False)
    rows = read_csv(meta_csv, ("category", "video_id", "split"))
    categories_file = _find(src, ("VggsoundAVEL40kCategories.txt", "data/VggsoundAVEL40kCategories.txt"), "", required=False)
    names = read_lines(categories_file) if categories_file else sorted({row["category"] for _, row in rows})
    class_source = str(categories_file) if categories_file else f"{meta_csv} (its categories)"
    classes = {n: i for i, n in enumerate(names)}
    prompts = {}
    prompts_file = _find(src, ("vggsoundCategories2Prompts.csv", "data/vggsoundCategories2Prompts.csv"), "", required=False)
    if prompts_file:
        header = csv_header(prompts_file)
        class_column = next((c for c in ("label", "class", "category") if c in header), None)
        if class_column is None:
            raise DataError(f"{prompts_file}: missing column 'label' (or 'class', 'category') (columns: {', '.join(header) or 'none'})")
        for line, row in read_csv(prompts_file, (class_column, "prompt")):
            _class_index(classes, row[class_column], f"{prompts_file}: line {line}", class_source)
            prompts[row[class_column]] = row["prompt"]
    text_file = _find(src, ("prompt_features.npz", "data/prompt_features.npz"), "", required=False)
    text = TextFeatures(text_file) if text_file else None
    clips = []
    for line, row in rows:
        where = f"{meta_csv}: line {line}"
        label = _class_index(classes, row["category"], where, class_source)
        video_id = row["video_id"]
        meta = functools.partial(_vggsound_meta, label, video_id, label_dir, prompts.get(row["category"]))
        features = {"audio": _zip_loader(audio_dir / f"{video_id}.zip", "audio", video_id),
                    "video": _zip_loader(video_dir / f"{video_id}.zip", "video", video_id)}
        if text is not None:
            features["text"] = (lambda name=row["category"], w=where: text.get(name, w), str(text_file))
        clips.append(Clip(_check_split(row["split"], where), safe_key(video_id), features, meta))
    try:
        return [write_clips(out, "vggsound-avel", names, ["pretrain"], clips, max_samples_per_shard, progress)]
    finally:
        if text is not None:
            text.close()


def _h5_dataset(path: Path, preferred: str, what: str):
    """The open file and its dataset ``preferred`` (or its only dataset)."""
    if not path.is_file():
        raise DataError(f"{path}: missing ({what})")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path}: not a readable HDF5 file ({exc})") from None
    if preferred in f and isinstance(f[preferred], h5py.Dataset):
        return f, f[preferred]
    datasets = [k for k in f if isinstance(f[k], h5py.Dataset)]
    if len(datasets) == 1:
        return f, f[datasets[0]]
    f.close()
    raise DataError(f"{path}: no dataset {preferred!r} (holds {', '.join(datasets) or 'no datasets'})")


def import_ave(src: Path, out: Path, max_samples_per_shard: int = DEFAULT_MAX_SAMPLES, progress=None) -> list:
    """AVE: HDF5 audio/visual features, labels and split orders."""
    opened = []
    try:
        arrays = {}
        for modality, filename in (("audio", "audio_feature.h5"), ("video", "visual_feature.h5"), ("labels", "labels.h5")):
            f, data = _h5_dataset(src / filename, "avadataset", f"AVE {modality}")
            opened.append(f)
            arrays[modality] = (data, src / filename)
        labels, labels_path = arrays["labels"]
        count = labels.shape[0]
        if labels.ndim != 3 or labels.shape[1:] != (T, len(AVE_CLASSES) + 1):
            raise DataError(f"{labels_path}: labels of shape {list(labels.shape)}: expected [N, {T}, {len(AVE_CLASSES) + 1}] (28 classes + background)")
        for modality in ("audio", "video"):
            data, path = arrays[modality]
            if data.shape[0] != count:
                raise DataError(f"{path}: {data.shape[0]} clips but {labels_path} has {count}")
        orders = {}
        for split in ("train", "val", "test"):
            path = src / f"{split}_order.h5"
            if path.exists():
                f, order = _h5_dataset(path, "order", f"the {split} split order")
                opened.append(f)
                orders[split] = (np.asarray(order[...]).reshape(-1), path)
        if not orders:
            raise DataError(f"{src}/{{train,val,test}}_order.h5: missing (at least one split order)")
        seen = {}
        clips = []
        for split, (indices, path) in orders.items():
            if indices.dtype.kind not in "iu":
                raise DataError(f"{path}: order must hold integer row indices, got {indices.dtype}")
            for index in indices.tolist():
                if not 0 <= index < count:
                    raise DataError(f"{path}: row index {index} outside 0..{count - 1}")
                if index in seen:
                    raise DataError(f"{path}: row index {index} is also in {seen[index]}")
                seen[index] = path.name
                row = np.asarray(labels[index], dtype=np.float64)
                if not np.isin(row, (0.0, 1.0)).all():
                    raise DataError(f"{labels_path}: row {index}: label values must be 0 or 1")
                events = row[:, : len(AVE_CLASSES)] > 0.5
                segments = [np.flatnonzero(events[t]).tolist() for t in range(T)]
                counts = events.sum(axis=0)
                label = int(counts.argmax()) if counts.max() > 0 else None
                meta = {"label": label, "segments": {"audio": segments, "video": segments}, "source": f"AVE row {index}"}
                features = {
                    m: (lambda d=arrays[m][0], i=index, p=arrays[m][1], m=m: fit_time(np.asarray(d[i]), f"{p}: row {i}", m),
                        f"{arrays[m][1]}: row {index}")
                    for m in ("audio", "video")
                }
                clips.append(Clip(split, f"ave{index:05d}", features, meta))
        return [write_clips(out, "ave", list(AVE_CLASSES), ["classification"], clips, max_samples_per_shard, progress)]
    finally:
        for f in opened:
            f.close()


def _events(path: Path, line: int, row: dict, classes: dict, class_source: str) -> list:
    """``(class, onset, offset)`` of one AVVP csv row (single values or comma-separated lists)."""
    where = f"{path}: line {line}"
    labels = [v.strip() for v in row["event_labels"].split(",")]
    onsets = [v.strip() for v in row["onset"].split(",")]
    offsets = [v.strip() for v in row["offset"].split(",")]
    if not len(labels) == len(onsets) == len(offsets):
        raise DataError(f"{where}: fields 'onset', 'offset', 'event_labels' list {len(onsets)}, {len(offsets)}, {len(labels)} values; expected as many")
    events = []
    for name, on, off in zip(labels, onsets, offsets):
        bounds = []
        for field, value in (("onset", on), ("offset", off)):
            try:
                number = float(value)
            except ValueError:
                raise DataError(f"{where}: field {field!r}: {value!r} is not a number") from None
            if not math.isfinite(number) or number != int(number):
                raise DataError(f"{where}: field {field!r}: {value!r} is not a whole second")
            bounds.append(int(number))
        onset, offset = bounds
        if not 0 <= onset < offset <= T:
            raise DataError(f"{where}: fields 'onset', 'offset': {onset}..{offset} must satisfy 0 <= onset < offset <= {T}")
        events.append((_class_index(classes, name, f"{where}: field 'event_labels'", class_source), onset, offset))
    return events


def _clip_zip(folder: Path, filename: str) -> Path:
    for candidate in (filename, filename[:11]):
        path = folder / f"{candidate}.zip"
        if path.is_file():
            return path
    return folder / f"{filename[:11]}.zip"


def import_avvp(src: Path, out: Path, max_samples_per_shard: int = DEFAULT_MAX_SAMPLES, progress=None) -> list:
    """AVVP (LLP): tab-separated per-modality event csvs + per-clip audio/video zips."""
    csvs = {}
    for modality, stem in (("audio", "AVVP_eval_audio"), ("video", "AVVP_eval_visual")):
        csvs[modality] = _find(src, (f"{stem}.csv", f"{stem}_checked_combined.csv", f"data/{stem}.csv",
                                     f"data/{stem}_checked_combined.csv"), f"{modality} event annotations")
    audio_dir = _find(src, ("feature/audio/zip", "audio/zip"), "audio feature zips")
    video_dir = _find(src, ("feature/video/zip", "video/zip"), "video feature zips")
    categories_file = _find(src, ("AVVP_Categories.txt", "data/AVVP_Categories.txt"), "", required=False)
    names = read_lines(categories_file) if categories_file else list(AVVP_CLASSES)
    class_source = str(categories_file) if categories_file else "AVVP (the standard 25 classes)"
    classes = {n: i for i, n in enumerate(names)}
    segments = {}  # filename -> modality -> per-segment sets
    for modality, path in csvs.items():
        for line, row in read_csv(path, ("filename", "onset", "offset", "event_labels"), delimiter="\t"):
            clip = segments.setdefault(row["filename"], {"audio": [set() for _ in range(T)], "video": [set() for _ in range(T)]})
            for label, onset, offset in _events(path, line, row, classes, class_source):
                for t in range(onset, offset):
                    clip[modality][t].add(label)
    clips = []
    for filename, per_modality in segments.items():
        meta = {
            "label": None,
            "segments": {m: [sorted(s) for s in per_modality[m]] for m in ("audio", "video")},
            "source": filename,
        }
        features = {"audio": _zip_loader(_clip_zip(audio_dir, filename), "audio", filename),
                    "video": _zip_loader(_clip_zip(video_dir, filename), "video", filename)}
        clips.append(Clip(holdout_split(filename), safe_key(filename), features, meta))
    return [write_clips(out, "avvp", names, ["localization"], clips, max_samples_per_shard, progress)]


def import_ucf_vgg(src: Path, out: Path, max_samples_per_shard: int = DEFAULT_MAX_SAMPLES, progress=None) -> list:
    """UCF101 video clips and VGGSound audio clips of shared classes."""
    sources = {
        "ucf": ("video", _find(src, ("ucf2vggsound.csv", "data/ucf2vggsound.csv"), "the UCF101 clip list csv"),
                _find(src, ("UCF101/feature/video/zip", "UCF101/video/zip"), "UCF101 video feature zips")),
        "vgg": ("audio", _find(src, ("vggsound2ucf.csv", "data/vggsound2ucf.csv"), "the VGGSound clip list csv"),
                _find(src, ("vggsound40k/feature/audio/zip", "vggsound40k/audio/zip"), "VGGSound audio feature zips")),
    }
    rows = {name: read_csv(path, ("category", "video_id")) for name, (_, path, _) in sources.items()}
    ucf_file = _find(src, ("UCF101sameVGGSound.txt", "data/UCF101sameVGGSound.txt"), "", required=False)
    vgg_file = _find(src, ("VGGSoundsameUCF101.txt", "data/VGGSoundsameUCF101.txt"), "", required=False)
    if (ucf_file is None) != (vgg_file is None):
        present, absent = (ucf_file, "VGGSoundsameUCF101.txt") if ucf_file else (vgg_file, "UCF101sameVGGSound.txt")
        raise DataError(f"{src / absent}: missing (the class list aligned line by line with {present})")
    if ucf_file is not None:
        names = read_lines(ucf_file)
        vgg_names = read_lines(vgg_file)
        if len(vgg_names) != len(names):
            raise DataError(f"{vgg_file}: {len(vgg_names)} classes but {ucf_file} has {len(names)}; the lists must align line by line")
        lookup = {"ucf": {n: i for i, n in enumerate(names)}, "vgg": {n: i for i, n in enumerate(vgg_names)}}
        class_sources = {"ucf": str(ucf_file), "vgg": str(vgg_file)}
    else:
        names = sorted({row["category"] for source_rows in rows.values() for _, row in source_rows})
        lookup = {"ucf": {n: i for i, n in enumerate(names)}, "vgg": {n: i for i, n in enumerate(names)}}
        class_sources = {s: "the categories of both csvs" for s in sources}
    clips = []
    for source, (modality, path, folder) in sources.items():
        for line, row in rows[source]:
            where = f"{path}: line {line}"
            label = _class_index(lookup[source], row["category"], f"{where}: field 'category'", class_sources[source])
            video_id = row["video_id"]
            split = _check_split(row["split"], where) if row.get("split") else holdout_split(video_id)
            meta = {"label": label, "segments": {modality: [[label]] * T}, "source": f"{source}:{video_id}"}
            features = {modality: _zip_loader(folder / f"{video_id}.zip", modality, video_id)}
            clips.append(Clip(f"{source}_{split}", safe_key(video_id), features, meta))
    return [write_clips(out, "ucf-vgg", names, ["classification"], clips, max_samples_per_shard, progress)]


def import_clotho(src: Path, out: Path, max_samples_per_shard: int = DEFAULT_MAX_SAMPLES, progress=None) -> list:
    """Clotho: caption csvs + per-audio feature zips (+ optional caption features)."""
    caption_columns = tuple(f"caption_{i}" for i in range(1, CLOTHO_CAPTIONS + 1))
    csvs = {split: src / f"clotho_captions_{part}.csv" for part, split in CLOTHO_SPLITS.items()
            if (src / f"clotho_captions_{part}.csv").exists()}
    if not csvs:
        listed = ", ".join(f"clotho_captions_{p}.csv" for p in CLOTHO_SPLITS)
        raise DataError(f"{src}: missing caption csv (one of {listed})")
    audio_dir = _find(src, ("feature/zip", "audio/zip"), "audio feature zips")
    text_file = _find(src, ("caption_features.npz",), "", required=False)
    text = TextFeatures(text_file) if text_file else None
    clips = []
    for split, path in csvs.items():
        for line, row in read_csv(path, ("file_name",) + caption_columns):
            file_name = row["file_name"]
            stem = file_name.rsplit(".", 1)[0] if "." in file_name else file_name
            audio = _zip_loader(audio_dir / f"{stem}.zip", "audio", file_name, pool=True)
            for i, column in enumerate(caption_columns, start=1):
                features = {"audio": audio}
                if text is not None:
                    entry = f"{file_name}#{i}"
                    features["text"] = (lambda e=entry, w=f"{path}: line {line}": text.get(e, w), str(text_file))
                meta = {"label": None, "caption": row[column], "source": file_name}
                clips.append(Clip(split, f"{safe_key(stem)}-{i}", features, meta))
    try:
        return [write_clips(out, "clotho", [], ["retrieval"], clips, max_samples_per_shard, progress)]
    finally:
        if text is not None:
            text.close()


LAYOUTS: dict[str, Callable] = {
    "vggsound-avel": import_vggsound_avel,
    "ave": import_ave,
    "avvp": import_avvp,
    "ucf-vgg": import_ucf_vgg,
    "clotho": import_clotho,
}


def _check_out(src: Path, out: Path, overwrite: bool) -> None:
    if src.resolve() == out.resolve():
        raise DataError(f"{out}: the output folder must differ from --src")
    if out.exists() and not out.is_dir():
        raise SrcidError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise SrcidError(f"--out {out}: exists and is not empty; pass --overwrite to replace it")
        if out.resolve() in src.resolve().parents:
            raise SrcidError(f"--out {out}: holds --src {src}; --overwrite would delete the source")


def run_importer(layout: str, src, out, max_samples_per_shard: int = DEFAULT_MAX_SAMPLES, progress=None,
                 overwrite: bool = False) -> list:
    """Convert the original layout ``layout`` under ``src`` into a dataset folder ``out``; returns manifest paths.

    ``out`` must be new or empty, unless ``overwrite``: then the finished
    import replaces it whole. The import is written into a hidden sibling
    folder and renamed to ``out`` when complete; on any error that folder is
    removed and ``out`` is left as it was.
    """
    if layout not in LAYOUTS:
        raise SrcidError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise DataError(f"{src}: not a folder (the original dataset's root)")
    if out.is_symlink():
        out = out.resolve()  # replace the folder it points to, not the link
    _check_out(src, out, overwrite)
    check_writable_folder(out.parent, f"--out {out}: its folder")  # before anything is read

    def write(staging):
        paths = LAYOUTS[layout](src, staging, max_samples_per_shard=max_samples_per_shard, progress=progress)
        return [out / Path(p).relative_to(staging) for p in paths]

    try:
        return write_staged(out, "import", "the import", write)
    finally:
        _read_fitted.cache_clear()
