"""Faults during a run and outputs that already exist (docs/RELIABILITY.md, "Cases tried"):

* a rank SIGKILLed mid-run: its peer exits non-zero within the process-group timeout with one line;
* a trainer SIGKILLed at each stage of a checkpoint write: no checkpoint is both complete and corrupt, and
  ``--resume`` ends with the parameters of an uninterrupted run, bit for bit;
* ``model.json``'s ``format_version`` must be the integer 1 (``true``, ``1.0`` refused);
* ``srcid data synth --out DIR`` refuses a folder that is not empty unless ``--overwrite``, which replaces it whole.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import srcid.cli
from helpers_model import SMALL_SHAPES
from srcid.errors import SrcidError
from srcid.run import CHECKPOINTS_DIR
from srcid.train.checkpoint import PAUSE_STAGES, TEST_PAUSE_ENV, CheckpointManager, verify_checkpoint
from srcid.train.distributed import free_port
from srcid.train.trainer import main as train_main

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "launcher" / "train.py"
_LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def data(synth_dir):
    return synth_dir / "pretrain"


def subprocess_env(**extra):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for name in _LAUNCH_ENV + (TEST_PAUSE_ENV,):
        env.pop(name, None)
    env.update(extra)
    return env


def last_line(text):
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


# ------------------------------------------------------------------------------------------- a rank killed mid-run

TIMEOUT_S = 10  # the process-group timeout of the run (run-config key timeout_s)


def test_a_killed_rank_makes_its_peer_exit_with_one_line_within_the_timeout(data, tmp_path):
    """Two gloo ranks started directly (no launcher to kill the survivor): rank 1 is SIGKILLed once both ranks have
    logged steps; rank 0 must exit non-zero, within the timeout, with one `srcid: error:` line and no traceback."""
    out = tmp_path / "run"
    port = str(free_port())
    args = [sys.executable, str(TRAIN), "--data", str(data), "--out", str(out), "--model", "srcid", "--preset", "tiny",
            "--max-steps", "100000", "--epochs", "1000", "--quiet", "--set", "batch_size=2", "--set", "num_workers=0",
            "--set", "log_every=1", "--set", "checkpoint_every=100000", "--set", "input_stats_clips=8",
            "--set", f"timeout_s={TIMEOUT_S}"]
    procs = []
    for rank in range(2):
        env = subprocess_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                             MASTER_PORT=port)
        procs.append(subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    rank0, rank1 = procs
    try:
        # a metrics row is written after the step's all-reduce of the loss terms: both ranks got that far
        metrics = out / "metrics.csv"
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and rank0.poll() is None and rank1.poll() is None:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 4:  # header + 3 steps
                break
            time.sleep(0.05)
        assert rank0.poll() is None and rank1.poll() is None, "a rank ended before the kill"
        assert len(metrics.read_text().splitlines()) >= 4, "no progress within 150 s"
        rank1.send_signal(signal.SIGKILL)
        rank1.wait()
        killed_at = time.monotonic()
        try:
            _, err = rank0.communicate(timeout=TIMEOUT_S + 30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank 0 still running {TIMEOUT_S + 30} s after rank 1 was killed (a hang)")
        took = time.monotonic() - killed_at
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
    assert rank0.returncode not in (0, None), err[-3000:]
    assert took <= TIMEOUT_S + 10, took
    assert "Traceback" not in err, err[-3000:]
    line = last_line(err)
    assert line.startswith("srcid: error: rank 0: "), err[-3000:]
    assert f"failed (a peer rank exited or did not answer within {TIMEOUT_S} s)" in line, line
    assert "GLHF" not in line  # gloo's boilerplate advice is cut
    assert [x for x in err.splitlines() if x.startswith("srcid: error:")] == [line]
    assert not (out / "model.safetensors").exists()


def test_a_raw_collective_error_at_the_top_level_is_one_line(monkeypatch, capsys):
    """DeepSpeed's gradient all-reduce and autograd's all_gather raise gloo's RuntimeError as it is; the trainer's
    top level turns it into one line (a RuntimeError that is not a failed collective keeps its traceback)."""
    import srcid.train.distributed as D
    import srcid.train.trainer as T

    gloo = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
            "[127.0.0.1]:13024. This is typically caused by a remote worker crashing. Check the logs of the remote "
            "worker before reporting an error. GLHF! \U0001f3d6\ufe0f")
    stops = []

    class Stub:
        is_main = True

        def __init__(self, *args, **kwargs):
            pass

        def train(self):
            raise RuntimeError(self.message)

        def close(self, ok=True):
            stops.append(ok)

    monkeypatch.setattr(T, "Trainer", Stub)
    monkeypatch.setattr(D, "get_world_size", lambda: 2)
    monkeypatch.setattr(D, "get_rank", lambda: 1)
    argv = ["--data", "unused", "--out", "unused", "--preset", "tiny"]
    Stub.message = gloo
    assert T.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("srcid: error: rank 1: a collective operation failed (a peer rank "
                                               "exited or did not answer within"), err
    assert err[0].endswith("Connection closed by peer [127.0.0.1]:13024."), err
    assert stops == [False]  # torn down without waiting for the lost peer
    Stub.message = "mat1 and mat2 shapes cannot be multiplied"
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        T.main(argv)
    monkeypatch.setattr(D, "get_world_size", lambda: 1)  # one process: no peer to lose
    Stub.message = gloo
    with pytest.raises(RuntimeError, match="Connection closed"):
        T.main(argv)


# ------------------------------------------------------------------------------------------- killed while checkpointing

STEPS = 8
# one process, ZeRO stage 1, a checkpoint every 2 steps (2, 4, 6, 8; the last 3 kept), as in
# tests/test_reliability_checksums.py
TRAIN_ARGS = ["--model", "srcid", "--preset", "tiny", "--max-steps", str(STEPS), "--quiet",
              "--set", "batch_size=8", "--set", "num_workers=0", "--set", "log_every=2", "--set", "checkpoint_every=2",
              "--set", "input_stats_clips=16", "--set", "zero_stage=1"]
# (checkpoint step, stage of its write) where the process is killed: every state the protocol passes through
KILLS = [
    (2, "created"),     # the first checkpoint: no complete one exists yet
    (4, "hashed"),      # every file written and hashed, no COMPLETE
    (6, "marked"),      # COMPLETE written inside .tmp-step-00000006, not renamed
    (8, "renamed"),     # the last checkpoint is complete, the model not exported
    (8, "discarding"),  # step-00000002 being pruned: renamed to .trash-step-00000002, not deleted
]


def train_in_process(monkeypatch, *argv) -> int:
    """``launcher/train.py ARGV`` in this process, one thread, on a fresh local port, without the metrics plot."""
    from deepspeed.utils import groups

    import srcid.train.metrics_log

    for name in _LAUNCH_ENV + (TEST_PAUSE_ENV,):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name in ("_WORLD_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP"):
        if hasattr(groups, name):
            monkeypatch.setattr(groups, name, None)
    monkeypatch.setattr(srcid.train.metrics_log, "plot_metrics", lambda run_dir: None)  # seconds, and not tested here
    return train_main([str(a) for a in argv])


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "full"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as monkeypatch:
            assert train_in_process(monkeypatch, "--data", data, "--out", out, *TRAIN_ARGS) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_every_kill_point_is_a_stage_of_the_write():
    assert {stage for _, stage in KILLS} == set(PAUSE_STAGES)


@pytest.mark.parametrize("step, stage", KILLS, ids=[f"step {s} {st}" for s, st in KILLS])
def test_killed_while_checkpointing_resumes_from_an_intact_checkpoint_bit_exact(step, stage, data, uninterrupted,
                                                                                  tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    flag = tmp_path / "paused"
    proc = subprocess.Popen([sys.executable, str(TRAIN), "--data", str(data), "--out", str(out), *TRAIN_ARGS],
                            env=subprocess_env(**{TEST_PAUSE_ENV: f"{step}:{stage}:{flag}"}), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 150
        while not flag.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert flag.exists(), f"the run never reached {step}:{stage}: {proc.poll()=}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert not (out / "model.safetensors").exists()
    # no checkpoint that is marked complete is corrupt; what is not complete has a name never loaded
    folder = out / CHECKPOINTS_DIR
    complete = CheckpointManager(out).checkpoints()
    for checkpoint in complete:
        assert verify_checkpoint(checkpoint) is True
    others = {p.name for p in folder.iterdir()} - {p.name for p in complete} - {"latest"}
    assert all(name.startswith((".tmp-", ".trash-")) for name in others), others
    expected = {
        (2, "created"): [], (4, "hashed"): [2], (6, "marked"): [2, 4],
        (8, "renamed"): [2, 4, 6, 8], (8, "discarding"): [4, 6, 8],
    }[step, stage]
    assert [int(p.name[5:]) for p in complete] == expected
    capsys.readouterr()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if complete:
            assert train_in_process(monkeypatch, "--data", data, "--out", out, "--resume", "--quiet") == 0
            assert "srcid: error" not in capsys.readouterr().err
        else:  # nothing to resume from: one line, and the run starts again with --overwrite
            assert train_in_process(monkeypatch, "--data", data, "--out", out, "--resume", "--quiet") == 2
            assert last_line(capsys.readouterr().err).startswith("srcid: error: --resume: no complete checkpoint")
            assert train_in_process(monkeypatch, "--data", data, "--out", out, "--overwrite", *TRAIN_ARGS) == 0
    finally:
        torch.set_num_threads(threads)
    resumed, reference = load_file(str(out / "model.safetensors")), load_file(str(uninterrupted / "model.safetensors"))
    assert resumed.keys() == reference.keys()
    different = [k for k in reference if not torch.equal(resumed[k], reference[k])]
    assert not different, different[:5]
    # the resumed run's saves cleaned up what the killed one left behind
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step-00000004", "step-00000006", "step-00000008"]
    state = json.loads((folder / "step-00000008" / "train_state.json").read_text())
    assert state["step"] == STEPS


# ------------------------------------------------------------------------------------------- model.json format_version


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from srcid.model import build_model, model_config
    from srcid.model.export import export_model

    torch.manual_seed(0)
    model = build_model("srcid", model_config("tiny"), SMALL_SHAPES)
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    return export_model(model, variant="srcid", config=model.config, input_shapes=SMALL_SHAPES, path=path,
                        extra={"step": 0})


@pytest.mark.parametrize("version", [True, 1.0, "1", 2, None], ids=["true", "1.0", "string 1", "2", "null"])
def test_model_format_version_must_be_the_integer_1(version, exported, tmp_path):
    import shutil

    from srcid.model.export import load_model, read_sidecar

    path = tmp_path / "model.safetensors"
    shutil.copy(exported, path)
    sidecar = path.with_suffix(".json")
    info = json.loads(exported.with_suffix(".json").read_text())
    assert info["format_version"] == 1 and type(info["format_version"]) is int
    info["format_version"] = version
    sidecar.write_text(json.dumps(info))
    for load in (read_sidecar, load_model):
        with pytest.raises(SrcidError) as caught:
            load(path)
        message = str(caught.value)
        assert "\n" not in message
        assert message.startswith(f"{sidecar}: key format_version: {json.dumps(version)} ")
        assert "expected the integer 1" in message
    info["format_version"] = 1
    sidecar.write_text(json.dumps(info))
    assert read_sidecar(path)["format_version"] == 1


# ------------------------------------------------------------------------------------------- synth into a used folder


def tree(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def test_data_synth_refuses_a_used_folder_and_overwrite_replaces_it_whole(synth_dir, tmp_path, monkeypatch, capsys):
    import srcid.data.synth

    def cli(*argv):
        return srcid.cli.main([str(a) for a in argv])

    out = tmp_path / "data"
    assert cli("data", "synth", "--preset", "tiny", "--out", out, "--seed", "1") == 0
    stale = out / "pretrain" / "train-000099.tar"
    stale.write_bytes(b"an older, bigger dataset's shard")
    (out / "notes.txt").write_text("mine")
    before = tree(out)
    capsys.readouterr()
    # without --overwrite: one line, nothing touched
    assert cli("data", "synth", "--preset", "tiny", "--out", out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"srcid: error: --out {out}: exists and is not empty; pass --overwrite to replace it"]
    assert tree(out) == before and stale.is_file()
    # --overwrite: exactly what a fresh synthesis writes (seed 0, as synth_dir), nothing of the old folder
    assert cli("data", "synth", "--preset", "tiny", "--out", out, "--overwrite") == 0
    names = srcid.data.synth.DATASETS
    assert capsys.readouterr().out.splitlines() == [f"wrote {out / name / 'dataset.json'}" for name in names]
    assert tree(out) == tree(synth_dir)
    for name in srcid.data.synth.DATASETS:
        assert (out / name / "dataset.json").read_bytes() == (synth_dir / name / "dataset.json").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no staging or replaced folder left
    # a synthesis that fails half-way leaves the folder as it was, and no staging folder
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    written = srcid.data.synth.write_dataset

    def fail_on_the_third(world, name, folder, progress=None):
        if name == srcid.data.synth.DATASETS[2]:
            raise OSError(28, "No space left on device", str(Path(folder) / name / "train-000000.tar"))
        return written(world, name, folder, progress)

    monkeypatch.setattr(srcid.data.synth, "write_dataset", fail_on_the_third)
    assert cli("data", "synth", "--preset", "tiny", "--out", out, "--overwrite", "--seed", "5") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(": No space left on device"), err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == after
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    # never a folder that holds the current one
    monkeypatch.chdir(out / "pretrain")
    assert cli("data", "synth", "--preset", "tiny", "--out", out, "--overwrite") == 2
    assert "holds the current folder" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == after
