"""The feature-shard format (see docs/DATA-FORMAT.md): decoding, indexing and reading shards.

Used by the reader (:mod:`srcid.data.reader`), by evaluation's feature
encoder and by ``srcid data check`` (:mod:`srcid.data.check`) alike:

* :func:`check_shard_files`: the shard files in the folder are exactly the
  ones the manifest lists.
* :func:`index_shard`: the tar structure of one shard, read from its member
  headers only (no data): each sample's key and byte range, members grouped
  into whole samples, and an intact end of archive. A truncated or corrupt
  tar is reported by shard name; so is a key that is a path (``/``, ``..``)
  and a member larger than the manifest allows (:func:`member_size_limits`,
  from the tar header's size, before any byte of it is read). Indexes are
  cached per path, mtime, size and limits.
* :func:`index_split`: all shards of a split, their sample counts against the
  manifest's, keys unique within the split, and the modalities its samples
  carry (:func:`split_modalities`: the same for every sample of a split).
* :func:`read_raw_samples`: the raw samples of chosen byte ranges of a shard,
  expanded by WebDataset's tar iterators.
* :func:`decode_sample`: one raw sample checked member by member (presence,
  ``.npy`` dtype and shape, finite values, labels, segments, caption) and
  decoded; :data:`META_MEMBER` names the member holding a sample's metadata.

Every problem is a one-line :class:`DataError` naming the shard, key and
member (or the manifest, split and field).
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
import tarfile
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
from webdataset.handlers import reraise_exception
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from srcid.data.manifest import MANIFEST_NAME, Manifest, shard_name
from srcid.errors import DataError

META_MEMBER = "meta.json"
MAX_REASONS = 3  # skip reasons a report (srcid data check, the reader's log) quotes
# Member size caps (docs/DATA-FORMAT.md, "Size limits"), checked against the tar header before a member is read:
NPY_HEADER_ALLOWANCE = 4096  # bytes allowed for a .npy header besides the data (numpy writes 128 for these shapes)
DEFAULT_MAX_STEPS = 65536  # steps of a varying first dimension (text tokens) when the manifest gives no max_steps
OTHER_MEMBER_MAX_BYTES = 16 << 20  # meta.json (and any member the manifest does not declare, refused later anyway)
TAR_EXTENSION_MAX_BYTES = 1 << 20  # a pax or GNU long-name header's own data, which tarfile reads whole
_BLOCK = tarfile.BLOCKSIZE
_SHARD_RE = re.compile(r"^(?P<split>.+)-(?P<index>\d+)\.tar$")


def _one_line(text) -> str:
    return " ".join(str(text).split())


# --------------------------------------------------------------------------- samples


@dataclasses.dataclass
class Sample:
    """One validated clip; ``features`` keeps the stored dtype."""

    key: str
    features: dict  # modality -> np.ndarray [T, ...]
    lengths: dict  # modality -> T (first dimension), also for modalities not decoded
    label: Optional[int]
    segments: dict  # modality -> list of T lists of class indices
    caption: Optional[str]
    meta: dict


def _npy_header(data: bytes):
    """(shape, fortran_order, dtype, data offset) of ``.npy`` bytes, by numpy's own header parser."""
    stream = io.BytesIO(data)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    return tuple(shape), fortran, dtype, stream.tell()


def _describe_nonfinite(array: np.ndarray) -> str:
    nan, inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
    first = [int(i) for i in np.argwhere(~np.isfinite(array))[0]]
    return f"{nan} NaN and {inf} Inf values (first at index {first}); features must be finite"


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.4g} MiB"


def member_size_limits(manifest: Manifest) -> tuple:
    """The largest size each member of a sample may have: ``((member, bytes, why), ...)``, ``"*"`` for any other.

    ``<modality>.npy``: the manifest's shape x the dtype's itemsize plus :data:`NPY_HEADER_ALLOWANCE`
    bytes of ``.npy`` header; a varying first dimension counts as the modality's ``max_steps``, or
    :data:`DEFAULT_MAX_STEPS` where the manifest gives none. ``meta.json`` and any other member:
    :data:`OTHER_MEMBER_MAX_BYTES`. A tuple, so that it can key the index cache.
    """
    limits = []
    for modality, spec in manifest.modalities.items():
        steps = spec.shape[0]
        if steps is None:
            steps = spec.max_steps or DEFAULT_MAX_STEPS
            source = (f"max_steps {steps}" if spec.max_steps else
                      f"no max_steps in the manifest, so at most {steps} steps")
        else:
            source = None
        data = math.prod((steps,) + tuple(spec.shape[1:])) * np.dtype(spec.dtype).itemsize
        shape = "[" + ", ".join("null" if s is None else str(s) for s in spec.shape) + "]"
        why = (f"shape {shape} {spec.dtype}{'' if source is None else f' ({source})'}: {data} bytes of data "
               f"+ at most {NPY_HEADER_ALLOWANCE} bytes of .npy header")
        limits.append((f"{modality}.npy", data + NPY_HEADER_ALLOWANCE, why))
    limits.append((META_MEMBER, OTHER_MEMBER_MAX_BYTES, f"{_mib(OTHER_MEMBER_MAX_BYTES)} for {META_MEMBER}"))
    limits.append(("*", OTHER_MEMBER_MAX_BYTES, f"{_mib(OTHER_MEMBER_MAX_BYTES)} for a member the manifest does not declare"))
    return tuple(limits)


def decode_sample(raw: dict, manifest: Manifest, shard: str, *, carried=None, decode: bool = True,
                  modalities=None) -> Sample:
    """Check one raw WebDataset sample against ``manifest`` and decode it.

    ``raw`` maps member names (``audio.npy``, ``meta.json``) to bytes, plus
    ``__key__``. The sample must hold ``meta.json`` and the arrays of the
    ``carried`` modalities (default: all the manifest declares; see
    :func:`split_modalities`), each checked for dtype and shape. The arrays
    of ``modalities`` (default: all carried) are loaded and checked for
    NaN/Inf, the others only by their ``.npy`` header; ``decode=False`` loads
    none. Arrays are read by numpy's ``.npy`` header parser and
    ``np.frombuffer`` (read-only views; nothing is ever unpickled). Raises
    :class:`DataError` naming shard, key and member.
    """
    key = raw.get("__key__")

    def fail(message, member):
        raise DataError(message, shard=str(shard), key=key, member=member)

    carried = tuple(manifest.modalities) if carried is None else tuple(carried)
    present = sorted(name for name in raw if not name.startswith("__"))
    expected = [f"{m}.npy" for m in carried] + [META_MEMBER]
    if not carried:
        fail(f"missing; a sample holds at least one of {', '.join(f'{m}.npy' for m in manifest.modalities)}",
             f"{next(iter(manifest.modalities))}.npy")
    for member in expected:
        if member not in raw:
            fail(f"missing; expected {', '.join(expected)} (found {', '.join(present) or 'nothing'})", member)
    for member in present:
        if member not in expected:
            declared = member.endswith(".npy") and member[:-4] in manifest.modalities
            why = "the other samples of this split do not carry it" if declared else "not a member of this dataset's samples"
            fail(f"unexpected member ({why}); expected {', '.join(expected)}", member)

    try:
        meta = json.loads(raw[META_MEMBER])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        fail(f"not valid JSON ({_one_line(exc)})", META_MEMBER)
    if not isinstance(meta, dict):
        fail(f"must be a JSON object, found {type(meta).__name__}", META_MEMBER)

    features, lengths = {}, {}
    for modality in carried:
        spec = manifest.modalities[modality]
        member = f"{modality}.npy"
        load = decode and (modalities is None or modality in modalities)
        data = raw[member]
        if not data.startswith(np.lib.format.MAGIC_PREFIX):
            fail("not a .npy array (no NPY header)", member)
        try:
            shape, fortran, dtype, offset = _npy_header(data)
        except (ValueError, EOFError) as exc:
            fail(f"not a valid .npy header ({_one_line(exc)})", member)
        if dtype != np.dtype(spec.dtype):
            fail(f"dtype {dtype}, expected {spec.dtype}", member)
        if not spec.matches(shape) or shape[0] < 1:
            expect = ["any>=1" if s is None else s for s in spec.shape]
            fail(f"shape {list(shape)}, expected {expect}", member)
        if spec.max_steps is not None and shape[0] > spec.max_steps:
            fail(f"shape {list(shape)}: {shape[0]} steps, more than the manifest's max_steps {spec.max_steps}", member)
        count = math.prod(shape)
        if len(data) - offset != count * dtype.itemsize:
            fail(f"array data holds {len(data) - offset} bytes, its header promises {count * dtype.itemsize}", member)
        if load:
            array = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape, order="F" if fortran else "C")
            if not np.isfinite(array).all():
                fail(_describe_nonfinite(array), member)
            features[modality] = array
        lengths[modality] = shape[0]

    num_classes = manifest.num_classes
    label = meta.get("label")
    if label is not None and (isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < num_classes):
        fail(f"label {label!r} is not null or a class index in [0, {num_classes})", META_MEMBER)

    segments = meta.get("segments", {})
    if not isinstance(segments, dict):
        fail(f"segments must be an object mapping a modality to per-step class lists, found {type(segments).__name__}", META_MEMBER)
    for modality, steps in segments.items():
        if modality not in carried:
            fail(f"segments.{modality}: not a modality of this sample ({', '.join(carried)})", META_MEMBER)
        length = lengths[modality]
        if not isinstance(steps, list) or len(steps) != length:
            found = f"{len(steps)} entries" if isinstance(steps, list) else type(steps).__name__
            fail(f"segments.{modality}: expected a list of {length} class lists (one per step of {modality}.npy), found {found}", META_MEMBER)
        for t, classes in enumerate(steps):
            if not isinstance(classes, list):
                fail(f"segments.{modality}[{t}]: expected a list of class indices, found {classes!r}", META_MEMBER)
            for c in classes:
                if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < num_classes:
                    fail(f"segments.{modality}[{t}]: {c!r} is not a class index in [0, {num_classes})", META_MEMBER)

    caption = meta.get("caption")
    if caption is not None and not isinstance(caption, str):
        fail(f"caption must be a string, found {type(caption).__name__}", META_MEMBER)
    return Sample(key=key, features=features, lengths=lengths, label=label, segments=segments, caption=caption, meta=meta)


# --------------------------------------------------------------------------- shard structure


@dataclasses.dataclass(frozen=True)
class SampleSpan:
    """Where one sample's members lie in its shard: bytes ``[start, end)``."""

    key: str
    start: int
    end: int
    members: tuple  # member names without the key: "audio.npy", "meta.json", ...


@dataclasses.dataclass(frozen=True)
class ShardIndex:
    """The samples of one shard, from its tar headers.

    ``error`` is set when the tar is truncated or corrupt; ``samples`` then
    holds the samples whose bytes lie before the damage.
    """

    path: str
    samples: tuple
    error: Optional[DataError] = None

    def __len__(self) -> int:
        return len(self.samples)


_INDEX_CACHE: dict = {}


class _Broken(Exception):
    """The tar structure of a shard is damaged (internal; becomes a DataError)."""

    def __init__(self, message, key=None, member=None, *, keep_last=True):
        super().__init__(message)
        self.key, self.member, self.keep_last = key, member, keep_last


class _HeaderReads:
    """The shard file as tarfile sees it while indexing: every read is of a header.

    tarfile reads a pax or GNU long-name header's data whole; a header that claims more than
    :data:`TAR_EXTENSION_MAX_BYTES` is refused before it is read.
    """

    def __init__(self, f):
        self.f = f

    def read(self, size=-1):
        if size is None or size < 0 or size > TAR_EXTENSION_MAX_BYTES:
            raise _Broken(f"a tar header extension (pax or GNU long name) of {size} bytes at byte {self.f.tell()}: "
                          f"more than {TAR_EXTENSION_MAX_BYTES}; not read", keep_last=False)
        return self.f.read(size)

    def seek(self, *args):
        return self.f.seek(*args)

    def tell(self):
        return self.f.tell()


def _key_problem(key: str) -> Optional[str]:
    """Why a tar member's key is not a clip id (the writer's keys never are paths), or None."""
    if "/" in key or "\\" in key or key in (".", ".."):
        return "a clip key may not hold '/' or '\\' (no folders, '..' or absolute paths)"
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        return "a clip key may not hold control characters"
    return None


def _oversized(f, info, member: str, limit: int, why: str) -> str:
    """The message for a member larger than its cap; a ``.npy`` member's header (its first bytes) names what it holds."""
    message = f"{info.size} bytes in its tar header, more than the {limit} bytes the manifest allows ({why})"
    if member.endswith(".npy"):
        try:
            f.seek(info.offset_data)
            shape, _, dtype, _ = _npy_header(f.read(min(info.size, NPY_HEADER_ALLOWANCE)))
            message += f"; its .npy header says {dtype} {list(shape)}"
        except (ValueError, EOFError, OSError):
            pass
    return message + "; not read"


def _scan_tar(path: str, limits: Optional[tuple] = None) -> ShardIndex:
    spans, seen = [], set()
    key = start = None  # the sample being collected
    members: list = []
    end = 0  # end of the last member's data
    caps = {member: (limit, why) for member, limit, why in limits or ()}
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            try:
                with tarfile.open(fileobj=_HeaderReads(f), mode="r:") as tar:
                    for info in tar:
                        name = info.name
                        if not info.isreg():
                            raise _Broken(f"tar entry {name!r} is not a regular file", keep_last=False)
                        prefix, member = base_plus_ext(name)
                        if prefix is None:
                            raise _Broken(f"tar member {name!r} is not named <key>.<member>", keep_last=False)
                        if prefix != key:
                            if key is not None:
                                spans.append(SampleSpan(key, start, end, tuple(members)))
                                key = None
                            problem = _key_problem(prefix)
                            if problem is not None:
                                raise _Broken(f"{problem}; tar member {name!r} not read", repr(prefix), keep_last=False)
                            if prefix in seen:
                                raise _Broken("members of this key are not contiguous: the tar members do not form whole samples",
                                              prefix, member, keep_last=False)
                            seen.add(prefix)
                            key, start, members = prefix, info.offset, []
                        if member in members:
                            raise _Broken("member appears twice in the sample", key, member, keep_last=False)
                        limit, why = caps.get(member) or caps.get("*") or (None, None)
                        if limit is not None and info.size > limit:
                            raise _Broken(_oversized(f, info, member, limit, why), key, member, keep_last=False)
                        members.append(member)
                        end = info.offset_data + _BLOCK * math.ceil(info.size / _BLOCK)
            except tarfile.ReadError as exc:
                where = "at the start" if end == 0 else f"after byte {end}"
                raise _Broken(f"tar data unreadable {where} ({_one_line(exc)}): truncated or corrupt") from None
            f.seek(end)
            marker = f.read(_BLOCK)
            if len(marker) < _BLOCK:
                raise _Broken(f"truncated: the archive ends at byte {end + len(marker)} without an end-of-archive block")
            if marker.count(0) != _BLOCK:
                raise _Broken(f"corrupt: invalid tar header at byte {end}")
    except _Broken as exc:
        # the sample being collected is kept when its bytes are all there; decode_sample judges it
        if exc.keep_last and key is not None and end <= size:
            spans.append(SampleSpan(key, start, end, tuple(members)))
        error = DataError(f"{exc} ({len(spans)} readable samples before it)", shard=path, key=exc.key, member=exc.member)
        return ShardIndex(path, tuple(spans), error)
    except OSError as exc:
        return ShardIndex(path, (), DataError(f"cannot read shard ({_one_line(exc.strerror or exc)})", shard=path))
    if key is not None:
        spans.append(SampleSpan(key, start, end, tuple(members)))
    return ShardIndex(path, tuple(spans))


def index_shard(path, limits: Optional[tuple] = None) -> ShardIndex:
    """The sample index of one shard, cached per path, mtime, size and ``limits``.

    ``limits`` (:func:`member_size_limits`) caps each member's size by its tar header; a larger member
    ends the index there, as damage does. Without limits no member is capped.
    """
    path = str(path)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise DataError(f"cannot read shard ({_one_line(exc.strerror or exc)})", shard=path) from None
    stamp = (st.st_mtime_ns, st.st_size, limits)
    hit = _INDEX_CACHE.get(path)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    index = _scan_tar(path, limits)
    _INDEX_CACHE[path] = (stamp, index)
    return index


class _ByteRange:
    """A read-only stream over bytes ``[start, end)`` of an open file descriptor."""

    def __init__(self, fd: int, start: int, end: int):
        self.fd, self.pos, self.end = fd, start, end

    def read(self, size: int = -1) -> bytes:
        left = self.end - self.pos
        size = left if size is None or size < 0 else min(size, left)
        if size <= 0:
            return b""
        data = os.pread(self.fd, size, self.pos)
        self.pos += len(data)
        return data


def read_raw_samples(index: ShardIndex, spans: Iterable[SampleSpan]) -> Iterator[dict]:
    """The raw samples of ``spans`` (in shard order) as WebDataset dicts.

    Adjacent spans are read as one byte range; each range is expanded by
    WebDataset's ``tar_file_expander`` and ``group_by_keys``.
    """
    spans = list(spans)
    ranges = []
    for span in spans:
        if ranges and ranges[-1][1] == span.start:
            ranges[-1][1] = span.end
        else:
            ranges.append([span.start, span.end])
    try:
        fd = os.open(index.path, os.O_RDONLY)
    except OSError as exc:
        raise DataError(f"cannot read shard ({_one_line(exc.strerror or exc)})", shard=index.path) from None
    try:
        sources = ({"url": index.path, "stream": _ByteRange(fd, a, b)} for a, b in ranges)
        samples = group_by_keys(tar_file_expander(sources, handler=reraise_exception), lcase=False, handler=reraise_exception)
        expected = iter(spans)
        while True:
            try:
                raw = next(samples)
            except StopIteration:
                break
            except (tarfile.TarError, OSError, ValueError, EOFError) as exc:
                reason = _one_line(str(exc.args[0]).split(" @ ")[0] if exc.args else exc)
                raise DataError(f"tar data unreadable ({reason}): truncated or corrupt", shard=index.path) from None
            span = next(expected, None)
            if span is None or raw["__key__"] != span.key:
                raise DataError("shard changed since it was indexed (found key "
                                f"{raw['__key__']!r} where {span.key if span else 'nothing'!r} was expected)", shard=index.path)
            yield raw
        missing = next(expected, None)
        if missing is not None:
            raise DataError("shard changed since it was indexed (sample missing)", shard=index.path, key=missing.key)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- splits


def manifest_file(manifest: Manifest) -> str:
    return str(Path(manifest.path) / MANIFEST_NAME)


def check_shard_files(manifest: Manifest, split: Optional[str] = None) -> None:
    """Every shard the manifest lists exists, and no other shard file is there
    (for one ``split``, or for all)."""
    folder = Path(manifest.path)
    where = manifest_file(manifest)
    splits = manifest.splits if split is None else {split: manifest.splits[split]}
    for name, info in splits.items():
        for i in range(info.shards):
            if not (folder / shard_name(name, i)).is_file():
                raise DataError(f"{where}: split {name!r} lists {info.shards} shards but {shard_name(name, i)} is missing")
    for file in sorted(os.listdir(folder)):
        if not file.endswith(".tar") or file.startswith("."):
            continue
        match = _SHARD_RE.match(file)
        owner = match["split"] if match else None
        if split is not None and owner != split:
            continue
        if owner not in manifest.splits:
            raise DataError(f"{where}: shard file {file} belongs to no split the manifest lists ({', '.join(manifest.splits)})")
        info = manifest.splits[owner]
        if file not in {shard_name(owner, i) for i in range(info.shards)}:
            raise DataError(f"{where}: shard file {file} is not listed: split {owner!r} has {info.shards} shards")


def split_modalities(manifest: Manifest, shards) -> tuple:
    """The modalities a split's samples carry, from their member names.

    A clip may carry any non-empty subset of the declared modalities, but all
    clips of one split carry the same ones (e.g. video only for a video-only
    split). That set is the most common one among the split's samples (on a
    tie, the larger); :func:`decode_sample` reports the samples that differ.
    """
    counts: dict = {}
    for shard in shards:
        for span in shard.samples:
            carried = tuple(m for m in manifest.modalities if f"{m}.npy" in span.members)
            counts[carried] = counts.get(carried, 0) + 1
    if not counts:
        return tuple(manifest.modalities)
    return max(counts, key=lambda carried: (counts[carried], len(carried)))


@dataclasses.dataclass
class SplitIndex:
    """The shard indexes of one split; ``lost`` counts samples the manifest
    promises but corrupt shards no longer hold (only with ``skip_bad``)."""

    split: str
    shards: list  # ShardIndex per shard, in shard order
    expected: int
    modalities: tuple  # what every sample of the split carries (split_modalities)
    lost: int = 0

    @property
    def readable(self) -> int:
        return sum(len(s) for s in self.shards)


def index_split(manifest: Manifest, split: str, *, skip_bad: bool = False, shard_indexes=None) -> SplitIndex:
    """Index every shard of ``split`` and check the counts against the manifest.

    A corrupt shard is an error unless ``skip_bad``; then its unreadable rest
    is counted in ``lost``. ``shard_indexes`` may pass indexes already built
    (with ``member_size_limits(manifest)``).
    """
    paths = manifest.shard_paths(split)
    limits = member_size_limits(manifest)
    shards = list(shard_indexes) if shard_indexes is not None else [index_shard(p, limits) for p in paths]
    damaged = [s for s in shards if s.error is not None]
    if damaged and not skip_bad:
        raise damaged[0].error
    where = manifest_file(manifest)
    expected = manifest.splits[split].samples
    found = sum(len(s) for s in shards)
    if found > expected or (found != expected and not damaged):
        raise DataError(f"{where}: split {split!r}: the manifest says {expected} samples, its {len(shards)} shards hold {found}")
    owner = {}
    for shard in shards:
        for span in shard.samples:
            if span.key in owner:
                raise DataError(f"key is not unique in split {split!r} (also in {owner[span.key]})", shard=shard.path, key=span.key)
            owner[span.key] = shard.path
    return SplitIndex(split, shards, expected, split_modalities(manifest, shards), lost=expected - found)
