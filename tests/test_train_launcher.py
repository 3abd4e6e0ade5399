"""The DeepSpeed trainer end to end, with real processes (2 gloo ranks on the CPU)."""
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers_data import assert_input_statistics_of_split, edit_member, first_key, npy_bytes
from helpers_model import evaluation_codes_of_split
from srcid.data.synth import synthesize
from srcid.train.distributed import free_port
from srcid.train.trainer import main as train_main

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SCRIPTS = Path(__file__).resolve().parent / "dist_scripts"
# 224 training clips; batch 8 per rank on 2 ranks: 14 steps per epoch
TRAIN_ARGS = ["--model", "srcid", "--preset", "tiny", "--max-steps", "24", "--epochs", "2", "--quiet",
              "--set", "batch_size=8", "--set", "num_workers=1", "--set", "log_every=4", "--set", "checkpoint_every=6",
              "--set", "warm_start.mode=epoch", "--set", "warm_start.switch_epoch=1"]


ADAM_LR = 4e-4  # the run config's default lr


def _env():
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    return env


def deepspeed_cmd(data, out, *extra):
    return [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
            str(REPO / "launcher" / "train.py"), "--data", str(data), "--out", str(out), *TRAIN_ARGS, *extra]


def run(cmd, timeout=240):
    return subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    synthesize("tiny", root, seed=0)
    return root / "pretrain"


@pytest.fixture(scope="module")
def full_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "full"
    result = run(deepspeed_cmd(data, out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def events(run_dir):
    path = run_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_two_ranks_keep_identical_replicas_and_write_logs(full_run):
    checks = [e for e in events(full_run) if e["name"] == "replica_check"]
    assert checks and checks[-1]["info"]["identical"] is True
    assert len(checks[-1]["info"]["digests"]) == 2 and len(set(checks[-1]["info"]["digests"])) == 1
    header = (full_run / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in ("loss", "L1/mi", "L1/perplexity/audio", "L1/codes_used", "L2/mi", "lr", "clips_per_s", "L1/recon/video"):
        assert key in header, key
    assert any(p.name.startswith("events.out.tfevents") for p in (full_run / "tensorboard").rglob("*"))
    assert (full_run / "metrics.png").stat().st_size > 10_000
    assert (full_run / "model.safetensors").is_file() and (full_run / "model.json").is_file()


def test_two_ranks_count_the_final_codes_over_both_ranks_clips(full_run, data):
    """The end-of-training code count sums both ranks' histograms: over the whole training split (224 clips,
    112 per rank) it equals a single-process count of the exported model."""
    final = [e for e in events(full_run) if e["name"] == "final_code_use"]
    assert len(final) == 1
    clips, codes, reading = evaluation_codes_of_split(full_run / "model.safetensors", data)
    assert final[0]["info"]["clips"] == clips == 224
    assert final[0]["info"]["codes"] == codes
    got = final[0]["info"]["class_from_codes"]  # both ranks' per-code class counts, summed
    assert got.keys() == reading.keys()
    for layer, per in reading.items():
        assert got[layer] == pytest.approx(per, abs=1e-12), layer


def test_warm_start_switch_is_logged_and_checkpointed(full_run):
    switches = [e for e in events(full_run) if e["name"] == "warm_start_switch"]
    assert len(switches) == 1
    info = switches[0]["info"]
    assert info["step"] == 14 and info["epoch"] == 1 and "epoch" in info["reason"]
    last = sorted((full_run / "checkpoints").glob("step-*"))[-1]
    state = json.loads((last / "train_state.json").read_text())
    assert state["step"] == 24 and state["warm_start"] is not None
    rows = (full_run / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    weights = {int(r.split(",")[0]): float(r.split(",")[header.index("layer2_weight")]) for r in rows[1:]}
    assert weights[12] == 0.0 and weights[16] == pytest.approx(0.3)


def test_export_command_matches_the_run_export(full_run, tmp_path):
    out = tmp_path / "exported.safetensors"
    result = run([str(BIN / "srcid"), "export", str(full_run), "--out", str(out)])
    assert result.returncode == 0, result.stderr
    a, b = load_file(str(out)), load_file(str(full_run / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["variant"] == "srcid" and meta["extra"]["step"] == 24


def test_sigkill_and_resume_end_with_the_uninterrupted_parameters(data, full_run, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(deepspeed_cmd(data, out), env=_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    marker = out / "checkpoints" / "step-00000012" / "COMPLETE"
    deadline = time.time() + 180
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere in the steps after the checkpoint
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "model.safetensors").exists()
    result = run(deepspeed_cmd(data, out, "--resume"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    a, b = load_file(str(out / "model.safetensors")), load_file(str(full_run / "model.safetensors"))
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    switches = [e for e in events(out) if e["name"] == "warm_start_switch"]
    assert len(switches) == 1 and switches[0]["info"]["step"] == 14


def test_two_ranks_with_batch_b_equal_one_rank_with_batch_2b(data, tmp_path):
    script = str(SCRIPTS / "equivalence.py")
    one = tmp_path / "one"
    result = run([sys.executable, script, str(data), str(one), "16", "3"])
    assert result.returncode == 0, result.stderr[-3000:]
    two = tmp_path / "two"
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = _env()
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, script, str(data), str(two), "16", "3"], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
    a, b = load_file(str(one / "state.safetensors")), load_file(str(two / "state.safetensors"))
    assert a.keys() == b.keys()
    bad = {}
    for key in a:
        if key.startswith("layers.") and ".cpc.predictors." in key and key.endswith(".bias"):
            # InfoNCE is invariant to a bias added to every score of a row: its true gradient is zero, and
            # Adam turns the float rounding noise in it into full-size steps. Nothing to compare.
            continue
        left, right = a[key].double(), b[key].double()
        if key.endswith("self_attn.in_proj_bias"):
            # The key bias shifts every attention score of a query equally: zero true gradient too.
            third = left.shape[0] // 3
            keep = torch.ones_like(left, dtype=torch.bool)
            keep[third:2 * third] = False
            left, right = left[keep], right[keep]
        diff = (right - left).abs()
        off = diff > 2e-5 + 2e-4 * left.abs()
        # Adam moves an element whose gradient is only rounding noise by up to lr per step in either direction,
        # and the two runs add the batch's gradients in another order: a few such elements may differ, by at most
        # lr x steps (lr 4e-4, 3 steps); anything more, or more than 1% of a tensor, is a real difference.
        if bool((diff > 3 * ADAM_LR).any()) or int(off.sum()) > max(1, off.numel() // 100):
            bad[key] = (float(diff.max()), int(off.sum()), off.numel())
    assert not bad, bad


def test_a_shard_error_on_one_rank_stops_every_rank(tmp_path):
    root = tmp_path / "synth"
    synthesize("tiny", root, seed=1)
    data = root / "pretrain"
    # Poison one sample: it lies in one rank's range of the epoch, so only that rank meets it.
    shard = sorted(data.glob("train-*.tar"))[-1]
    key = first_key(shard)
    edit_member(shard, key, "audio.npy", lambda raw: npy_bytes(np.full_like(np.load(io.BytesIO(raw)), np.nan)))
    start = time.time()
    result = run(deepspeed_cmd(data, tmp_path / "run", "--set", "num_workers=0"), timeout=240)
    elapsed = time.time() - start
    assert result.returncode != 0
    assert "NaN" in result.stdout + result.stderr and key in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert elapsed < 200


def test_unknown_config_key_or_bad_value_is_one_line(tmp_path, capsys, data):
    code = train_main(["--data", str(data), "--out", str(tmp_path / "r"), "--set", "warm_start.modee=mi"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "warm_start.modee" in err[0] and "warm_start.mode" in err[0]
    code = train_main(["--data", str(data), "--out", str(tmp_path / "r"), "--set", "batch_size=zero"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "batch_size" in err[0]
    code = train_main(["--data", str(data), "--out", str(tmp_path / "r2"), "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "run_config.json" in err[0]


def test_zero_stage_2_with_gradient_accumulation_keeps_replicas_identical(data, tmp_path):
    out = tmp_path / "zero2"
    result = run(deepspeed_cmd(data, out, "--set", "zero_stage=2", "--set", "gradient_accumulation=2",
                               "--max-steps", "8"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    checks = [e for e in events(out) if e["name"] == "replica_check"]
    assert checks and checks[-1]["info"]["identical"] is True and checks[-1]["step"] == 8


def test_resume_refuses_a_different_model_and_accumulation_needs_aligned_checkpoints(full_run, tmp_path, capsys, data):
    code = train_main(["--data", str(data), "--out", str(full_run), "--resume", "--model", "dcid"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "--model" in err[0] and "srcid" in err[0]
    code = train_main(["--data", str(data), "--out", str(tmp_path / "r"), "--set", "gradient_accumulation=4",
                       "--set", "checkpoint_every=6"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "checkpoint_every" in err[0] and "gradient_accumulation" in err[0]


def test_two_ranks_fit_the_input_statistics_of_the_whole_split(full_run, data):
    """Each rank reads its half of the split; the summed moments are the whole split's, on both ranks (the
    replica check covers the second half of that)."""
    stats = [e for e in events(full_run) if e["name"] == "input_stats"]
    assert len(stats) == 1 and stats[0]["info"]["clips"] == 224
    assert_input_statistics_of_split(load_file(str(full_run / "model.safetensors")), data)
