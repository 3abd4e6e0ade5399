"""The GPU check's own logic, on the CPU: bench/kernel_table.py (--quick, and its helpers, checks and goals)
and bench/device_check.sh (syntax and dry run). The GPU parts themselves run only on a GPU machine."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "bench" / "kernel_table.py"
CHECK = ROOT / "bench" / "device_check.sh"
STEPS = ["env", "wheels", "install", "compile", "tests", "table", "train", "train-2ranks"]


def cpu_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", **extra)
    return env


@pytest.fixture(scope="module")
def kt():
    """bench/kernel_table.py as a module (the sys.path entries it adds are taken back afterwards)."""
    saved = list(sys.path)
    spec = importlib.util.spec_from_file_location("bench_kernel_table", TABLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    yield module
    sys.modules.pop(spec.name, None)


def test_quick_table_on_cpu(tmp_path):
    run = subprocess.run([sys.executable, str(TABLE), "--quick", "--out", str(tmp_path)], env=cpu_env(),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    markdown = (tmp_path / "kernel_table.md").read_text()
    record = json.loads((tmp_path / "kernel_table.json").read_text())
    assert markdown.count("| op | size | path |") == 1  # one table
    rows = record["rows"]
    fused = [r for r in rows if r["path"].startswith("fused")]
    others = [r for r in rows if not r["path"].startswith("fused")]
    assert fused and all(r["status"] == "skipped: no CUDA" and r["ms"] is None for r in fused)
    assert {r["path"] for r in others} == {"reference", "naive", "sampled", "naive-all-pairs"}
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in others)
    assert {r["op"] for r in rows} == {"quantizer step (NN + stats + EMA)", "CLUB fwd+bwd"}
    assert record["failures"] == [] and record["goals"] == [] and record["quick"] is True
    assert "skipped: no CUDA" in markdown and "| reference |" in markdown


def test_full_sizes_need_cuda(tmp_path):
    run = subprocess.run([sys.executable, str(TABLE), "--out", str(tmp_path)], env=cpu_env(),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--quick" in run.stderr
    assert not (tmp_path / "kernel_table.json").exists()


def test_peaks_and_floor(kt):
    assert kt.lookup_peaks("NVIDIA H200") == (67e12, 4.8e12)
    assert kt.lookup_peaks("NVIDIA H100 80GB HBM3") == (67e12, 3.35e12)
    assert kt.lookup_peaks("NVIDIA H100 PCIe") == (51e12, 2.0e12)
    assert kt.lookup_peaks("NVIDIA A100-SXM4-80GB") == (19.5e12, 2.0e12)
    assert kt.lookup_peaks("NVIDIA L4") is None
    h200 = kt.Machine(torch.device("cpu"), "NVIDIA H200", 67e12, 4.8e12, "table")
    row = kt.Row("step", "N=2400", "fused")
    kt.floor(row, h200, *kt.step_cost(2400, kt.FULL))
    assert row.bound == "compute" and 7.0 < row.floor_us < 8.0  # 2NLD = 0.49 GFLOP at 67 TFLOP/s
    club = kt.Row("club", "[7680,256]", "fused")
    kt.floor(club, h200, *kt.club_cost((7680, 256)))
    assert club.bound == "memory"


def test_goals(kt):
    rows = [kt.Row("step", "N", path, ms=ms, floor_us=10.0) for path, ms in
            [("fused-graph", 0.02), ("fused", 0.05), ("fused-deterministic", 0.1), ("reference", 0.3), ("naive", 1.0)]]
    kt.step_goals(rows)
    speedup, floor_ratio = rows[0].goals
    assert (speedup.ratio, speedup.met) == (50.0, True)
    assert floor_ratio.ratio == pytest.approx(2.0) and floor_ratio.met
    club = [kt.Row("club", "c", path, ms=ms) for path, ms in
            [("fused", 0.2), ("reference", 0.3), ("sampled", 0.1), ("naive-all-pairs", None)]]
    kt.club_goal(club)
    assert club[0].goals[0].ratio == pytest.approx(2.0) and not club[0].goals[0].met
    assert "NOT met" in str(club[0].goals[0])


def test_fused_checks_pass_on_the_kernels(kt, device):
    """The checks run before timing accept the real kernels (the interpreter on CPU, compiled on CUDA)."""
    sizes = kt.Sizes(codes=40, dim=24, rows=(96,), club={})
    for deterministic in (False, True):
        kt.check_nearest_step(kt.step_inputs(96, sizes, device, seed=1), deterministic)
    kt.check_club(*kt.club_inputs((2, 37, 24), device, seed=2))


def test_fused_checks_catch_a_wrong_result(kt, monkeypatch):
    """A fused path that is off (one wrong code, a 0.1% EMA error, a 1% CLUB error) is a MISMATCH row."""
    from srcid import ops

    def wrong_code(x, codebook, values=None, stats=False, groups=1, deterministic=None):
        out = ops.nearest_code_reference(x, codebook, values=values, stats=stats, groups=groups)
        indices = out.indices.clone()
        indices[5] = (indices[5] + 1) % codebook.shape[0]
        return out._replace(indices=indices)

    def wrong_ema(cluster_size, embed_sum, codebook, counts, sums, *, decay, eps):
        ops.ema_update_reference(cluster_size, embed_sum, codebook, counts, sums, decay=decay, eps=eps)
        codebook.mul_(1.001)

    def wrong_club(mu, logvar, y):
        terms = ops.club_loglik_reference(mu, logvar, y)
        return terms._replace(negative=terms.negative * 1.01)

    fake = types.SimpleNamespace(nearest_code_fused=wrong_code, ema_update_fused_=ops.ema_update_reference,
                                 club_loglik_fused=wrong_club)
    monkeypatch.setattr(kt, "fused_module", lambda: fake)
    machine = kt.Machine(torch.device("cpu"), "cpu", None, None, "", interpret=True)
    inputs = kt.step_inputs(96, kt.QUICK, "cpu", seed=3)
    row = kt.run_case(kt.Row("step", "N=96", "fused"), machine, lambda: kt.check_nearest_step(inputs, False))
    assert row.failed and "not nearest" in row.status
    fake.nearest_code_fused = lambda x, cb, **kw: ops.nearest_code_reference(
        x, cb, **{k: v for k, v in kw.items() if k != "deterministic"})
    fake.ema_update_fused_ = wrong_ema
    with pytest.raises(kt.Mismatch, match="EMA update: codebook"):
        kt.check_nearest_step(inputs, False)
    with pytest.raises(kt.Mismatch, match="CLUB negative"):
        kt.check_club(*kt.club_inputs((40, 16), "cpu", seed=4))


def test_device_check_scripts_parse():
    for script in (CHECK, ROOT / "bench" / "fetch_device_wheels.sh"):
        run = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
        assert run.returncode == 0, run.stderr


def dry_run(tmp_path, **extra):
    out = tmp_path / "device_check"
    run = subprocess.run(["bash", str(CHECK)], env=cpu_env(DEVICE_CHECK_DRY="1", OUT=str(out), **extra),
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    assert not out.exists()  # a dry run writes nothing
    return [line.split()[2] for line in run.stdout.splitlines() if line.startswith("step ")], run.stdout


def test_device_check_dry_run(tmp_path):
    steps, text = dry_run(tmp_path)
    assert steps == STEPS
    assert f"into {tmp_path / 'device_check'}" in text
    for command in ("kernels.compile_check --json", "bench/kernel_table.py --out", "--kernels fused",
                    "tests/ops/test_club.py", "deepspeed.launcher.runner --num_gpus 2"):
        assert command in text
    steps, _ = dry_run(tmp_path, DEVICE_CHECK_STEPS="install table")
    assert steps == ["install", "table"]
    typo = subprocess.run(["bash", str(CHECK)], env=cpu_env(DEVICE_CHECK_DRY="1", DEVICE_CHECK_STEPS="tabel"),
                          capture_output=True, text=True, timeout=30)
    assert typo.returncode == 2 and "unknown step 'tabel'" in typo.stderr
