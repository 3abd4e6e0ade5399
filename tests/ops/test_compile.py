"""Every kernel and every GPU autotune config compiles for sm_80 and sm_90 with Triton's compiler (no GPU needed);
the tf32x3 nearest-code kernel uses tensor cores (wgmma on sm_90, mma.sync on sm_80) and never spills."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _env(interpret: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_every_kernel_and_config_compiles_for_ampere_and_hopper(tmp_path):
    out = tmp_path / "compile.json"
    result = subprocess.run([sys.executable, "-m", "kernels.compile_check", "--arch", "80", "90", "--json", str(out)],
                            cwd=REPO, env=_env(False), capture_output=True, text=True, timeout=600)
    assert result.returncode in (0, 1), result.stderr[-3000:]  # 1: some ieee config spills (reported)
    results = json.loads(out.read_text())
    # the same jobs as the kernels define: every autotuned kernel x GPU config x specialisation x arch
    listed = subprocess.run([sys.executable, "-c", "from kernels.compile_check import jobs; print(len(jobs()))"],
                            cwd=REPO, env=_env(False), capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert len(results) == int(listed.stdout) >= 2 * 40
    failed = [(r["kernel"], r["config"], r["arch"], r["error"]) for r in results if r["error"]]
    assert not failed
    assert {r["kernel"] for r in results} == {"_nearest_code_kernel", "_nearest_code_tc_kernel",
                                             "_segment_sum_kernel", "_moments_kernel",
                                             "_rows_kernel", "_grad_moments_kernel", "_grad_rows_kernel",
                                             "_cluster_size_kernel", "_embed_kernel"}
    assert {r["arch"] for r in results} == {80, 90}
    assert all(0 < r["registers"] <= 255 and r["spill_bytes"] >= 0 and r["shared_bytes"] >= 0 for r in results)
    summary = result.stdout.strip().splitlines()[-1]
    spilled = sum(1 for r in results if r["spill_bytes"])
    assert summary == f"{len(results)} compiles, 0 failed, {spilled} spill, 0 lack tensor cores"
    assert (result.returncode == 1) == (spilled > 0)
    # the tf32x3 kernel: every config the autotuner may pick, statistics on and off, on tensor cores without spills
    tc = [r for r in results if r["kernel"] == "_nearest_code_tc_kernel"]
    assert len(tc) >= 2 * 2 * 3 and {"STATS=True" in r["config"] for r in tc} == {True, False}
    assert all(r["tensor_cores"] for r in tc)
    assert {r["tensor_core_op"] for r in tc if r["arch"] == 90} == {"wgmma"}
    assert {r["tensor_core_op"] for r in tc if r["arch"] == 80} == {"mma"}
    assert [(r["config"], r["arch"], r["spill_bytes"]) for r in tc if r["spill_bytes"]] == []
    # the IEEE kernel stays off the tensor cores (its dot lowers to FMAs)
    assert not any(r["tensor_cores"] for r in results if r["kernel"] == "_nearest_code_kernel")


def test_under_the_interpreter_it_is_a_one_line_error():
    result = subprocess.run([sys.executable, "-m", "kernels.compile_check", "--arch", "90"], cwd=REPO,
                            env=_env(True), capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "unset TRITON_INTERPRET" in lines[0], result.stderr
