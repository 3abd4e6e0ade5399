"""Checksummed checkpoints and models: every checkpoint file's SHA-256 in ``COMPLETE``, the model's in ``model.json``;
``--resume``, ``srcid export``, ``srcid eval``, ``srcid encode`` and ``srcid inspect`` verify before use, and
``--resume`` falls back to the newest intact checkpoint (docs/RELIABILITY.md)."""
import json
import shutil
import threading

import pytest
import torch
from safetensors.torch import load_file

import srcid.cli
from srcid.errors import CorruptFileError, SrcidError
from srcid.train.checkpoint import (COMPLETE_FILE, CheckpointManager, checkpoint_files, file_sha256,
                                    recorded_hashes, verify_checkpoint)
from helpers_training import train_in_process as train

STEPS = 8
# one process, ZeRO stage 1 (so the optimizer state is a file of its own), a checkpoint every 2 steps (4, 6, 8 kept)
TRAIN_ARGS = ["--model", "srcid", "--preset", "tiny", "--max-steps", str(STEPS), "--quiet",
              "--set", "batch_size=8", "--set", "num_workers=0", "--set", "log_every=2", "--set", "checkpoint_every=2",
              "--set", "input_stats_clips=16", "--set", "zero_stage=1"]
NEWEST = "step-00000008"
CHECKPOINT_FILES = {  # what each kind of file of a checkpoint holds -> its path in the checkpoint
    "model states": "engine/mp_rank_00_model_states.pt",
    "optimizer states": "engine/zero_pp_rank_0_mp_rank_00_optim_states.pt",
    "rng states": "rng-rank00000.pt",
    "train state": "train_state.json",
    "club nets": "club.pt",
}




@pytest.fixture(scope="module")
def data(synth_dir):
    return synth_dir / "pretrain"


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """An uninterrupted run of STEPS steps (its checkpoints and exported model are the references)."""
    out = tmp_path_factory.mktemp("runs") / "full"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert train(monkeypatch, "--data", data, "--out", out, *TRAIN_ARGS) == 0
    torch.set_num_threads(threads)
    return out


@pytest.fixture
def run(trained, tmp_path):
    """A copy of the trained run to damage."""
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


@pytest.fixture
def cli():
    return lambda *argv: srcid.cli.main([str(a) for a in argv])


def flip_byte(path, where=0.5):
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0xFF
    path.write_bytes(bytes(data))


def one_error_line(capsys, *needles) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if "[WARNING]" not in line and line.strip()]
    assert len(err) == 1, err
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    assert err[0].startswith("srcid: error: ")
    return err[0]


def equal_tensors(a, b) -> bool:
    a, b = load_file(str(a)), load_file(str(b))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------- recording


def test_complete_records_the_sha256_of_every_checkpoint_file(trained):
    checkpoints = CheckpointManager(trained).checkpoints()
    assert [p.name for p in checkpoints] == ["step-00000004", "step-00000006", NEWEST]
    for directory in checkpoints:
        hashes = recorded_hashes(directory)
        assert sorted(hashes) == checkpoint_files(directory)
        assert set(CHECKPOINT_FILES.values()) <= set(hashes)
        assert all(hashes[name] == file_sha256(directory / name) for name in hashes)
        assert verify_checkpoint(directory) is True
    sidecar = json.loads((trained / "model.json").read_text())
    assert sidecar["weights_sha256"] == file_sha256(trained / "model.safetensors")


def test_two_ranks_hash_their_shares_and_the_marker_lists_every_file(tmp_path):
    """Each rank writes its own files and hashes a share of all of them; rank 0 merges the shares into COMPLETE."""
    barrier = threading.Barrier(2, timeout=20)
    results = [None, None]

    def body(rank):
        def write(directory):
            (directory / f"shard-{rank}.bin").write_bytes(bytes([rank]) * (1000 + rank))
            (directory / "engine").mkdir(exist_ok=True)
            (directory / "engine" / f"optim-{rank}.pt").write_bytes(b"optimizer %d" % rank)

        manager = CheckpointManager(tmp_path, rank=rank, world_size=2, barrier=barrier.wait)
        try:
            results[rank] = manager.save(4, write)
        except Exception as exc:  # collected for the assertions
            results[rank] = exc

    threads = [threading.Thread(target=body, args=(r,)) for r in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    final = tmp_path / "checkpoints" / "step-00000004"
    assert results == [final, final]
    hashes = recorded_hashes(final)
    assert sorted(hashes) == ["engine/optim-0.pt", "engine/optim-1.pt", "shard-0.bin", "shard-1.bin"]
    assert all(hashes[name] == file_sha256(final / name) for name in hashes)
    assert sorted(p.name for p in final.iterdir()) == [COMPLETE_FILE, "engine", "shard-0.bin", "shard-1.bin"]
    # verifying with two ranks: each hashes half the files, a summed table gives both the same verdict
    flip_byte(final / "shard-1.bin")
    seen = [None, None]
    table_barrier = threading.Barrier(2, timeout=20)
    tables = [None, None]

    def verify(rank):
        def reduce(codes):
            tables[rank] = codes
            table_barrier.wait()
            return tables[0] + tables[1]

        try:
            verify_checkpoint(final, rank=rank, world_size=2, reduce=reduce)
        except CorruptFileError as exc:
            seen[rank] = str(exc)

    threads = [threading.Thread(target=verify, args=(r,)) for r in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert seen[0] == seen[1] and "checkpoints/step-00000004/shard-1.bin is corrupt" in seen[0]


# ------------------------------------------------------------------------------------------- corruption


@pytest.mark.parametrize("kind", sorted(CHECKPOINT_FILES))
def test_a_flipped_byte_in_any_checkpoint_file_is_named_by_export(kind, run, cli, capsys, tmp_path):
    name = CHECKPOINT_FILES[kind]
    flip_byte(run / "checkpoints" / NEWEST / name)
    out = tmp_path / "exported.safetensors"
    assert cli("export", run, "--out", out) == 2
    line = one_error_line(capsys, f"checkpoints/{NEWEST}/{name} is corrupt", "SHA-256 expected", "found")
    expected = recorded_hashes(run / "checkpoints" / NEWEST)[name]
    assert expected[:12] in line and file_sha256(run / "checkpoints" / NEWEST / name)[:12] in line
    assert not out.exists()


def test_a_corrupt_or_missing_completion_entry_is_named(run, cli, capsys, tmp_path):
    (run / "checkpoints" / NEWEST / CHECKPOINT_FILES["rng states"]).unlink()
    assert cli("export", run, "--out", tmp_path / "a.safetensors") == 2
    one_error_line(capsys, f"checkpoints/{NEWEST}/rng-rank00000.pt is missing")
    (run / "checkpoints" / NEWEST / COMPLETE_FILE).write_text('{"step": 8, "sha256": ')
    assert cli("export", run, "--out", tmp_path / "a.safetensors") == 2
    one_error_line(capsys, f"checkpoints/{NEWEST}/COMPLETE is corrupt")


def test_an_explicitly_named_corrupt_checkpoint_is_an_error(run, data, monkeypatch, capsys):
    flip_byte(run / "checkpoints" / NEWEST / CHECKPOINT_FILES["model states"])
    assert train(monkeypatch, "--data", data, "--out", run, "--resume", NEWEST, "--quiet") == 2
    one_error_line(capsys, f"--resume {NEWEST}", f"checkpoints/{NEWEST}/engine/mp_rank_00_model_states.pt is corrupt")
    assert (run / "checkpoints" / NEWEST).is_dir()  # nothing was set aside or changed
    assert train(monkeypatch, "--data", data, "--out", run, "--resume", "step-00000005", "--quiet") == 2
    one_error_line(capsys, "--resume step-00000005", "not a complete checkpoint", "step-00000004")


def test_resume_falls_back_to_the_newest_intact_checkpoint_and_ends_bit_exact(run, trained, data, monkeypatch, capsys):
    """The newest checkpoint's optimizer state is damaged: --resume takes step 6, says so on one line, and the
    two steps it trains again end with exactly the parameters of the uninterrupted run."""
    flip_byte(run / "checkpoints" / NEWEST / CHECKPOINT_FILES["optimizer states"])
    (run / "model.safetensors").unlink()
    (run / "model.json").unlink()
    torch.set_num_threads(1)
    assert train(monkeypatch, "--data", data, "--out", run, "--resume", "--quiet") == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("srcid:")]
    assert len(err) == 1, err
    assert err[0].startswith("srcid: warning: ") and f"checkpoints/{NEWEST}/engine/zero_pp_rank_0" in err[0]
    assert "is corrupt" in err[0] and "resuming from checkpoints/step-00000006" in err[0]
    assert equal_tensors(run / "model.safetensors", trained / "model.safetensors")
    # the damaged checkpoint is kept aside, never loaded again; step 8 was written anew
    assert (run / "checkpoints" / f"{NEWEST}.corrupt").is_dir()
    assert verify_checkpoint(run / "checkpoints" / NEWEST) is True
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    resumed = [e for e in events if e["name"] == "resume"]
    assert len(resumed) == 1 and resumed[0]["step"] == 6 and resumed[0]["info"]["checkpoint"] == "step-00000006"
    steps = [int(row.split(",")[0]) for row in (run / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == [2, 4, 6, 8]


def test_every_checkpoint_corrupt_is_an_error(run, data, monkeypatch, capsys):
    for directory in CheckpointManager(run).checkpoints():
        flip_byte(directory / CHECKPOINT_FILES["train state"])
    assert train(monkeypatch, "--data", data, "--out", run, "--resume", "--quiet") == 2
    one_error_line(capsys, "every checkpoint", "is corrupt", f"checkpoints/{NEWEST}/train_state.json")


# ------------------------------------------------------------------------------------------- the exported model


def test_a_flipped_byte_in_the_model_is_named_by_eval_encode_and_inspect(run, synth_dir, cli, capsys, tmp_path,
                                                                         monkeypatch):
    import srcid.eval.tasks

    monkeypatch.setattr(srcid.eval.tasks, "evaluate", lambda *a, **k: pytest.fail("evaluated a corrupt model"))
    flip_byte(run / "model.safetensors", where=0.9)
    needles = (f"{run / 'model.safetensors'}: is corrupt", "SHA-256 expected", "model.json key weights_sha256")
    assert cli("eval", "--run", run, "--data", synth_dir, "--task", "ave", "--out", tmp_path / "e.json") == 2
    one_error_line(capsys, *needles)
    assert not (tmp_path / "e.json").exists()
    assert cli("encode", "--run", run, "--data", synth_dir / "ave", "--out", tmp_path / "codes") == 2
    one_error_line(capsys, *needles)
    assert cli("inspect", "--run", run / "model.safetensors", "--data", synth_dir / "pretrain") == 2
    one_error_line(capsys, *needles)


# ------------------------------------------------------------------------------------------- older files


def test_checkpoints_and_models_without_recorded_hashes_still_load(run, data, monkeypatch, capsys, tmp_path, cli):
    for directory in CheckpointManager(run).checkpoints():
        info = json.loads((directory / COMPLETE_FILE).read_text())
        del info["sha256"]
        (directory / COMPLETE_FILE).write_text(json.dumps(info))
        assert verify_checkpoint(directory) is False
    assert cli("export", run, "--out", tmp_path / "old.safetensors") == 0
    capsys.readouterr()
    sidecar = json.loads((tmp_path / "old.json").read_text())
    del sidecar["weights_sha256"]
    (tmp_path / "old.json").write_text(json.dumps(sidecar))
    from srcid.model.export import load_model

    load_model(tmp_path / "old.safetensors")
    assert train(monkeypatch, "--data", data, "--out", run, "--resume", "--max-steps", "10", "--quiet") == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("srcid:")]
    assert len(err) == 1 and "srcid: note: " in err[0] and "no SHA-256 sums" in err[0], err
    assert recorded_hashes(run / "checkpoints" / "step-00000010")  # new checkpoints record them again


def test_verify_checkpoint_errors_are_one_line(tmp_path):
    directory = tmp_path / "checkpoints" / "step-00000001"
    directory.mkdir(parents=True)
    with pytest.raises(SrcidError, match="not a complete checkpoint"):
        verify_checkpoint(directory)
    (directory / COMPLETE_FILE).write_text(json.dumps({"sha256": {"../../etc/passwd": "0" * 64}}))
    with pytest.raises(CorruptFileError, match="outside the checkpoint"):
        verify_checkpoint(directory)
    (directory / COMPLETE_FILE).write_text(json.dumps({"sha256": {"a.pt": "xyz"}}))
    with pytest.raises(CorruptFileError, match="COMPLETE is corrupt"):
        verify_checkpoint(directory)
