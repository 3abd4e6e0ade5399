"""The shard reader: exact-once epochs on every rank and worker count, determinism,
resume, padding and labels, and errors raised from worker processes."""
import io
import shutil

import numpy as np
import pytest
import torch

from helpers_data import NUM_CLASSES, edit_member, first_key, npy_bytes, read_tar, write_dataset, write_tar
from srcid.data import shard_format
from srcid.data.reader import ShardLoader
from srcid.errors import DataError, SrcidError

N = 45  # shards of 7: six full ones and one of 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reader") / "ds"
    clips = write_dataset(folder, n=N, shard_size=7)
    return folder, clips


def read_epoch(folder, epoch=0, start_step=0, split="train", **kw):
    loader = ShardLoader(folder, split, **kw)
    return loader, list(loader.epoch(epoch, start_step))


def keys_of(batches):
    return [k for b in batches for k in b.keys]


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_merge_epoch_reads_every_sample_once_with_equal_steps(dataset, world_size, num_workers):
    folder, clips = dataset
    batch_size = 4
    seen, steps = [], set()
    for rank in range(world_size):
        loader, batches = read_epoch(folder, epoch=1, batch_size=batch_size, rank=rank, world_size=world_size,
                                     num_workers=num_workers, shuffle_buffer=9)
        expected_steps = max(1, (N // world_size) // batch_size)
        assert loader.steps_per_epoch() == expected_steps == len(batches)
        steps.add(len(batches))
        assert all(len(b) == batch_size for b in batches[:-1])
        assert len(batches[-1]) >= batch_size
        seen += keys_of(batches)
    assert len(steps) == 1
    assert len(seen) == len(set(seen)) == N
    assert set(seen) == set(clips)


@pytest.mark.parametrize("world_size,num_workers", [(1, 0), (2, 2), (3, 1)])
def test_drop_tail_gives_full_batches_and_drops_a_different_remainder_each_epoch(dataset, world_size, num_workers):
    folder, clips = dataset
    batch_size = 4
    dropped = []
    for epoch in (0, 1):
        seen = []
        for rank in range(world_size):
            loader, batches = read_epoch(folder, epoch=epoch, batch_size=batch_size, rank=rank, world_size=world_size,
                                         num_workers=num_workers, tail="drop")
            steps = (N // world_size) // batch_size
            assert loader.steps_per_epoch() == steps == len(batches)
            assert all(len(b) == batch_size for b in batches)
            seen += keys_of(batches)
        assert len(seen) == len(set(seen)) == world_size * steps * batch_size
        dropped.append(set(clips) - set(seen))
    assert len(dropped[0]) == N - world_size * steps * batch_size > 0
    assert dropped[0] != dropped[1]


def test_single_step_when_rank_share_is_below_batch_size(dataset):
    folder, _ = dataset
    seen = []
    for rank in range(3):
        loader, batches = read_epoch(folder, batch_size=64, rank=rank, world_size=3)
        assert loader.steps_per_epoch() == 1 == len(batches)
        assert len(batches[0]) == 15
        seen += keys_of(batches)
    assert sorted(seen) == sorted(set(seen)) and len(seen) == N


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys == y.keys
        assert x.captions == y.captions
        assert torch.equal(x.labels, y.labels)
        for group in ("features", "masks", "segments"):
            gx, gy = getattr(x, group), getattr(y, group)
            assert gx.keys() == gy.keys()
            for m in gx:
                assert torch.equal(gx[m], gy[m])


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_same_seed_and_epoch_give_the_same_batches_for_any_worker_count(dataset):
    folder, _ = dataset
    _, base = read_epoch(folder, epoch=2, batch_size=5, seed=7, world_size=2, rank=1, num_workers=0, shuffle_buffer=12)
    for workers in (1, 2, 3):
        _, other = read_epoch(folder, epoch=2, batch_size=5, seed=7, world_size=2, rank=1, num_workers=workers,
                              shuffle_buffer=12)
        assert_same_batches(base, other)
    _, next_epoch = read_epoch(folder, epoch=3, batch_size=5, seed=7, world_size=2, rank=1, shuffle_buffer=12)
    assert keys_of(next_epoch) != keys_of(base)
    _, other_seed = read_epoch(folder, epoch=2, batch_size=5, seed=8, world_size=2, rank=1, shuffle_buffer=12)
    assert keys_of(other_seed) != keys_of(base)


def test_shuffle_mixes_samples_across_shards_within_batches(dataset):
    folder, clips = dataset
    _, batches = read_epoch(folder, batch_size=7, shuffle_buffer=45)
    in_shard_order = sorted(clips)
    # with shuffling off the batches follow the shards in order (the last one takes the remainder)
    _, plain = read_epoch(folder, batch_size=7, shuffle=False)
    assert keys_of(plain) == in_shard_order
    assert [b.keys for b in plain] == [in_shard_order[7 * i:7 * i + 7] for i in range(5)] + [in_shard_order[35:]]
    shard_of = {k: i // 7 for i, k in enumerate(in_shard_order)}
    assert any(len({shard_of[k] for k in b.keys}) > 1 for b in batches)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_at_start_step_yields_the_remaining_batches(dataset, num_workers):
    folder, _ = dataset
    _, full = read_epoch(folder, epoch=5, batch_size=4, world_size=2, rank=0, num_workers=num_workers)
    for start in (1, 4, len(full)):
        _, rest = read_epoch(folder, epoch=5, start_step=start, batch_size=4, world_size=2, rank=0,
                             num_workers=num_workers)
        assert_same_batches(full[start:], rest)


def test_resume_does_not_decode_skipped_batches(dataset, monkeypatch):
    folder, _ = dataset
    calls = []
    real = shard_format.decode_sample
    monkeypatch.setattr(shard_format, "decode_sample", lambda raw, *a, **kw: calls.append(raw["__key__"]) or real(raw, *a, **kw))
    _, rest = read_epoch(folder, epoch=1, start_step=6, batch_size=4)
    assert sorted(calls) == sorted(keys_of(rest))
    assert len(calls) == N - 6 * 4


def test_batches_hold_the_written_values_padding_masks_labels_and_segments(dataset):
    folder, clips = dataset
    _, batches = read_epoch(folder, batch_size=6, num_workers=2)
    for batch in batches:
        assert batch.labels.dtype == torch.int64
        for i, key in enumerate(batch.keys):
            features, meta = clips[key]
            for m, array in features.items():
                got = batch.features[m][i]
                assert got.dtype == torch.float32
                length = array.shape[0]
                assert np.array_equal(got[:length].numpy(), array.astype(np.float64).astype(np.float32))
                assert not got[length:].any()
                mask = batch.masks[m][i]
                assert mask[:length].all() and not mask[length:].any()
            assert batch.features["text"].shape[1] == max(clips[k][0]["text"].shape[0] for k in batch.keys)
            assert batch.labels[i].item() == (-1 if meta["label"] is None else meta["label"])
            assert batch.captions[i] == meta.get("caption")
            for m, steps in meta["segments"].items():
                hot = batch.segments[m][i]
                assert hot.shape == (len(steps), NUM_CLASSES)
                for t in range(len(steps)):
                    for c in range(NUM_CLASSES):
                        assert hot[t, c].item() == (1.0 if c in steps[t] else 0.0)
        assert set(batch.segments) == {"audio", "video"}


def test_modalities_restricts_what_is_decoded(dataset):
    folder, clips = dataset
    _, batches = read_epoch(folder, batch_size=8, modalities=["audio"])
    for batch in batches:
        assert set(batch.features) == set(batch.masks) == set(batch.segments) == {"audio"}
        for i, key in enumerate(batch.keys):
            assert np.array_equal(batch.features["audio"][i].numpy(), clips[key][0]["audio"].astype(np.float32))


@pytest.fixture
def nan_dataset(dataset, tmp_path):
    folder = tmp_path / "nan"
    shutil.copytree(dataset[0], folder)
    shard = folder / "train-000003.tar"
    key = first_key(shard)

    def poison(data):
        array = np.load(io.BytesIO(data))
        array[1, 2] = np.nan
        return npy_bytes(array)

    edit_member(shard, key, "audio.npy", poison)
    return folder, shard, key


def test_bad_sample_in_a_worker_raises_one_line_data_error_in_main_process(nan_dataset):
    folder, shard, key = nan_dataset
    messages = []
    for workers in (0, 2):
        loader = ShardLoader(folder, "train", batch_size=4, num_workers=workers)
        with pytest.raises(DataError) as info:
            list(loader.epoch(0))
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    message = messages[1]
    assert "\n" not in message and "Traceback" not in message
    assert f"shard {shard}" in message and f"key {key}" in message and "member audio.npy" in message
    assert "1 NaN" in message


def test_skip_bad_leaves_out_and_counts_bad_samples(nan_dataset, dataset):
    folder, _, key = nan_dataset
    loader = ShardLoader(folder, "train", batch_size=4, num_workers=2, skip_bad=True)
    batches = list(loader.epoch(0))
    assert len(batches) == loader.steps_per_epoch()
    seen = keys_of(batches)
    assert sorted(seen) == sorted(set(dataset[1]) - {key})
    assert loader.skipped == 1 and key in loader.skip_reasons[0]
    # a batch of bad samples only cannot be dropped without changing the step count
    alone = ShardLoader(folder, "train", batch_size=1, shuffle=False, skip_bad=True)
    with pytest.raises(DataError, match=f"all 1 samples of step 21 are bad; first: shard .*key {key}"):
        list(alone.epoch(0))


def test_skip_bad_reads_around_a_truncated_shard(dataset, tmp_path):
    folder = tmp_path / "cut"
    shutil.copytree(dataset[0], folder)
    shard = folder / "train-000002.tar"
    spans = shard_format.index_shard(shard).samples
    shard.write_bytes(shard.read_bytes()[: spans[3].start + 700])  # three whole samples, then a cut
    with pytest.raises(DataError, match="train-000002.tar"):
        ShardLoader(folder, "train", batch_size=4)
    lost = {s.key for s in spans[3:]}
    for workers in (0, 2):
        ranks = [ShardLoader(folder, "train", batch_size=4, world_size=2, rank=r, num_workers=workers, skip_bad=True)
                 for r in range(2)]
        seen, skipped = [], 0
        for loader in ranks:
            batches = list(loader.epoch(1))
            assert len(batches) == loader.steps_per_epoch()
            seen += keys_of(batches)
            skipped += loader.skipped
        assert len(seen) == len(set(seen))
        assert set(dataset[1]) - set(seen) == lost
        assert skipped == len(lost) == 4


def test_invalid_arguments_are_one_line_errors(dataset):
    folder, _ = dataset
    bad = [
        dict(batch_size=0),
        dict(batch_size=4, rank=2, world_size=2),
        dict(batch_size=4, tail="pad"),
        dict(batch_size=4, modalities=["depth"]),
        dict(batch_size=4, world_size=50),
        dict(batch_size=30, world_size=2, tail="drop"),
    ]
    for kw in bad:
        with pytest.raises(SrcidError):
            ShardLoader(folder, "train", **kw)
    with pytest.raises(DataError, match="no split 'val'"):
        ShardLoader(folder, "val", batch_size=4)
    loader = ShardLoader(folder, "train", batch_size=4)
    with pytest.raises(SrcidError, match="start_step"):
        loader.epoch(0, start_step=loader.steps_per_epoch() + 1)
    with pytest.raises(SrcidError, match="epoch"):
        loader.epoch(-1)


def test_shard_index_is_cached_until_the_file_changes(dataset, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(dataset[0], folder)
    shard = folder / "train-000000.tar"
    first = shard_format.index_shard(shard)
    assert shard_format.index_shard(shard) is first
    assert [s.key for s in first.samples] == sorted(dataset[1])[:7]
    key = first.samples[0].key
    edit_member(shard, key, "meta.json", lambda data: None)
    second = shard_format.index_shard(shard)
    assert second is not first and len(second) == 7


def test_split_carrying_a_subset_of_the_modalities(tmp_path):
    folder = tmp_path / "subsets"
    clips = write_dataset(folder, n=10, shard_size=4, split="both", extra_splits={"vid": 9, "aud": 6},
                          carried={"vid": ("video",), "aud": ("audio",)})
    for split, carried in (("vid", {"video"}), ("aud", {"audio"}), ("both", {"audio", "video", "text"})):
        loader, batches = read_epoch(folder, split=split, batch_size=3, num_workers=1)
        assert set(loader.modalities) == carried
        assert sorted(keys_of(batches)) == sorted(k for k in clips if k.startswith(split))
        for batch in batches:
            assert set(batch.features) == set(batch.masks) == carried
            for i, key in enumerate(batch.keys):
                for m in carried:
                    assert np.array_equal(batch.features[m][i].numpy()[: len(clips[key][0][m])],
                                          clips[key][0][m].astype(np.float32))
    with pytest.raises(SrcidError, match="carries video"):
        ShardLoader(folder, "vid", batch_size=3, modalities=["audio"])
    # one clip of the video-only split that also carries audio
    shard = folder / "vid-000001.tar"
    key = first_key(shard)
    members = read_tar(shard)
    members.insert(0, (f"{key}.audio.npy", npy_bytes(np.zeros((4, 3), np.float16))))
    write_tar(shard, members)
    with pytest.raises(DataError, match=f"key {key}, member audio.npy: unexpected member \\(the other samples of this split"):
        list(ShardLoader(folder, "vid", batch_size=3).epoch(0))
