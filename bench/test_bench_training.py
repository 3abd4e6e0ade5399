"""End-to-end training throughput of SRCID on CPU: clips/s, 1 vs 2 processes, tiny and small presets.

Each case is one real run of ``launcher/train.py`` in a subprocess: one process
directly, two through the ``deepspeed`` launcher (gloo, ``DS_ACCELERATOR=cpu``),
each process with one intra-op thread (``OMP_NUM_THREADS=1``; on a shared
2-core machine more threads per process oversubscribe the cores and make tiny
operations wait on descheduled threads). The synthetic pretraining split of
each preset is written once per session. The trainer logs ``clips_per_s``
(clips of all ranks per second of wall time) every ``log_every`` steps into
``metrics.csv``; the steady-state figure is the harmonic mean over the windows
after the warm-up steps, i.e. measured clips over measured time.

Run with ``.venv/bin/python -m pytest bench/test_bench_training.py --benchmark-only``;
the benchmark's own time is the whole run, start-up and final checkpoint included.
"""
import csv
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from srcid.data.synth import PRESETS, World, write_dataset
from srcid.train.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "launcher" / "train.py"
DEEPSPEED = Path(sys.executable).with_name("deepspeed")
VARIANT = "srcid"
THREADS_PER_PROCESS = 1
RUN_TIMEOUT_S = 240

# preset -> per-process batch size, optimizer steps, warm-up steps left out, steps per metrics window
CASES = {
    "tiny": {"batch_size": 16, "steps": 50, "warmup": 10, "log_every": 5},
    "small": {"batch_size": 80, "steps": 20, "warmup": 4, "log_every": 4},
}


@pytest.fixture(scope="session")
def pretrain_data(tmp_path_factory):
    """``preset -> pretraining dataset folder``, each written on first use."""
    root = tmp_path_factory.mktemp("bench-training")
    written = {}

    def get(preset: str) -> Path:
        if preset not in written:
            write_dataset(World(PRESETS[preset], 0), "pretrain", root / preset, progress=False)
            written[preset] = root / preset / "pretrain"
        return written[preset]

    return get


def train_command(processes: int, data: Path, run_dir: Path, preset: str, case: dict) -> list:
    args = [
        str(LAUNCHER), "--model", VARIANT, "--preset", preset, "--data", str(data), "--out", str(run_dir),
        "--max-steps", str(case["steps"]), "--epochs", "1000", "--kernels", "reference", "--quiet",
        "--set", f"batch_size={case['batch_size']}", "--set", "num_workers=0",
        "--set", f"log_every={case['log_every']}",
    ]
    if processes == 1:
        return [sys.executable, *args]
    return [str(DEEPSPEED), "--num_gpus", str(processes), "--master_port", str(free_port()), *args]


def steady_clips_per_s(run_dir: Path, warmup: int) -> tuple:
    """``(harmonic mean of clips_per_s over the windows after warm-up, those windows' rates)``."""
    with open(run_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    rates = [float(row["clips_per_s"]) for row in rows if int(row["step"]) > warmup]
    if not rates:
        raise AssertionError(f"{run_dir / 'metrics.csv'} has no window after step {warmup}: {rows}")
    return statistics.harmonic_mean(rates), rates


@pytest.mark.parametrize("processes", [1, 2], ids=lambda p: f"{p}proc")
@pytest.mark.parametrize("preset", list(CASES))
def test_training_throughput(benchmark, pretrain_data, tmp_path, preset, processes):
    case = CASES[preset]
    data = pretrain_data(preset)
    run_dir = tmp_path / "run"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(THREADS_PER_PROCESS), PYTHONUNBUFFERED="1")
    command = train_command(processes, data, run_dir, preset, case)

    def train():
        return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)

    done = benchmark.pedantic(train, rounds=1, iterations=1)
    assert done.returncode == 0, f"{' '.join(command)} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}"
    clips_per_s, windows = steady_clips_per_s(run_dir, case["warmup"])
    assert len(windows) == (case["steps"] - case["warmup"]) // case["log_every"]
    assert clips_per_s > 0
    benchmark.extra_info.update(
        variant=VARIANT, preset=preset, processes=processes, threads_per_process=THREADS_PER_PROCESS,
        batch_size_per_process=case["batch_size"], global_batch_size=case["batch_size"] * processes,
        steps=case["steps"], warmup_steps=case["warmup"], clips_per_s=round(clips_per_s, 1),
        clips_per_s_per_process=round(clips_per_s / processes, 1),
        window_clips_per_s=[round(rate, 1) for rate in windows],
    )
