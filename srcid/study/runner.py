"""Running the grid: each cell's trainer and evaluations as subprocesses, resumable, with progress.

What a cell holds and when it is finished is :mod:`srcid.study.cells`; this
module prepares the data, builds the subprocesses' command lines (the
trainer's through :func:`srcid.run.train_command`) and runs them. Finished
cells are skipped. A training that stopped after a checkpoint is continued
with ``--resume``; otherwise the cell trains from scratch. A failing
subprocess fails its cell only: the next cells still run.
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from srcid.data.manifest import MANIFEST_NAME
from srcid.data.synth import synthesize
from srcid.errors import SrcidError
from srcid.eval.tasks import TASK_FOLDERS
from srcid.run import METRICS_CSV, MODEL_FILE, RUN_CONFIG_FILE, kernels_argv
from srcid.run import train_command as trainer_command
from srcid.study.cells import (CellFiles, Settings, check_settings_unchanged, cell_status, expected_eval, read_eval,
                               read_inspection, read_record, train_overrides, train_spec, trained_with, write_record)
from srcid.study.grid import Cell
from srcid.train.checkpoint import CheckpointManager

SYNTH_SEED = 0


def data_folders() -> tuple:
    """The folders a study reads from DATA_DIR: ``pretrain`` and every evaluation task's."""
    return ("pretrain",) + tuple(TASK_FOLDERS.values())


def missing_folders(data_dir: Path) -> list:
    return [name for name in data_folders() if not (Path(data_dir) / name / MANIFEST_NAME).is_file()]


def prepare_data(data: Optional[Path], out: Path, preset: str, say: Callable[[str], None]) -> Path:
    """The study's data folder: ``--data`` checked, or ``STUDY_DIR/data`` synthesized for ``preset`` if missing."""
    needed = ", ".join(f"{name}/" for name in data_folders())
    if data is None:
        data = out / "data"
        if not data.exists():
            say(f"synthesizing the {preset} data into {data} ...")
            partial = out / ".data-partial"
            if partial.exists():
                shutil.rmtree(partial)
            synthesize(preset, partial, seed=SYNTH_SEED, progress=None)
            os.replace(partial, data)
        elif missing_folders(data):
            raise SrcidError(f"{data}: lacks {', '.join(f + '/' for f in missing_folders(data))}; "
                             "remove the folder (it is synthesized again) or pass --data")
        return data.resolve()
    if not data.is_dir():
        raise SrcidError(f"--data {data}: no such folder (it needs {needed})")
    missing = missing_folders(data)
    if missing:
        raise SrcidError(f"--data {data}: missing {', '.join(f + '/' for f in missing)} (each with dataset.json); "
                         f"a study reads {needed} (srcid data synth --preset P --out DIR writes them)")
    return data.resolve()


# --------------------------------------------------------------------------- commands


def train_command(cell: Cell, settings: Settings, run_dir: Path, *, resume: bool) -> list:
    """The trainer's command line for ``cell`` (``deepspeed --num_gpus N`` for several processes)."""
    return trainer_command(settings.processes, variant=cell.variant, preset=settings.preset,
                           data=settings.data / "pretrain", out=run_dir, epochs=settings.plan.epochs,
                           max_steps=settings.steps_limit, overrides=train_overrides(cell, settings),
                           kernels=settings.kernels, resume=resume, quiet=True)


def eval_command(settings: Settings, run_dir: Path, layers: str, out: Path) -> list:
    """``srcid eval --task all`` on a cell's run with the study's seeds and head epochs."""
    plan = settings.plan
    command = [sys.executable, "-m", "srcid.cli", "eval", "--run", str(run_dir), "--data", str(settings.data),
               "--task", "all", "--layers", layers, "--seeds", str(settings.seeds),
               "--epochs-cls", str(plan.epochs_cls), "--epochs-loc", str(plan.epochs_loc), "--out", str(out),
               "--overwrite"]  # the cell's own file: an evaluation made with other settings is redone
    return command + kernels_argv(settings.kernels)


def inspect_command(settings: Settings, run_dir: Path, out: Path) -> list:
    """``srcid inspect`` (the collapse check) of a cell's run on the pretraining data."""
    command = [sys.executable, "-m", "srcid.cli", "inspect", "--run", str(run_dir), "--data",
               str(settings.data / "pretrain"), "--json", str(out), "--overwrite"]
    return command + kernels_argv(settings.kernels)


def child_env(settings: Settings) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if settings.processes > 1 and "DS_ACCELERATOR" not in env and not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    return env


def _checkpoint_to_resume(run_dir: Path) -> bool:
    return (run_dir / RUN_CONFIG_FILE).is_file() and CheckpointManager(run_dir).latest() is not None


# --------------------------------------------------------------------------- running


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


@dataclasses.dataclass
class Outcome:
    """What happened to one cell in this invocation."""

    name: str
    status: str  # "finished", "skipped" (finished earlier), "failed"
    seconds: float = 0.0
    error: Optional[str] = None


def error_line(log: Path) -> str:
    """The error a failed subprocess reported: its last ``srcid: error:`` line, else its last line."""
    try:
        lines = [line.strip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    except OSError:
        return f"no log at {log}"
    errors = [line for line in lines if "srcid: error:" in line]
    if errors:
        return errors[-1].split("srcid: error:", 1)[1].strip()
    return lines[-1] if lines else "no output"


def _last_logged_step(metrics_csv: Path) -> int:
    try:
        lines = metrics_csv.read_text(encoding="utf-8").splitlines()
        return int(lines[-1].split(",", 1)[0]) if len(lines) > 1 else 0
    except (OSError, ValueError, IndexError):
        return 0


def run_logged(command: list, log: Path, env: dict, *, append: bool = False, steps: Optional[int] = None,
               metrics_csv: Optional[Path] = None, desc: str = "") -> tuple:
    """Run ``command`` with its output in ``log``; ``(exit status, seconds)``.

    With ``steps`` and ``metrics_csv`` a step bar follows the run's logged steps (on a terminal).
    """
    start = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a" if append else "w", encoding="utf-8") as handle:
        handle.write(f"$ {shlex.join(command)}\n")
        handle.flush()
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
        bar = tqdm(total=steps, desc=desc, unit="step", leave=False, dynamic_ncols=True,
                   disable=steps is None or metrics_csv is None or not sys.stderr.isatty())
        try:
            while True:
                try:
                    code = process.wait(timeout=2.0)
                    break
                except subprocess.TimeoutExpired:
                    if not bar.disable:
                        bar.update(max(0, _last_logged_step(metrics_csv) - bar.n))
        except BaseException:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            raise
        finally:
            bar.close()
    return code, time.perf_counter() - start


class Runner:
    """Runs the selected cells one after the other and reports progress through ``say``."""

    def __init__(self, settings: Settings, say: Callable[[str], None] = print):
        self.settings = settings
        self.say = say
        self.env = child_env(settings)

    def run(self, cells: list) -> list:
        settings = self.settings
        check_settings_unchanged(cells, settings)
        steps = settings.train_steps()
        statuses = {cell.name: cell_status(cell, settings) for cell in cells}
        earlier = sum(s == "finished" for s in statuses.values())
        self.say(f"study ({settings.preset}): {_count(len(cells), 'cell')}, {earlier} finished earlier, "
                 f"{steps} training steps per cell, results in {settings.out}")
        outcomes = []
        for index, cell in enumerate(cells, start=1):
            prefix = f"[{index}/{len(cells)}] {cell.name}"
            if statuses[cell.name] == "finished":
                self.say(f"{prefix}: finished earlier, skipped")
                outcomes.append(Outcome(cell.name, "skipped"))
                continue
            outcome = self.run_cell(cell, prefix, steps)
            outcomes.append(outcome)
            done = sum(o.status in ("finished", "skipped") for o in outcomes)
            if outcome.status == "failed":
                self.say(f"{prefix}: FAILED: {outcome.error}")
            else:
                self.say(f"{prefix}: done in {outcome.seconds:.1f} s ({done} of {_count(len(cells), 'cell')} finished)")
        return outcomes

    def run_cell(self, cell: Cell, prefix: str, steps: int) -> Outcome:
        settings = self.settings
        files = CellFiles(settings.out, cell)
        spec = train_spec(cell, settings)
        record = read_record(files)
        record.update(name=cell.name, variant=cell.variant, label=cell.label, train=spec, failure=None)
        record.setdefault("commands", {})
        record.setdefault("seconds", {})
        started = time.perf_counter()

        def fail(stage: str, code: int, log: Path, message: Optional[str] = None) -> Outcome:
            message = message or f"{stage} exited with status {code}: {error_line(log)} (log: {log})"
            record["failure"] = {"stage": stage, "exit_status": code, "error": message, "log": str(log)}
            write_record(files, record)
            return Outcome(cell.name, "failed", time.perf_counter() - started, message)

        if not trained_with(files, spec):
            resume = _checkpoint_to_resume(files.run)
            for layers in cell.layers:
                files.eval_json(layers).unlink(missing_ok=True)
            files.inspect_json.unlink(missing_ok=True)
            if not resume and files.run.is_dir():
                shutil.rmtree(files.run)
            record["trained"] = False
            command = train_command(cell, settings, files.run, resume=resume)
            record["commands"]["train"] = shlex.join(command)
            write_record(files, record)
            self.say(f"{prefix}: {'resuming' if resume else 'training'} {cell.label} ({steps} steps) ...")
            code, seconds = run_logged(command, files.train_log, self.env, append=resume, steps=steps,
                                       metrics_csv=files.run / METRICS_CSV, desc=cell.name)
            record["seconds"]["train"] = record["seconds"].get("train", 0.0) + seconds if resume else seconds
            if code != 0:
                return fail("training", code, files.train_log)
            if not (files.run / MODEL_FILE).is_file():
                return fail("training", code, files.train_log,
                            f"training exited without writing {files.run / MODEL_FILE} (log: {files.train_log})")
            record["trained"] = True
            write_record(files, record)
        # (record key, stage name, progress message, command, log, output JSON, whether the output is complete)
        stages = []
        for layers in cell.layers:
            out, expected = files.eval_json(layers), expected_eval(settings, layers)
            stages.append((f"eval {layers}", f"evaluation (layers {layers})", f"evaluating with layers {layers}",
                           eval_command(settings, files.run, layers, out), files.eval_log(layers), out,
                           lambda out=out, expected=expected: read_eval(out, expected) is not None))
        stages.append(("inspect", "collapse check", "checking for collapse",
                       inspect_command(settings, files.run, files.inspect_json), files.inspect_log, files.inspect_json,
                       lambda: read_inspection(files.inspect_json, files.run, settings) is not None))
        for key, stage, message, command, log, out, complete in stages:
            if complete():
                continue
            record["commands"][key] = shlex.join(command)
            write_record(files, record)
            self.say(f"{prefix}: {message} ...")
            code, seconds = run_logged(command, log, self.env)
            record["seconds"][key] = seconds
            if code != 0:
                return fail(stage, code, log)
            if not complete():
                return fail(stage, code, log, f"{stage} left no complete {out} (log: {log})")
        write_record(files, record)
        return Outcome(cell.name, "finished", time.perf_counter() - started)
