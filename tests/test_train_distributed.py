"""Distributed helpers, with real processes (gloo on CPU).

The test functions start this file as a script, once per rank, with the
launcher's environment variables; the ``worker_*`` functions below are the
ranks' programs. Each rank writes what it saw to ``rank<N>.json``.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from srcid.run import default_ds_config

REPO = Path(__file__).resolve().parents[1]
CPU_CONFIG = default_ds_config("cpu")
GPU_CONFIG = default_ds_config("cuda")
SUM_SIZES = (1, 7, 1000)
LR = 4e-4
CLIP = 0.5


def sum_input(rank, size):
    return torch.randn(size, generator=torch.Generator().manual_seed(1000 * rank + size))


def tiny_model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def micro_batch(rank, step, size=4):
    gen = torch.Generator().manual_seed(100 * rank + step)
    return torch.randn(size, 5, generator=gen), torch.randn(size, 3, generator=gen)


def flat_params(module):
    return torch.cat([p.detach().float().reshape(-1) for p in module.parameters()]).tolist()


# ---------------------------------------------------------------- rank programs

def train_steps(engine, rank, steps):
    for step in steps:
        x, y = micro_batch(rank, step)
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()


class Payload:
    """Pickled with a side effect: unpickling it creates a directory."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def refuse_pickled_code(engine, saved, out_dir, rank, D):
    """Load a copy of a checkpoint whose model file carries code; return the error seen."""
    import shutil

    from srcid.errors import SrcidError
    from srcid.train.checkpoint import load_engine

    tampered, marker = out_dir / "tampered", out_dir / "code-ran"
    if rank == 0:
        shutil.copytree(saved, tampered)
        model_file = tampered / "engine" / "mp_rank_00_model_states.pt"
        state = torch.load(model_file, weights_only=False)
        state["module"]["extra"] = Payload(marker)
        torch.save(state, model_file)
    D.barrier()
    try:
        load_engine(engine, tampered)
    except SrcidError as exc:
        message = str(exc)
    else:
        message = "loaded"
    D.barrier()
    return {"message": message, "code_ran": marker.exists()}


def worker_collectives(out_dir):
    import deepspeed

    from srcid.errors import DataError, SrcidError
    from srcid.train import distributed as D
    from srcid.train.checkpoint import CheckpointManager, load_engine, save_engine

    rank, world, local_rank, device = D.init_distributed(timeout_s=60)
    report = {"rank": rank, "world": world, "local_rank": local_rank, "device": str(device)}
    report["sums"] = [D.all_reduce_sum_(sum_input(rank, n)).tolist() for n in SUM_SIZES]
    report["mean"] = D.all_reduce_mean({"b": torch.tensor(1.5 + rank), "a": 10.0 * rank})
    report["no_failure"] = D.exchange_step_status(False)[0]
    report["failed_ranks"] = D.exchange_step_status(rank == 1)[0]
    report["stages"] = {}
    for stage in (0, 1, 2):
        config = D.load_ds_config(CPU_CONFIG, zero_stage=stage, micro_batch_size=4, lr=LR, grad_clip=CLIP)
        model = tiny_model(seed=rank)  # different per rank: DeepSpeed broadcasts rank 0's parameters
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        base = engine.optimizer.optimizer if stage else engine.optimizer
        initial = flat_params(engine.module)
        train_steps(engine, rank, [0, 1])
        after_two = flat_params(engine.module)
        manager = CheckpointManager(out_dir / f"run-stage{stage}", keep_last=1, rank=rank, world_size=world,
                                    barrier=D.barrier)
        saved = manager.save(2, lambda directory: save_engine(engine, directory))
        train_steps(engine, rank, [2, 3])
        after_four = flat_params(engine.module)
        fresh_model = tiny_model(seed=99)
        fresh, _, _, _ = deepspeed.initialize(model=fresh_model, model_parameters=fresh_model.parameters(),
                                              config=config)
        load_engine(fresh, manager.latest())
        loaded = flat_params(fresh.module)
        train_steps(fresh, rank, [2, 3])
        if stage == 0:
            report["refused"] = refuse_pickled_code(fresh, saved, out_dir, rank, D)
        report["stages"][stage] = {
            "optimizer": f"{type(base).__module__}.{type(base).__name__}",
            "initial": initial, "after_two": after_two, "loaded": loaded, "after_four": after_four,
            "resumed_four": flat_params(fresh.module), "saved": str(saved),
        }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report))
    # fault propagation: rank 1 hits a data error at step 1; both ranks stop at that step
    for step in range(3):
        error = DataError("feature array has shape (9, 128), expected (10, 128)", shard="train-000001.tar",
                          key="clip42") if (rank == 1 and step == 1) else None
        try:
            D.stop_if_any_rank_failed(error)
        except SrcidError as exc:
            print(f"error at step {step}: {exc}", file=sys.stderr, flush=True)
            print(f"shutdown synchronized: {D.raised_on_every_rank(exc)}", file=sys.stderr, flush=True)
            D.shutdown(synchronize=D.raised_on_every_rank(exc))
            sys.exit(exc.exit_code)
    D.shutdown()


def worker_stuck_peer(out_dir):
    from srcid.errors import SrcidError
    from srcid.train import distributed as D

    rank, _, _, _ = D.init_distributed(timeout_s=5)
    D.all_reduce_sum_(torch.ones(1))  # both ranks are up
    if rank == 1:
        time.sleep(120)  # alive but never joins the next collective; the test kills it
    start = time.monotonic()
    try:
        D.all_reduce_sum_(torch.ones(3))
    except SrcidError as exc:
        print(f"error after {time.monotonic() - start:.2f} s: {exc}", file=sys.stderr, flush=True)
        D.shutdown(synchronize=False)
        sys.exit(exc.exit_code)


def worker_dead_peer(out_dir):
    from srcid.errors import SrcidError
    from srcid.train import distributed as D

    rank, _, _, _ = D.init_distributed(timeout_s=15)
    D.all_reduce_sum_(torch.ones(1))
    if rank == 1:
        os._exit(3)
    start = time.monotonic()
    try:
        D.stop_if_any_rank_failed(None)
    except SrcidError as exc:
        print(f"error after {time.monotonic() - start:.2f} s: {exc}", file=sys.stderr, flush=True)
        D.shutdown(synchronize=False)
        sys.exit(exc.exit_code)


def worker_single(out_dir):
    import deepspeed

    from srcid.train import distributed as D

    rank, world, local_rank, device = D.init_distributed()
    values = sum_input(0, 7)
    summed = D.all_reduce_sum_(values.clone())
    model = tiny_model(seed=0)
    config = D.load_ds_config(CPU_CONFIG, micro_batch_size=4, lr=LR, grad_clip=CLIP)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    train_steps(engine, 0, [0])
    report = {"rank": rank, "world": world, "local_rank": local_rank, "device": str(device),
              "sum_unchanged": torch.equal(summed, values), "mean": D.all_reduce_mean({"x": torch.tensor(2.5)}),
              "failed": D.exchange_step_status(True)[0], "seed": D.seed_everything(43, 0),
              "draw": torch.rand(2).tolist(), "seed1": D.seed_everything(43, 1), "draw1": torch.rand(2).tolist()}
    D.seed_everything(43, 0)
    report["draw_again"] = torch.rand(2).tolist()
    D.shutdown()
    report["initialized_after_shutdown"] = torch.distributed.is_initialized()
    (out_dir / "rank0.json").write_text(json.dumps(report))


# ---------------------------------------------------------------- launching

def launch(scenario, out_dir, world_size, timeout=150, env_extra=None):
    """Start ``world_size`` ranks of a scenario; return the Popen objects (started at once)."""
    from srcid.train.distributed import free_port

    port = free_port()
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(name, None)
        if world_size > 1:
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                       LOCAL_RANK=str(rank))
        env.update(env_extra or {})
        procs.append(subprocess.Popen([sys.executable, __file__, scenario, str(out_dir)], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def finish(proc, timeout):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"rank did not finish within {timeout} s:\n{err[-3000:]}")
    return proc.returncode, err


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error")]


def test_collectives_deepspeed_zero_stages_checkpoint_and_fault_flag(tmp_path):
    procs = launch("collectives", tmp_path, 2)
    results = [finish(p, 170) for p in procs]
    reports = []
    for rank, (code, err) in enumerate(results):
        assert (tmp_path / f"rank{rank}.json").exists(), err[-4000:]
        reports.append(json.loads((tmp_path / f"rank{rank}.json").read_text()))
    for rank, report in enumerate(reports):
        assert (report["rank"], report["world"], report["local_rank"], report["device"]) == (rank, 2, rank, "cpu")
        for size, got in zip(SUM_SIZES, report["sums"]):
            expected = sum_input(0, size).double() + sum_input(1, size).double()
            assert torch.allclose(torch.tensor(got, dtype=torch.float64), expected, rtol=1e-6, atol=1e-6)
        assert report["mean"] == {"a": 5.0, "b": 2.0}
        assert report["no_failure"] == [] and report["failed_ranks"] == [1]
        # DeepSpeed's own loader runs with weights_only forced: the tampered checkpoint is refused
        assert report["refused"]["code_ran"] is False
        assert "tampered: cannot load the DeepSpeed engine state: refused to unpickle posix.mkdir" in (
            report["refused"]["message"])
    for stage in ("0", "1", "2"):
        r0, r1 = reports[0]["stages"][stage], reports[1]["stages"][stage]
        assert r0["optimizer"] == "torch.optim.adam.Adam"
        # rank 0's initial parameters everywhere, and the same parameters after every step
        assert r0["initial"] == r1["initial"] == flat_params(tiny_model(seed=0))
        for key in ("after_two", "after_four", "loaded", "resumed_four"):
            assert r0[key] == r1[key], (stage, key)
        # reference: plain torch on the global batch (mean of the ranks' micro-batch losses), clip 0.5, Adam
        model = tiny_model(seed=0)
        optimizer = torch.optim.Adam(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        for step in range(4):
            optimizer.zero_grad()
            loss = sum(torch.nn.functional.mse_loss(model(x), y) for x, y in
                       (micro_batch(r, step) for r in range(2))) / 2
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            optimizer.step()
            if step == 1:
                assert torch.allclose(torch.tensor(r0["after_two"]), torch.tensor(flat_params(model)), atol=1e-6)
        assert torch.allclose(torch.tensor(r0["after_four"]), torch.tensor(flat_params(model)), atol=1e-6)
        # exact resume: loading the checkpoint gives the saved parameters and the same next steps
        assert r0["loaded"] == r0["after_two"]
        assert r0["resumed_four"] == r0["after_four"]
        saved = Path(r0["saved"])
        assert saved.name == "step-00000002" and (saved / "COMPLETE").is_file()
        assert (saved / "engine" / "mp_rank_00_model_states.pt").is_file()
        if stage != "0":
            assert {p.name for p in (saved / "engine").glob("zero_pp_rank_*_optim_states.pt")} == {
                "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    # the data error on rank 1 stops both ranks at the same step, each with one line
    (code0, err0), (code1, err1) = results
    assert (code0, code1) == (2, 1), f"exit statuses {code0}, {code1}; rank 0:\n{err0[-2000:]}\nrank 1:\n{err1[-2000:]}"
    assert error_lines(err1) == [
        "error at step 1: shard train-000001.tar, key clip42: feature array has shape (9, 128), expected (10, 128)"]
    assert error_lines(err0) == [
        "error at step 1: rank 0: stopping because rank(s) 1 failed (see their error)"]
    # every rank stopped at the same step, so each waits for the others before tearing the group down
    assert "shutdown synchronized: True" in err0 and "shutdown synchronized: True" in err1


def test_timeout_stops_a_rank_whose_peer_does_not_answer(tmp_path):
    rank0, rank1 = launch("stuck_peer", tmp_path, 2)
    try:
        code, err = finish(rank0, 60)
    finally:
        rank1.kill()
        rank1.communicate()
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1, err[-3000:]
    seconds = float(lines[0].split()[2])
    assert 4.5 <= seconds <= 15.0
    assert "rank 0: all_reduce failed (a peer rank exited or did not answer within 5 s)" in lines[0]


def test_a_dead_peer_makes_the_other_rank_fail_quickly(tmp_path):
    rank0, rank1 = launch("dead_peer", tmp_path, 2)
    code1, _ = finish(rank1, 60)
    code0, err = finish(rank0, 60)
    assert code1 == 3
    lines = error_lines(err)
    assert code0 == 2 and len(lines) == 1, err[-3000:]
    assert float(lines[0].split()[2]) < 15.0
    assert "fault check failed" in lines[0]


def test_single_process_without_launcher(tmp_path):
    (proc,) = launch("single", tmp_path, 1)
    code, err = finish(proc, 120)
    assert code == 0, err[-3000:]
    report = json.loads((tmp_path / "rank0.json").read_text())
    assert (report["rank"], report["world"], report["local_rank"], report["device"]) == (0, 1, 0, "cpu")
    assert report["sum_unchanged"] is True
    assert report["mean"] == {"x": 2.5}
    assert report["failed"] == [0]
    assert report["seed"] == 43 and report["seed1"] != 43
    assert report["draw"] == report["draw_again"] != report["draw1"]
    torch.manual_seed(43)
    assert report["draw"] == torch.rand(2).tolist()
    assert report["initialized_after_shutdown"] is False


def test_configs_are_valid_deepspeed_configs():
    import json

    from deepspeed.runtime.config import DeepSpeedConfig

    from srcid.errors import SrcidError
    from srcid.run import DEFAULT_BATCH_SIZE, default_run_config
    from srcid.train.distributed import load_ds_config
    from srcid.train.trainer import engine_config

    for path, bf16 in ((CPU_CONFIG, False), (GPU_CONFIG, True)):
        # the run config is the one source of the keys it owns: the shipped files do not set them
        owned = {"train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps",
                 "gradient_clipping", "zero_optimization"}
        raw_file = json.loads(path.read_text())
        assert not owned & set(raw_file) and "lr" not in raw_file["optimizer"]["params"]
        for stage in (0, 1, 2):
            run = default_run_config("srcid", "tiny")
            run.zero_stage, run.gradient_accumulation = stage, 2
            parsed = DeepSpeedConfig(engine_config(run, path))  # no process group here: world size 1
            assert parsed.zero_optimization_stage == stage
            assert parsed.bfloat16_config.enabled is bf16 and parsed.float16_config.enabled is False
            assert parsed.gradient_clipping == CLIP == run.grad_clip
            assert parsed.train_micro_batch_size_per_gpu == DEFAULT_BATCH_SIZE == 80
            assert parsed.train_batch_size == 80 * 2
            assert parsed.optimizer_name == "adam"
            assert parsed.optimizer_params["lr"] == LR == run.lr and parsed.optimizer_params["torch_adam"] is True
            assert parsed.optimizer_params["adam_w_mode"] is False and parsed.optimizer_params["weight_decay"] == 0
    with pytest.raises(SrcidError, match="ZeRO stage"):
        load_ds_config(CPU_CONFIG, zero_stage=3)
    with pytest.raises(SrcidError, match="not found"):
        load_ds_config(REPO / "missing.json")


def test_in_process_argument_errors(monkeypatch):
    from srcid.errors import SrcidError
    from srcid.train import distributed as D

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SrcidError, match="WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK are missing"):
        D.init_distributed()
    with pytest.raises(SrcidError, match="backend"):
        D.init_distributed(backend="mpi")
    with pytest.raises(SrcidError, match="timeout"):
        D.init_distributed(timeout_s=0)
    assert not torch.distributed.is_initialized()
    with pytest.raises(SrcidError, match="'loss' has shape \\(2,\\), expected a scalar"):
        D.all_reduce_mean({"loss": torch.ones(2)})
    with pytest.raises(SrcidError, match="seed"):
        D.seed_everything(-1)
    seeds = {D.rank_seed(43, r) for r in range(64)} | {D.rank_seed(44, r) for r in range(64)}
    assert len(seeds) == 128 and D.rank_seed(43, 0) == 43


if __name__ == "__main__":
    globals()[f"worker_{sys.argv[1]}"](Path(sys.argv[2]))
