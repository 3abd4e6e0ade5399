"""Reading feature shards as batches, for one rank of a (distributed) run.

How an epoch is laid out, so that every sample of the split is read exactly
once across ranks and data-loader workers and every rank runs the same number
of steps:

1. The shards' tar headers give each shard's samples and their byte ranges
   (:func:`srcid.data.shard_format.index_shard`, cached per path and mtime). A
   member larger than the manifest allows (its tar header's size against
   :func:`srcid.data.shard_format.member_size_limits`) or a key that is a path
   (``../x``, ``/x``) is refused there, before any byte of it is read.
2. A permutation of the shards, seeded by ``(seed, epoch)``, defines a global
   order of the split's N samples (shard after shard).
3. With ``tail="merge"``, rank ``r`` of ``W`` takes a contiguous range of
   that order: ``N // W`` samples, one more for the first ``N % W`` ranks,
   so the ranges cover every sample once and each shard is read by few
   ranks. The range is cut into ``steps = max(1, (N // W) // B)`` batches of
   ``B`` clips, the last one taking the remainder (up to ``2B`` clips; fewer
   than ``B`` when the rank has fewer than ``B`` samples).
4. With ``tail="drop"`` every batch holds exactly ``B`` clips and there are
   ``steps = (N // W) // B`` of them. The ``N - W * steps * B`` samples left
   over are removed from the order first, drawn at random each epoch (the
   last ones when ``shuffle=False``), and are not read in that epoch; the
   rest is cut into equal contiguous ranges, one per rank.
   Either way the step count depends on N (the manifest's count), W and B
   only, so it is the same on every rank.
5. Sample-level shuffling: consecutive batch ranges are grouped into blocks
   of about ``shuffle_buffer`` samples, and the samples of each block are
   permuted (seeded by ``(seed, epoch, rank, block)``) before the block is
   cut back into batches.
6. Batch ``k`` of the epoch goes to data-loader worker ``k mod num_workers``.
   A worker reads its batches' samples by seeking to their byte ranges and
   expanding them with WebDataset's tar iterators, validates each sample
   (:func:`srcid.data.shard_format.decode_sample`, the checks of
   ``srcid data check``) and collates the batch. The DataLoader returns the
   workers' outputs round-robin, i.e. in step order.

So the batches are a function of ``(seed, epoch, rank, world_size,
batch_size)`` only, identical for any ``num_workers``, and resuming at
``start_step`` simply does not read the earlier batches.

A problem found in a worker travels to the main process as data and is raised
there as the same one-line :class:`DataError`. With ``skip_bad`` a bad sample
(or a sample lost to a corrupt shard) is left out of its batch, counted in
:attr:`ShardLoader.skipped` and logged; a batch whose samples are all bad is
still an error, since dropping it would change the rank's step count.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from srcid.data import shard_format
from srcid.data.batch import Batch
from srcid.data.manifest import Manifest, load_manifest
from srcid.errors import DataError, SrcidError

log = logging.getLogger(__name__)

TAILS = ("merge", "drop")
_LOST = -1  # sample number of a slot whose sample a corrupt shard no longer holds


def collate(samples: list, manifest: Manifest, modalities) -> Batch:
    """Stack validated samples into a float32 :class:`Batch`, zero-padding varying lengths."""
    size = len(samples)
    num_classes = manifest.num_classes
    features, masks, segments = {}, {}, {}
    for m in modalities:
        lengths = [s.features[m].shape[0] for s in samples]
        steps = max(lengths)
        values = np.zeros((size, steps) + manifest.modalities[m].feature_shape, dtype=np.float32)
        mask = np.zeros((size, steps), dtype=bool)
        for i, (s, length) in enumerate(zip(samples, lengths)):
            values[i, :length] = s.features[m]
            mask[i, :length] = True
        features[m], masks[m] = torch.from_numpy(values), torch.from_numpy(mask)
        if any(m in s.segments for s in samples):
            hot = np.zeros((size, steps, num_classes), dtype=np.float32)
            for i, s in enumerate(samples):
                for t, classes in enumerate(s.segments.get(m, ())):
                    hot[i, t, classes] = 1.0
            segments[m] = torch.from_numpy(hot)
    labels = torch.tensor([-1 if s.label is None else s.label for s in samples], dtype=torch.int64)
    return Batch(keys=[s.key for s in samples], features=features, masks=masks, labels=labels,
                 segments=segments, captions=[s.caption for s in samples])


def _identity(item):
    return item


class _EpochSteps(IterableDataset):
    """The batches of one rank's epoch from ``start_step`` on, split across workers by step."""

    def __init__(self, loader: "ShardLoader", steps: list, start_step: int):
        self.shards = loader.split_index.shards
        self.slot_shard, self.slot_sample = loader._slot_shard, loader._slot_sample
        self.manifest, self.modalities, self.skip_bad = loader.manifest, loader.modalities, loader.skip_bad
        self.carried = loader.split_index.modalities
        self.steps, self.start_step = steps, start_step

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for step in range(self.start_step + worker, len(self.steps), workers):
            try:
                batch, skipped = self._read(step)
            except DataError as exc:
                yield step, None, [], exc
                return
            yield step, batch, skipped, None

    def _read(self, step: int):
        """Read, validate and collate the samples of one batch, in batch order."""
        slots = self.steps[step]
        samples = [None] * len(slots)
        skipped = []
        wanted: dict = {}
        for pos, slot in enumerate(slots):
            shard, number = int(self.slot_shard[slot]), int(self.slot_sample[slot])
            if number == _LOST:
                skipped.append(f"sample lost to a damaged shard: {self.shards[shard].error}")
            else:
                wanted.setdefault(shard, []).append((number, pos))
        for shard, picks in sorted(wanted.items()):
            picks.sort()
            index = self.shards[shard]
            positions = iter(pos for _, pos in picks)
            for raw in shard_format.read_raw_samples(index, [index.samples[n] for n, _ in picks]):
                pos = next(positions)
                try:
                    samples[pos] = shard_format.decode_sample(raw, self.manifest, index.path, carried=self.carried,
                                                              modalities=self.modalities)
                except DataError as exc:
                    if not self.skip_bad:
                        raise
                    skipped.append(str(exc))
        good = [s for s in samples if s is not None]
        if not good:
            raise DataError(f"all {len(slots)} samples of step {step} are bad; first: {skipped[0]}")
        return collate(good, self.manifest, self.modalities), skipped


class ShardLoader:
    """Batches of one split for rank ``rank`` of ``world_size`` (see the module docstring).

    ``modalities`` restricts what is decoded (default: all the split's
    samples carry, see :func:`srcid.data.shard_format.split_modalities`). ``skipped`` and ``skip_reasons`` tell what the last
    :meth:`epoch` left out (only with ``skip_bad``).
    """

    def __init__(self, dataset_dir, split: str, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, seed: int = 0, shuffle: bool = True, shuffle_buffer: int = 1000,
                 modalities=None, tail: str = "merge", skip_bad: bool = False, pin_memory: bool = False):
        if batch_size < 1:
            raise SrcidError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise SrcidError(f"rank {rank} is not in [0, world_size={world_size})")
        if num_workers < 0:
            raise SrcidError(f"num_workers must be >= 0, got {num_workers}")
        if shuffle_buffer < 1:
            raise SrcidError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}")
        if tail not in TAILS:
            raise SrcidError(f"tail {tail!r}; valid: {', '.join(TAILS)}")
        self.manifest: Manifest = load_manifest(dataset_dir)
        self.manifest.shard_paths(split)  # raises, naming the splits, when there is no such split
        total = self.manifest.splits[split].samples
        if total // world_size < (batch_size if tail == "drop" else 1):
            need = f"world_size x batch_size = {world_size * batch_size}" if tail == "drop" else f"world_size = {world_size}"
            raise SrcidError(f"split {split!r} of {self.manifest.name} has {total} samples, fewer than {need}")
        shard_format.check_shard_files(self.manifest, split)
        self.split_index = shard_format.index_split(self.manifest, split, skip_bad=skip_bad)
        carried = self.split_index.modalities
        modalities = carried if modalities is None else tuple(modalities)
        if not modalities or any(m not in carried for m in modalities):
            raise SrcidError(f"modalities {list(modalities)}: split {split!r} of {self.manifest.name} carries "
                             f"{', '.join(carried) or 'none'}")
        self.split, self.batch_size, self.rank, self.world_size = split, batch_size, rank, world_size
        self.num_workers, self.seed, self.shuffle, self.shuffle_buffer = num_workers, seed, shuffle, shuffle_buffer
        self.modalities, self.tail, self.skip_bad = modalities, tail, skip_bad
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.skipped = 0
        self.skip_reasons: list = []
        # slot tables: slot -> (shard, sample number in shard); lost samples sit in a unit of their own
        shard_of, number_of, self._units = [], [], []
        for i, shard in enumerate(self.split_index.shards):
            self._units.append(np.arange(len(shard_of), len(shard_of) + len(shard)))
            shard_of += [i] * len(shard)
            number_of += range(len(shard))
        lost = self.split_index.lost
        if lost:
            damaged = next(i for i, s in enumerate(self.split_index.shards) if s.error is not None)
            self._units.append(np.arange(len(shard_of), len(shard_of) + lost))
            shard_of += [damaged] * lost
            number_of += [_LOST] * lost
        self._slot_shard = np.asarray(shard_of, dtype=np.int64)
        self._slot_sample = np.asarray(number_of, dtype=np.int64)

    @property
    def samples(self) -> int:
        """The split's sample count, as the manifest gives it."""
        return self.manifest.splits[self.split].samples

    def steps_per_epoch(self) -> int:
        """Batches per epoch; the same on every rank (from the manifest's count alone)."""
        steps = (self.samples // self.world_size) // self.batch_size
        return max(1, steps) if self.tail == "merge" else steps

    def _rng(self, *words) -> np.random.Generator:
        return np.random.default_rng([self.seed, *words])

    def _plan(self, epoch: int) -> list:
        """This rank's batches of ``epoch``: one array of slots per step, in batch order."""
        if epoch < 0:
            raise SrcidError(f"epoch must be >= 0, got {epoch}")
        units = list(self._units)
        if self.shuffle:
            units = [units[i] for i in self._rng(epoch, 0).permutation(len(units))]
        order = np.concatenate(units) if units else np.zeros(0, dtype=np.int64)
        steps, size, world = self.steps_per_epoch(), self.batch_size, self.world_size
        if self.tail == "drop":
            used = world * steps * size
            if self.shuffle and used < len(order):
                keep = np.sort(self._rng(epoch, 1).choice(len(order), size=used, replace=False))
                order = order[keep]
            order = order[:used]
            start = self.rank * steps * size
            mine = order[start:start + steps * size]
        else:
            per_rank, extra = divmod(len(order), world)
            start = self.rank * per_rank + min(self.rank, extra)
            mine = order[start:start + per_rank + (1 if self.rank < extra else 0)]
        cuts = [k * size for k in range(1, steps)]
        block = max(1, self.shuffle_buffer // size) if self.shuffle else steps
        batches = []
        for first in range(0, steps, block):
            last = min(first + block, steps)
            lo = first * size
            hi = last * size if last < steps else len(mine)
            chunk = mine[lo:hi]
            if self.shuffle:
                chunk = chunk[self._rng(epoch, 2, self.rank, first // block).permutation(len(chunk))]
            bounds = [c - lo for c in cuts if lo < c < hi]
            batches.extend(np.split(chunk, bounds))
        return batches

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """The batches of ``epoch`` from ``start_step`` on (earlier ones are not read)."""
        steps = self._plan(epoch)
        if not 0 <= start_step <= len(steps):
            raise SrcidError(f"start_step {start_step} is not in [0, {len(steps)}]")
        return self._iterate(epoch, steps, start_step)

    def _iterate(self, epoch: int, steps: list, start_step: int) -> Iterator[Batch]:
        self.skipped, self.skip_reasons = 0, []
        workers = min(self.num_workers, len(steps) - start_step)
        # The batches depend on (seed, epoch) only; the DataLoader's own seed draw comes from a private
        # generator so that reading never moves the global RNG (dropout) and a resumed run stays exact.
        private = torch.Generator()
        private.manual_seed(self.seed * 1_000_003 + epoch)
        loader = DataLoader(_EpochSteps(self, steps, start_step), batch_size=None, num_workers=workers,
                            collate_fn=_identity, pin_memory=self.pin_memory, generator=private)
        expected = start_step
        for step, batch, skipped, error in loader:
            if error is not None:
                raise error
            if step != expected:
                raise RuntimeError(f"reader returned step {step} where {expected} was due")
            expected += 1
            self.skipped += len(skipped)
            for reason in skipped:
                if len(self.skip_reasons) < shard_format.MAX_REASONS and reason not in self.skip_reasons:
                    self.skip_reasons.append(reason)
            yield batch
        if self.skipped:
            log.warning("%s [%s] epoch %d: %d bad samples skipped (first: %s)", self.manifest.name, self.split,
                        epoch, self.skipped, "; ".join(self.skip_reasons))

    def __repr__(self) -> str:
        return (f"ShardLoader({Path(self.manifest.path)}, {self.split!r}, batch_size={self.batch_size}, "
                f"rank={self.rank}/{self.world_size}, steps_per_epoch={self.steps_per_epoch()})")
