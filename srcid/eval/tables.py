"""The paper's result tables, from result dicts, as JSON-ready dicts and Markdown.

Input: one mapping per method (row). A cell value is a number, a list of
per-seed numbers, or a mapping with ``"values"`` (per seed, as
:func:`srcid.eval.metrics.summarize` and :func:`srcid.eval.probe.run_seeds`
give) or with ``"mean"`` (and optionally ``"std"``); ``None`` or an absent
key is a missing cell, shown as ``-``.

* Table II (:func:`table2`): ``{task: {direction: value}}`` with tasks
  ``ave``, ``avvp``, ``ave-avvp``, ``ucf-vgg`` and directions ``V->A``,
  ``A->V``. Avg. = mean of the eight cells.
* Table I (:func:`table1`): the same rows, each optionally followed by an
  ``m -> m`` row of same-modality results ``{task: {"V->V": .., "A->A": ..}}``
  for ``ave``, ``avvp``, ``ucf-vgg``; the ``V->V`` result sits under the
  ``V->A`` column (the training modality of that column). As the caption
  says, ``m -> m`` has no AVE -> AVVP cells (they equal AVE's) and its Avg.
  is the mean of its six cells; the other rows average eight.
* Table III (:func:`table3`): ``{"video-text": {"R@1": .., "R@5": .., "R@10": ..},
  "audio-text": {...}}``, each the mean of both retrieval directions (a whole
  :func:`srcid.eval.metrics.retrieval_report` is also accepted: its ``"mean"``
  is used). Avg. = mean of the six cells.

Extra columns (not in the paper): a row of Table II or I may also carry
``{"avvp-f1": {direction: value}}`` (:data:`AVVP_F1`), AVVP's micro F1 of
the same heads whose precision the AVVP columns show (a head that predicts
background everywhere scores a high precision but a low F1). When any row
has it, the table gets the pair of columns "AVVP F1" (``extra_columns``,
each row's values in ``extra_cells``), printed after Avg. and never counted
in it, so Avg. stays the paper's and comparable with it.

Avg. is shown only when every cell it averages is present. With per-seed
values its mean is the mean of the cell means; its std is the std over seeds
of the per-seed averages when every cell has the same number of seeds.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from decimal import ROUND_HALF_UP, Decimal

from srcid.errors import SrcidError
from srcid.eval.metrics import summarize

TASK_LABELS = {"ave": "AVE", "avvp": "AVVP", "ave-avvp": "AVE→AVVP", "ucf-vgg": "UCF(v)↔VGG(a)"}
CROSS_DIRECTIONS = ("V->A", "A->V")
SAME_DIRECTIONS = {"V->A": "V->V", "A->V": "A->A"}
SAME_MODALITY_TASKS = ("ave", "avvp", "ucf-vgg")
RETRIEVAL_SETS = {"video-text": "MSCOCO (V↔T)", "audio-text": "Clotho (A↔T)"}
RETRIEVAL_KS = ("R@1", "R@5", "R@10")
AVG = "avg"
AVVP_F1 = "avvp-f1"
EXTRA_LABELS = {AVVP_F1: "AVVP F1"}  # extra columns of Tables II and I, after Avg. and not averaged
EXTRA_NOTES = {AVVP_F1: "AVVP F1: micro F1 at 0.5 of the same AVVP heads (not in the paper, not in Avg.)."}


def _columns_av() -> list[dict]:
    return [
        {"key": f"{task}/{direction}", "group": label, "label": direction.replace("->", "→")}
        for task, label in TASK_LABELS.items()
        for direction in CROSS_DIRECTIONS
    ]


def _columns_extra() -> list[dict]:
    return [
        {"key": f"{extra}/{direction}", "group": label, "label": direction.replace("->", "→")}
        for extra, label in EXTRA_LABELS.items()
        for direction in CROSS_DIRECTIONS
    ]


def _columns_retrieval() -> list[dict]:
    return [
        {"key": f"{name}/{k}", "group": label, "label": k}
        for name, label in RETRIEVAL_SETS.items()
        for k in RETRIEVAL_KS
    ]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _cell(value, where: str, seeds: Sequence[int] | None) -> dict | None:
    """Normalise one cell to ``{"mean", "std", "n", "values"}`` (``values`` may be ``None``)."""
    if value is None:
        return None
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        value = value.tolist()
    if isinstance(value, Mapping):
        if "values" in value and value["values"] is not None:
            values = value["values"]
            values = values.tolist() if hasattr(values, "tolist") else list(values)
        elif "mean" in value:
            mean, std = value["mean"], value.get("std")
            for name, number in (("mean", mean), ("std", std)):
                if number is not None and not _is_number(number):
                    raise SrcidError(f"{where}: {name} must be a finite number, got {number!r}")
            if mean is None:
                raise SrcidError(f"{where}: mean is missing")
            return {"mean": float(mean), "std": None if std is None else float(std), "n": value.get("n"), "values": None}
        else:
            raise SrcidError(f"{where}: a mapping cell needs 'values' or 'mean', got keys {sorted(value)}")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        values = [value]
    elif isinstance(value, Sequence) and not isinstance(value, str):
        values = list(value)
    else:
        raise SrcidError(f"{where}: expected a number, a list of per-seed numbers or a summary, got {type(value).__name__}")
    if not values or not all(_is_number(v) for v in values):
        raise SrcidError(f"{where}: expected finite numbers, got {values!r}")
    if seeds is not None and len(values) != len(seeds):
        raise SrcidError(f"{where}: {len(values)} values for {len(seeds)} seeds")
    return summarize(values)


def _average(cells: list[dict | None]) -> dict | None:
    if not cells or any(c is None for c in cells):
        return None
    counts = {len(c["values"]) if c["values"] is not None else None for c in cells}
    if len(counts) == 1 and None not in counts:
        per_seed = [math.fsum(c["values"][i] for c in cells) / len(cells) for i in range(counts.pop())]
        return summarize(per_seed)
    return {"mean": math.fsum(c["mean"] for c in cells) / len(cells), "std": None, "n": None, "values": None}


def _check_keys(given: Mapping, allowed: Sequence[str], where: str) -> None:
    if not isinstance(given, Mapping):
        raise SrcidError(f"{where}: expected a mapping, got {type(given).__name__}")
    unknown = [k for k in given if k not in allowed]
    if unknown:
        raise SrcidError(f"{where}: unknown key {unknown[0]!r} (expected one of {', '.join(allowed)})")


def _av_row(method: str, result: Mapping, seeds, *, same_modality: bool) -> dict:
    tasks = SAME_MODALITY_TASKS if same_modality else tuple(TASK_LABELS)
    directions = tuple(SAME_DIRECTIONS.values()) if same_modality else CROSS_DIRECTIONS
    row_name = f"{method} (m -> m)" if same_modality else method
    _check_keys(result, tasks + tuple(EXTRA_LABELS), f"row {row_name!r}")
    cells, averaged = {}, []
    for column in _columns_av():
        task, cross = column["key"].split("/")
        direction = SAME_DIRECTIONS[cross] if same_modality else cross
        cell = None
        if task in tasks:
            per_task = result.get(task) or {}
            _check_keys(per_task, directions, f"row {row_name!r}, task {task!r}")
            cell = _cell(per_task.get(direction), f"row {row_name!r}, {task} {direction}", seeds)
            averaged.append(cell)
        cells[column["key"]] = cell
    extra_cells = {}
    for column in _columns_extra():
        extra, cross = column["key"].split("/")
        direction = SAME_DIRECTIONS[cross] if same_modality else cross
        per_extra = result.get(extra) or {}
        _check_keys(per_extra, directions, f"row {row_name!r}, {extra!r}")
        extra_cells[column["key"]] = _cell(per_extra.get(direction), f"row {row_name!r}, {extra} {direction}", seeds)
    return {
        "method": "m → m" if same_modality else method,
        "of": method,
        "kind": "same-modality" if same_modality else "cross-modal",
        "cells": cells,
        AVG: _average(averaged),
        "extra_cells": extra_cells,
    }


def _with_extras(table: dict) -> dict:
    """Keep the extra columns any row has a value in (both directions of each); drop the rest."""
    rows = table["rows"]
    used = {c["key"].split("/")[0] for c in _columns_extra() for row in rows if row["extra_cells"].get(c["key"]) is not None}
    columns = [c for c in _columns_extra() if c["key"].split("/")[0] in used]
    for row in rows:
        cells = row.pop("extra_cells")
        if columns:
            row["extra_cells"] = {c["key"]: cells[c["key"]] for c in columns}
    if columns:
        table["extra_columns"] = columns
        table["extra_note"] = " ".join(EXTRA_NOTES[extra] for extra in EXTRA_LABELS if extra in used)
    return table


def _table(title: str, caption: str, columns: list[dict], rows: list[dict], seeds, average_rule: str) -> dict:
    return {
        "title": title,
        "caption": caption,
        "columns": columns,
        "rows": rows,
        "seeds": None if seeds is None else [int(s) for s in seeds],
        "average_rule": average_rule,
    }


def table2(results: Mapping[str, Mapping], seeds: Sequence[int] | None = None) -> dict:
    """Table II: cross-modal results of each method on the four audio-visual tasks."""
    rows = [_av_row(method, result, seeds, same_modality=False) for method, result in results.items()]
    return _with_extras(_table(
        "Table II: cross-modal generalization on four audio-visual tasks",
        "AVE and UCF(v)↔VGG(a): accuracy; AVVP: micro precision at 0.5; AVE→AVVP: micro F1 (all in %).",
        _columns_av(), rows, seeds, "Avg. = mean of the 8 cells",
    ))


def table1(
    results: Mapping[str, Mapping],
    same_modality: Mapping[str, Mapping] | None = None,
    seeds: Sequence[int] | None = None,
) -> dict:
    """Table I: cross-modal rows, each followed by its ``m -> m`` row when given."""
    same_modality = same_modality or {}
    orphans = [m for m in same_modality if m not in results]
    if orphans:
        raise SrcidError(f"m -> m results for {orphans[0]!r}, which has no cross-modal row")
    rows = []
    for method, result in results.items():
        rows.append(_av_row(method, result, seeds, same_modality=False))
        if same_modality.get(method) is not None:
            rows.append(_av_row(method, same_modality[method], seeds, same_modality=True))
    return _with_extras(_table(
        "Table I: quantizers, cross-modal and same-modality (m → m) results",
        "An m → m row gives the training modality's own result (V→V under V→A, A→A under A→V); "
        "its AVE→AVVP cells equal AVE's and are left out.",
        _columns_av(), rows, seeds, "Avg. = mean of the 8 cells; m → m rows: mean of 6 cells, AVE→AVVP excluded",
    ))


def table3(results: Mapping[str, Mapping], seeds: Sequence[int] | None = None) -> dict:
    """Table III: zero-shot retrieval R@1/5/10, each the mean of both directions."""
    rows = []
    for method, result in results.items():
        _check_keys(result, tuple(RETRIEVAL_SETS), f"row {method!r}")
        cells = {}
        for name in RETRIEVAL_SETS:
            entry = result.get(name) or {}
            if isinstance(entry, Mapping) and isinstance(entry.get("mean"), Mapping):
                entry = entry["mean"]
            _check_keys(entry, RETRIEVAL_KS, f"row {method!r}, {name}")
            for k in RETRIEVAL_KS:
                cells[f"{name}/{k}"] = _cell(entry.get(k), f"row {method!r}, {name} {k}", seeds)
        average = _average(list(cells.values()))
        rows.append({"method": method, "of": method, "kind": "retrieval", "cells": cells, AVG: average})
    return _table(
        "Table III: zero-shot retrieval",
        "Recall at K in %, each the mean of both directions.",
        _columns_retrieval(), rows, seeds, "Avg. = mean of the 6 cells",
    )


def _round(value: float, digits: int) -> str:
    """``value`` to ``digits`` decimals, halves rounded up on its shortest decimal form (as printed tables do)."""
    return str(Decimal(repr(float(value))).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))


def format_cell(cell: dict | None, digits: int = 2) -> str:
    """``mean ± std`` (just the mean without a spread), ``-`` when missing."""
    if cell is None:
        return "-"
    text = _round(cell["mean"], digits)
    if cell.get("std") is not None:
        text += f" ± {_round(cell['std'], digits)}"
    return text


def to_markdown(table: dict, digits: int = 2) -> str:
    """A Markdown rendering of a table built by :func:`table1`, :func:`table2` or :func:`table3`.

    Extra columns (``extra_columns``) follow Avg.
    """
    columns, extra = table["columns"], table.get("extra_columns", [])
    header = ["Method"] + [f"{c['group']} {c['label']}" for c in columns] + ["Avg."]
    header += [f"{c['group']} {c['label']}" for c in extra]
    rule = "|" + "|".join(["---"] + [":-:"] * (len(header) - 1)) + "|"
    lines = [f"**{table['title']}**", "", "| " + " | ".join(header) + " |", rule]
    for row in table["rows"]:
        cells = [format_cell(row["cells"].get(c["key"]), digits) for c in columns] + [format_cell(row[AVG], digits)]
        cells += [format_cell(row.get("extra_cells", {}).get(c["key"]), digits) for c in extra]
        lines.append("| " + " | ".join([row["method"]] + cells) + " |")
    notes = [table["caption"], table["average_rule"] + "."]
    if extra and table.get("extra_note"):
        notes.append(table["extra_note"])
    if table.get("seeds"):
        notes.append(f"Mean ± sample std over seeds {', '.join(str(s) for s in table['seeds'])}.")
    return "\n".join(lines + ["", " ".join(notes)]) + "\n"
