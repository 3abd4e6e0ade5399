"""Training logs: TensorBoard scalars, a wide CSV, an event list and a summary plot.

Files in the run directory:

``metrics.csv``
    Wide format: a ``step`` column and one column per metric key, in the
    order keys first appeared; a cell is empty when the key was not logged
    at that row. When a new key appears, the file is rewritten (through a
    temporary file) with the wider header. Each :meth:`MetricsLogger.log`
    call is one row; rows are flushed at once, so a crash loses nothing
    already logged.
``events.jsonl``
    One JSON object per line: ``{"step", "name", "info", "time"}`` (e.g.
    the warm-start switch).
``tensorboard/``
    The same scalars (tag = key) and events (text under ``events/<name>``).
``metrics.png``
    Written by :func:`plot_metrics`: one panel per key group. A key's group
    is everything before its last ``/`` (``loss/l1/recon_audio`` goes to the
    panel ``loss/l1``, ``lr`` to ``lr``), so losses are split by layer,
    MI estimates by layer, and so on; events are vertical lines.

Only rank 0 logs (``enabled=rank == 0``); a disabled logger does nothing.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from srcid.errors import SrcidError
from srcid.files import write_atomic

METRICS_CSV = "metrics.csv"
EVENTS_FILE = "events.jsonl"
TENSORBOARD_DIR = "tensorboard"
PLOT_FILE = "metrics.png"


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return [], []
    header = rows[0]
    if not header or header[0] != "step":
        raise SrcidError(f"{path}: not a metrics file (the first column must be 'step')")
    body = [row for row in rows[1:] if row]
    for number, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise SrcidError(f"{path}: line {number} has {len(row)} fields, the header has {len(header)}")
    return header[1:], body


def _csv_text(columns: list[str], rows: list[list[str]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["step", *columns])
    for row in rows:
        writer.writerow(row + [""] * (len(columns) + 1 - len(row)))
    return out.getvalue()


def _check_step(step) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise SrcidError(f"metrics: step must be a non-negative int, got {step!r}")
    return step


class MetricsLogger:
    """Write scalars and events of one run (see the module docstring for the files).

    An existing ``metrics.csv`` is continued. With ``resume_step`` set, rows
    and events logged after that step by an interrupted run are dropped (and TensorBoard purges them), so a resumed
    run does not leave duplicates.
    """

    def __init__(self, run_dir, enabled: bool = True, *, resume_step: int | None = None):
        self.enabled = bool(enabled)
        self.run_dir = Path(run_dir)
        self.csv_path = self.run_dir / METRICS_CSV
        self.events_path = self.run_dir / EVENTS_FILE
        self._columns: list[str] = []
        self._file = None
        self._writer = None
        self._tb = None
        if not self.enabled:
            return
        if resume_step is not None:
            _check_step(resume_step)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.csv_path.exists():
            self._columns, rows = _read_csv(self.csv_path)
            if resume_step is not None:
                kept = [row for row in rows if int(row[0]) <= resume_step]
                if len(kept) != len(rows):
                    write_atomic(self.csv_path, _csv_text(self._columns, kept))
        if resume_step is not None and self.events_path.exists():
            events = read_events(self.run_dir)
            kept = [e for e in events if e["step"] <= resume_step]
            if len(kept) != len(events):
                write_atomic(self.events_path, "".join(json.dumps(e) + "\n" for e in kept))
        from torch.utils.tensorboard import SummaryWriter  # here: tensorboard takes a second to import

        purge = resume_step + 1 if resume_step is not None else None
        self._tb = SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIR), purge_step=purge)
        self._open()

    def _open(self) -> None:
        new = not self.csv_path.exists() or self.csv_path.stat().st_size == 0
        self._file = open(self.csv_path, "a", newline="")
        self._writer = csv.writer(self._file, lineterminator="\n")
        if new:
            self._writer.writerow(["step", *self._columns])
            self._file.flush()

    def _widen(self, new_keys: list[str]) -> None:
        self._file.close()
        columns, rows = _read_csv(self.csv_path) if self.csv_path.stat().st_size else ([], [])
        self._columns = columns + [k for k in new_keys if k not in columns]
        write_atomic(self.csv_path, _csv_text(self._columns, rows))
        self._open()

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """Append one row of scalars (any keys; new keys widen the CSV)."""
        if not self.enabled:
            return
        _check_step(step)
        values = {}
        for key, value in scalars.items():
            if not isinstance(key, str) or not key or key == "step":
                raise SrcidError(f"metrics: invalid key {key!r} at step {step} (a non-empty string other than 'step')")
            try:
                values[key] = float(value)
            except (TypeError, ValueError):
                raise SrcidError(f"metrics: value of {key!r} at step {step} is not a number: {value!r}") from None
        new_keys = [k for k in values if k not in self._columns]
        if new_keys:
            self._widen(new_keys)
        self._writer.writerow([step, *(repr(values[k]) if k in values else "" for k in self._columns)])
        self._file.flush()
        for key, value in values.items():
            self._tb.add_scalar(key, value, step)

    def event(self, step: int, name: str, info: dict | None = None) -> None:
        """Record an event (a line in ``events.jsonl`` and a TensorBoard text entry)."""
        if not self.enabled:
            return
        _check_step(step)
        if not isinstance(name, str) or not name:
            raise SrcidError(f"metrics: event name must be a non-empty string, got {name!r}")
        record = {"step": step, "name": name, "info": dict(info or {}),
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        try:
            line = json.dumps(record)
        except (TypeError, ValueError) as exc:
            raise SrcidError(f"metrics: event {name!r} at step {step}: info is not JSON-serialisable: {exc}") from None
        with open(self.events_path, "a") as handle:
            handle.write(line + "\n")
            handle.flush()
        self._tb.add_text(f"events/{name}", json.dumps(record["info"], sort_keys=True), step)

    def flush(self) -> None:
        if self.enabled and self._file is not None:
            self._file.flush()
            self._tb.flush()

    def close(self) -> None:
        """Flush and close the files (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_metrics(run_dir) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{key: (steps, values)}`` from ``metrics.csv``, skipping rows where the key is empty."""
    path = Path(run_dir) / METRICS_CSV
    if not path.is_file():
        raise SrcidError(f"{path}: no metrics file")
    columns, rows = _read_csv(path)
    series = {}
    for index, key in enumerate(columns, start=1):
        pairs = []
        for row in rows:
            if row[index] != "":
                try:
                    pairs.append((int(row[0]), float(row[index])))
                except ValueError:
                    raise SrcidError(f"{path}: step {row[0]!r}, column {key!r}: "
                                     f"{row[index]!r} is not a number") from None
        steps = np.array([p[0] for p in pairs], dtype=np.int64)
        values = np.array([p[1] for p in pairs], dtype=np.float64)
        series[key] = (steps, values)
    return series


def read_events(run_dir) -> list[dict]:
    """The events of ``events.jsonl`` (empty when there is none)."""
    path = Path(run_dir) / EVENTS_FILE
    if not path.is_file():
        return []
    events = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise SrcidError(f"{path}: line {number} is not JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int) or "name" not in record:
            raise SrcidError(f"{path}: line {number} is not an event (needs 'step' and 'name')")
        events.append(record)
    return events


def metric_group(key: str) -> str:
    """The panel a key is drawn in: everything before its last ``/`` (or the key itself)."""
    return key.rsplit("/", 1)[0] if "/" in key else key


def plot_metrics(run_dir, path=None) -> Path:
    """Draw every logged key, one panel per :func:`metric_group`, events as vertical lines."""
    # matplotlib here, not at the top: the CLI and the study import this module, only a finished run draws
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    series = read_metrics(run_dir)
    events = read_events(run_dir)
    groups: dict[str, list[str]] = {}
    for key, (steps, _) in series.items():
        if len(steps):
            groups.setdefault(metric_group(key), []).append(key)
    if not groups:
        raise SrcidError(f"{run_dir / METRICS_CSV}: no values to plot")
    columns = min(3, len(groups))
    rows = math.ceil(len(groups) / columns)
    figure = Figure(figsize=(4.4 * columns, 3.0 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    first = min(int(series[k][0].min()) for keys in groups.values() for k in keys)
    last = max(int(series[k][0].max()) for keys in groups.values() for k in keys)
    names = sorted({e["name"] for e in events})
    colors = {name: f"C{(i + 3) % 10}" for i, name in enumerate(names)}
    for index, (group, keys) in enumerate(groups.items()):
        axes = figure.add_subplot(rows, columns, index + 1)
        for key in keys:
            steps, values = series[key]
            values = np.where(np.isfinite(values), values, np.nan)
            label = key[len(group) + 1:] if key != group else key
            axes.plot(steps, values, label=label, linewidth=1.0, marker="o" if len(steps) == 1 else None,
                      markersize=3)
        for name in names:
            for position, event in enumerate(e for e in events if e["name"] == name):
                axes.axvline(event["step"], color=colors[name], linestyle=":", linewidth=1.0,
                             label=name if position == 0 else None)
        if last > first:
            axes.set_xlim(first, last)  # one step axis for all panels, so event lines align
        axes.set_title(group, fontsize=9)
        axes.set_xlabel("step", fontsize=7)
        axes.tick_params(labelsize=7)
        axes.grid(alpha=0.3)
        if len(keys) > 1 or names:
            axes.legend(fontsize=6)
    out = Path(path) if path is not None else run_dir / PLOT_FILE
    tmp = out.with_name(f".{out.stem}.tmp-{os.getpid()}{out.suffix}")
    figure.savefig(tmp, dpi=100)
    os.replace(tmp, out)
    return out
