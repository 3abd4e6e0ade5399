"""Running the grid: each cell's trainer and evaluations as subprocesses, resumable, with progress.

Files of a cell, under ``STUDY_DIR/cells/<name>/``:

``run/``
    the trainer's run directory (checkpoints, ``metrics.csv``,
    ``events.jsonl``, ``model.safetensors``).
``eval-layers1.json``, ``eval-layers1-2.json``
    ``srcid eval --task all`` results with layers 1 / layers 1,2.
``inspect.json``
    ``srcid inspect`` on the pretraining data: the collapse check (codes
    used, spread of the specific outputs, relative reconstruction error).
``train.log``, ``eval-layers*.log``, ``inspect.log``
    the subprocesses' output.
``cell.json``
    the cell's record: its training settings, whether training finished,
    the commands, times, and the last failure.

A cell is finished when every evaluation JSON is present and complete (all
tasks, the study's seeds, head epochs, data and layers), its collapse check
is present, and its record says it was trained with the study's settings; finished cells are skipped. A
training that stopped after a checkpoint is continued with ``--resume``;
otherwise the cell trains from scratch. A failing subprocess fails its cell
only: the next cells still run.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from srcid.errors import SrcidError
from srcid.files import write_json_atomic
from srcid.run import DEFAULT_SEED, METRICS_CSV, MODEL_FILE, RUN_CONFIG_FILE, train_command as trainer_command
from srcid.study.grid import Cell, Plan

CELLS_DIR = "cells"
RECORD_FILE = "cell.json"
RUN_DIR = "run"
SYNTH_SEED = 0


def data_folders() -> tuple:
    """The folders a study reads from DATA_DIR: ``pretrain`` and every evaluation task's."""
    from srcid.eval.tasks import TASK_FOLDERS

    return ("pretrain",) + tuple(TASK_FOLDERS.values())


def missing_folders(data_dir: Path) -> list:
    from srcid.data.manifest import MANIFEST_NAME

    return [name for name in data_folders() if not (Path(data_dir) / name / MANIFEST_NAME).is_file()]


def prepare_data(data: Optional[Path], out: Path, preset: str, say: Callable[[str], None]) -> Path:
    """The study's data folder: ``--data`` checked, or ``STUDY_DIR/data`` synthesized for ``preset`` if missing."""
    needed = ", ".join(f"{name}/" for name in data_folders())
    if data is None:
        data = out / "data"
        if not data.exists():
            from srcid.data.synth import synthesize

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


def rank_batch(plan: Plan, processes: int) -> int:
    """Clips per process and step for ``processes`` processes sharing the plan's global batch."""
    if plan.global_batch % processes:
        raise SrcidError(f"--processes {processes}: the global batch of {plan.global_batch} clips "
                         "does not split evenly over the processes")
    return plan.global_batch // processes


@dataclasses.dataclass
class Settings:
    """One invocation of the study: the plan and what the command line changed."""

    plan: Plan
    out: Path
    data: Path
    seeds: int
    max_steps: Optional[int]
    processes: int
    kernels: Optional[str]
    command: str
    train_seeds: list = dataclasses.field(default_factory=lambda: [DEFAULT_SEED])  # every cell's, in order
    overrides: list = dataclasses.field(default_factory=list)  # --set items for every cell, before the cell's own

    @property
    def preset(self) -> str:
        return self.plan.preset

    @property
    def steps_limit(self) -> Optional[int]:
        return self.max_steps if self.max_steps is not None else self.plan.max_steps

    @property
    def rank_batch(self) -> int:
        """Clips per process and step, so that all processes together take the plan's global batch."""
        return rank_batch(self.plan, self.processes)

    def train_steps(self) -> int:
        """Optimizer steps of one cell (from the pretraining manifest's clip count)."""
        from srcid.data.manifest import load_manifest

        samples = load_manifest(self.data / "pretrain").splits["train"].samples
        per_epoch = max(1, (samples // self.processes) // self.rank_batch)
        total = per_epoch * self.plan.epochs
        return total if self.steps_limit is None else min(total, self.steps_limit)

    def seed_list(self) -> list:
        from srcid.eval.probe import seed_list

        return seed_list(self.seeds)


class CellFiles:
    """Where a cell keeps its run, evaluations, logs and record."""

    def __init__(self, study_dir: Path, cell: Cell):
        self.dir = Path(study_dir) / CELLS_DIR / cell.name
        self.run = self.dir / RUN_DIR
        self.record = self.dir / RECORD_FILE
        self.train_log = self.dir / "train.log"
        self.inspect_json = self.dir / "inspect.json"
        self.inspect_log = self.dir / "inspect.log"

    @staticmethod
    def tag(layers: str) -> str:
        return "layers" + layers.replace(",", "-")

    def eval_json(self, layers: str) -> Path:
        return self.dir / f"eval-{self.tag(layers)}.json"

    def eval_log(self, layers: str) -> Path:
        return self.dir / f"eval-{self.tag(layers)}.log"


def read_record(files: CellFiles) -> dict:
    try:
        record = json.loads(files.record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def write_record(files: CellFiles, record: dict) -> None:
    write_json_atomic(files.record, record, allow_nan=True)


# --------------------------------------------------------------------------- commands


def train_overrides(cell: Cell, settings: Settings) -> list:
    return [f"batch_size={settings.rank_batch}", f"log_every={settings.plan.log_every}", *settings.overrides,
            *cell.overrides]


def train_spec(cell: Cell, settings: Settings) -> dict:
    """Everything that decides a cell's trained model (compared on every invocation)."""
    return {
        "variant": cell.variant,
        "preset": settings.preset,
        "data": str(settings.data / "pretrain"),
        "epochs": settings.plan.epochs,
        "max_steps": settings.steps_limit,
        "processes": settings.processes,
        "overrides": train_overrides(cell, settings),
    }


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
    if settings.kernels:
        command += ["--kernels", settings.kernels]
    return command


def inspect_command(settings: Settings, run_dir: Path, out: Path) -> list:
    """``srcid inspect`` (the collapse check) of a cell's run on the pretraining data."""
    command = [sys.executable, "-m", "srcid.cli", "inspect", "--run", str(run_dir), "--data",
               str(settings.data / "pretrain"), "--json", str(out), "--overwrite"]
    if settings.kernels:
        command += ["--kernels", settings.kernels]
    return command


def child_env(settings: Settings) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if settings.processes > 1 and "DS_ACCELERATOR" not in env:
        import torch

        if not torch.cuda.is_available():
            env["DS_ACCELERATOR"] = "cpu"
    return env


# --------------------------------------------------------------------------- state


def expected_eval(settings: Settings, layers: str) -> dict:
    plan = settings.plan
    return {
        "layers": [int(k) for k in layers.split(",")],
        "seeds": settings.seed_list(),
        "epochs": {"classification": plan.epochs_cls, "localization": plan.epochs_loc},
        "data": str(settings.data),
    }


def read_eval(path: Path, expected: dict) -> Optional[dict]:
    """The evaluation JSON at ``path`` if it is complete and made with the expected settings, else None."""
    from srcid.eval.tasks import TASKS

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("command") != "eval" or data.get("protocol") != "default":
        return None
    results = data.get("results")
    if data.get("tasks_run") != list(TASKS) or not isinstance(results, dict) or set(results) != set(TASKS):
        return None
    if not isinstance(data.get("tables"), dict) or not isinstance(data.get("method"), str):
        return None
    if any(data.get(key) != value for key, value in expected.items()):
        return None
    return data


def read_inspection(path: Path, run_dir: Path, settings: Settings) -> Optional[dict]:
    """The ``srcid inspect`` JSON at ``path`` if it is of ``run_dir``'s model on the study's pretraining data, else None."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("command") != "inspect" or not isinstance(data.get("stats"), list):
        return None
    model = data.get("model")
    if not isinstance(model, dict) or model.get("path") != str(Path(run_dir) / MODEL_FILE):
        return None
    if data.get("data") != str(settings.data / "pretrain") or not data["stats"]:
        return None
    return data


def trained_with(files: CellFiles, spec: dict) -> bool:
    """Whether the cell's record says its training finished with ``spec``."""
    record = read_record(files)
    return bool(record.get("trained")) and record.get("train") == spec and (files.run / MODEL_FILE).is_file()


def cell_evals(cell: Cell, settings: Settings) -> dict:
    """``{layers: evaluation JSON}`` of the cell's complete, current evaluations."""
    files = CellFiles(settings.out, cell)
    if not trained_with(files, train_spec(cell, settings)):
        return {}
    found = {}
    for layers in cell.layers:
        data = read_eval(files.eval_json(layers), expected_eval(settings, layers))
        if data is not None:
            found[layers] = data
    return found


def cell_inspection(cell: Cell, settings: Settings) -> Optional[dict]:
    """The cell's current collapse check (``srcid inspect`` JSON), or None."""
    files = CellFiles(settings.out, cell)
    if not trained_with(files, train_spec(cell, settings)):
        return None
    return read_inspection(files.inspect_json, files.run, settings)


def cell_status(cell: Cell, settings: Settings) -> str:
    """``finished``, ``failed`` (last attempt), ``stale`` (trained with other settings) or ``not run``."""
    if len(cell_evals(cell, settings)) == len(cell.layers) and cell_inspection(cell, settings) is not None:
        return "finished"
    files = CellFiles(settings.out, cell)
    record = read_record(files)
    if record.get("train") not in (None, train_spec(cell, settings)) and (files.run / RUN_CONFIG_FILE).is_file():
        return "stale"
    if record.get("failure"):
        return "failed"
    return "not run"


def check_settings_unchanged(cells: list, settings: Settings) -> None:
    """Refuse to touch cells whose run was trained (or started) with other settings."""
    changed = []
    for cell in cells:
        files = CellFiles(settings.out, cell)
        record = read_record(files)
        spec = train_spec(cell, settings)
        if record.get("train") not in (None, spec) and (files.run / RUN_CONFIG_FILE).is_file():
            diff = [k for k in spec if record["train"].get(k) != spec[k]]
            changed.append(f"{cell.name} ({', '.join(diff)})")
    if changed:
        raise SrcidError(f"{settings.out / CELLS_DIR}: cells trained with other settings: {'; '.join(changed)}; "
                         "use another --out or delete those cell folders")


def _checkpoint_to_resume(run_dir: Path) -> bool:
    from srcid.train.checkpoint import CheckpointManager

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
    from tqdm import tqdm

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
