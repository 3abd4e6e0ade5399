"""The state of the study's cells: their files, records and results, as the runner and the report read them.

Files of a cell, under ``STUDY_DIR/cells/<name>/``:

``run/``
    the trainer's run directory (checkpoints, ``metrics.csv``,
    ``events.jsonl``, ``model.safetensors``; names in :mod:`srcid.run`).
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
is present, and its record says it was trained with the study's settings
(:func:`train_spec`). Nothing here starts a process: :mod:`srcid.study.runner`
does, and :mod:`srcid.study.report` reads the same state.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

from srcid.data.manifest import load_manifest
from srcid.errors import SrcidError
from srcid.eval.probe import seed_list
from srcid.eval.tasks import TASKS
from srcid.files import write_json_atomic
from srcid.run import DEFAULT_SEED, MODEL_FILE, RUN_CONFIG_FILE
from srcid.study.grid import Cell, Plan

CELLS_DIR = "cells"
RECORD_FILE = "cell.json"
RUN_DIR = "run"


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
        samples = load_manifest(self.data / "pretrain").splits["train"].samples
        per_epoch = max(1, (samples // self.processes) // self.rank_batch)
        total = per_epoch * self.plan.epochs
        return total if self.steps_limit is None else min(total, self.steps_limit)

    def seed_list(self) -> list:
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
