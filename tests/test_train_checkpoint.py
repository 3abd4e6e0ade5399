import errno
import json
import os
import random
import threading
import time

import numpy as np
import pytest
import torch

from srcid.errors import SrcidError
from srcid.train.checkpoint import (COMPLETE_FILE, CheckpointManager, capture_rng_state, checkpoint_step,
                                    load_rng_state, load_tensors, restore_rng_state, rng_state_path,
                                    save_rng_state, save_tensors)


def writer(payload):
    def write(directory):
        (directory / "payload.json").write_text(json.dumps(payload))
        save_tensors(directory / "weights.pt", {"w": torch.full((3,), float(payload["step"]))})
    return write


def entries(manager):
    return sorted(p.name for p in manager.directory.iterdir())


def test_save_keeps_last_n_and_points_latest(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    assert manager.latest() is None
    for step in (10, 20, 30):
        path = manager.save(step, writer({"step": step}))
        assert path == manager.path_for(step) and path.name == f"step-{step:08d}"
        assert (path / COMPLETE_FILE).is_file()
        assert json.loads((path / COMPLETE_FILE).read_text())["step"] == step
    assert [checkpoint_step(p) for p in manager.checkpoints()] == [20, 30]
    assert manager.latest() == manager.path_for(30)
    assert (manager.directory / "latest").read_text().strip() == "step-00000030"
    assert entries(manager) == ["latest", "step-00000020", "step-00000030"]
    assert torch.equal(load_tensors(manager.latest() / "weights.pt")["w"], torch.full((3,), 30.0))


def test_disk_full_halfway_keeps_the_previous_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=1)
    manager.save(10, writer({"step": 10}))
    before = entries(manager)

    def full_disk(directory):
        (directory / "payload.json").write_text("{\"step\": 2")  # half written
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(SrcidError) as caught:
        manager.save(20, full_disk)
    message = str(caught.value)
    assert "\n" not in message
    assert ".tmp-step-00000020" in message and "No space left on device" in message
    assert "step-00000010" in message  # names the checkpoint that is kept
    assert isinstance(caught.value.__cause__, OSError) and caught.value.__cause__.errno == errno.ENOSPC
    assert manager.latest() == manager.path_for(10)
    assert entries(manager) == before  # temporary directory removed, nothing pruned
    assert json.loads((manager.latest() / "payload.json").read_text()) == {"step": 10}
    assert torch.equal(load_tensors(manager.latest() / "weights.pt")["w"], torch.full((3,), 10.0))
    # the next save works and then prunes
    manager.save(30, writer({"step": 30}))
    assert entries(manager) == ["latest", "step-00000030"]


def test_stale_temporary_and_incomplete_directories(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3)
    manager.save(5, writer({"step": 5}))
    stale = manager.directory / ".tmp-step-00000099"
    stale.mkdir()
    (stale / "junk.pt").write_bytes(b"partial")
    trash = manager.directory / ".trash-step-00000001"
    trash.mkdir()
    incomplete = manager.directory / "step-00000077"  # no COMPLETE marker
    incomplete.mkdir()
    assert manager.latest() == manager.path_for(5)
    manager.save(6, writer({"step": 6}))
    assert not stale.exists() and not trash.exists()
    assert manager.latest() == manager.path_for(6)
    assert [checkpoint_step(p) for p in manager.checkpoints()] == [5, 6]


def test_saving_a_step_again_replaces_it(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    manager.save(4, writer({"step": 4, "version": 1}))
    manager.save(4, writer({"step": 4, "version": 2}))
    assert json.loads((manager.latest() / "payload.json").read_text())["version"] == 2
    assert entries(manager) == ["latest", "step-00000004"]


def test_bad_arguments(tmp_path):
    with pytest.raises(SrcidError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)
    with pytest.raises(SrcidError, match="barrier"):
        CheckpointManager(tmp_path, rank=0, world_size=2)
    with pytest.raises(SrcidError, match="step"):
        CheckpointManager(tmp_path).save(-1, writer({"step": 0}))


def run_ranks(tmp_path, world_size, write_fns):
    """Two 'ranks' as threads sharing a real barrier; return each rank's result or exception."""
    barrier = threading.Barrier(world_size, timeout=20)
    results = [None] * world_size

    def body(rank):
        manager = CheckpointManager(tmp_path, keep_last=2, rank=rank, world_size=world_size, barrier=barrier.wait)
        try:
            results[rank] = manager.save(8, write_fns[rank])
        except Exception as exc:  # collected for the assertions
            results[rank] = exc

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


def test_multi_rank_rename_waits_for_every_rank(tmp_path):
    def slow_rank(directory):
        time.sleep(0.5)
        (directory / "shard-1.bin").write_bytes(b"rank one")

    def fast_rank(directory):
        (directory / "shard-0.bin").write_bytes(b"rank zero")

    results = run_ranks(tmp_path, 2, [fast_rank, slow_rank])
    final = tmp_path / "checkpoints" / "step-00000008"
    assert results == [final, final]
    assert (final / "shard-1.bin").read_bytes() == b"rank one"
    assert (final / "shard-0.bin").read_bytes() == b"rank zero"
    assert sorted(p.name for p in final.iterdir()) == [COMPLETE_FILE, "shard-0.bin", "shard-1.bin"]


def test_multi_rank_failure_on_one_rank_fails_every_rank(tmp_path):
    def good(directory):
        (directory / "shard-0.bin").write_bytes(b"ok")

    def bad(directory):
        raise OSError(errno.ENOSPC, "No space left on device")

    results = run_ranks(tmp_path, 2, [good, bad])
    assert isinstance(results[0], SrcidError) and "another rank failed" in str(results[0])
    assert isinstance(results[1], SrcidError) and "No space left" in str(results[1]) and "rank 1" in str(results[1])
    assert CheckpointManager(tmp_path).latest() is None
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == []


def draw(generators):
    return (
        [random.random() for _ in range(3)] + [random.gauss(0, 1)],
        np.random.rand(4).tolist() + [float(np.random.standard_normal())],
        torch.rand(5).tolist() + torch.randn(3).tolist(),
        {name: torch.rand(4, generator=gen).tolist() for name, gen in generators.items()},
    )


def test_rng_capture_restore_reproduces_the_same_numbers(tmp_path):
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    generators = {"data": torch.Generator().manual_seed(6), "noise": torch.Generator().manual_seed(7)}
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    np.random.standard_normal()  # and in numpy's
    draw(generators)
    state = capture_rng_state(generators)
    expected = draw(generators)
    restore_rng_state(state, generators)
    assert draw(generators) == expected

    path = rng_state_path(tmp_path, 3)
    assert path.name == "rng-rank00003.pt"
    save_rng_state(path, generators)
    expected = draw(generators)
    draw(generators)  # move every stream on
    fresh = {"data": torch.Generator(), "noise": torch.Generator()}
    load_rng_state(path, fresh)
    assert draw(fresh) == expected


def test_rng_restore_rejects_other_generator_names(tmp_path):
    state = capture_rng_state({"data": torch.Generator()})
    with pytest.raises(SrcidError, match="generators"):
        restore_rng_state(state, {"other": torch.Generator()})


class Payload:
    """Pickled with a side effect: loading it unpickled would create a directory."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_loading_never_unpickles_arbitrary_objects(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "x": Payload(marker)}, path)
    with pytest.raises(SrcidError, match="refused to unpickle posix.mkdir"):
        load_tensors(path)
    with pytest.raises(SrcidError, match="evil.pt"):
        load_rng_state(path)
    assert not marker.exists()
    # the same file loaded without weights_only would run the code: the test's payload is real
    torch.load(path, weights_only=False)
    assert marker.is_dir()
