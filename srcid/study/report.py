"""The study's results: Tables I-III, Fig. 3 and the MI curves from the cells' files, as Markdown, JSON and PNGs.

Everything is rebuilt from ``STUDY_DIR/cells`` on every invocation, so the
report always shows every finished cell (including cells run by earlier
invocations or other ``--only`` selections); a missing number is ``-``.

* Table I: the DCID quantizer baselines, each with its ``m -> m`` row.
* Table II: DCID, SRCID(only1) (the ``srcid`` cell read at layer 1) and SRCID.
* Table III: zero-shot retrieval of DCID and SRCID.
* Fig. 3: the Table II average of SRCID against the codebook size, and with
  CLUB switched off in layer 1 or layer 2.
* With several training seeds (``--train-seeds``), a cell and its repeats
  are pooled: every table cell is the mean and sample std over all their
  runs (training seed x head seed; retrieval: training seeds).
* The collapse check: per cell, layer and modality, the codes used, the
  live dimensions of the specific output, the dead hidden units feeding it,
  the relative reconstruction error and the kinds of collapse flagged
  (collapsed codebook, dead y; ``srcid inspect``).
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Optional

from srcid import __version__
from srcid.eval.tables import AVG, format_cell, table1, table2, table3, to_markdown
from srcid.eval.tasks import CROSS
from srcid.files import write_atomic, write_json_atomic
from srcid.run import METRICS_CSV, RUN_CONFIG_FILE
from srcid.study import plots
from srcid.study.cells import CellFiles, Settings, cell_evals, cell_inspection, cell_status, read_record
from srcid.study.grid import CLUB_SETTINGS, LAYERS_FULL, LAYERS_ONLY1, QUANTIZER_BASELINES, Cell
from srcid.train.metrics_log import read_events, read_metrics

TABLES_FILE = "tables.md"
RESULTS_FILE = "results.json"
PLOT_FILES = {
    "cross_modal_average": "cross_modal_average.png",
    "codebook_size": "fig3_codebook_size.png",
    "club": "fig3_club.png",
    "mi_curves": "mi_curves.png",
}
MI_CELL = "srcid"


def split_results(results: dict) -> tuple:
    """``(cross, same, retrieval)`` of one evaluation's ``results``, in the shapes :mod:`srcid.eval.tables` reads."""
    cross, same, retrieval = {}, {}, None
    for task, entry in results.items():
        if task == "retrieval":
            retrieval = {name: r["mean"] for name, r in entry.items()}
            continue
        metric = entry["metric"]
        for direction, result in entry["experiments"].items():
            (cross if direction in CROSS else same).setdefault(task, {})[direction] = result["metrics"][metric]
    return cross, same, retrieval


@dataclasses.dataclass
class CellResults:
    cell: Cell
    status: str
    evals: dict  # layers -> evaluation JSON
    record: dict
    files: CellFiles
    inspection: Optional[dict] = None  # the srcid inspect JSON

    def parts(self, layers: str) -> tuple:
        """``(cross, same, retrieval)`` of the evaluation with ``layers`` (empty when missing)."""
        data = self.evals.get(layers)
        return split_results(data["results"]) if data else ({}, {}, None)


def _pool_metrics(items: list):
    """One table cell pooled over runs: the per-seed values (or single numbers) of the runs that have it, in run
    order; None when none has it."""
    values = []
    for item in items:
        if item is not None:
            values += list(item["values"]) if isinstance(item, dict) else [float(item)]
    return {"values": values} if values else None


def _pool_nested(parts: list) -> dict:
    """``{task: {direction: metric}}`` pooled over the runs that were evaluated (``{}``: none was)."""
    parts = [part for part in parts if part]
    tasks = list(dict.fromkeys(task for part in parts for task in part))
    return {task: {direction: _pool_metrics([part.get(task, {}).get(direction) for part in parts])
                   for direction in dict.fromkeys(d for part in parts for d in part.get(task, {}))}
            for task in tasks}


@dataclasses.dataclass
class GroupResults:
    """A cell and its repeats with other training seeds (the default seed first); the tables read these."""

    runs: list  # CellResults

    @property
    def cell(self) -> Cell:
        return self.runs[0].cell

    @property
    def status(self) -> str:
        return next((r.status for r in self.runs if r.status != "finished"), "finished")

    def parts(self, layers: str) -> tuple:
        """``(cross, same, retrieval)`` pooled over the runs (one run: its own)."""
        parts = [run.parts(layers) for run in self.runs]
        if len(parts) == 1:
            return parts[0]
        retrievals = [p[2] for p in parts if p[2]]
        retrieval = {name: {k: _pool_metrics([r.get(name, {}).get(k) for r in retrievals]) for k in retrievals[0][name]}
                     for name in retrievals[0]} if retrievals else None
        return _pool_nested([p[0] for p in parts]), _pool_nested([p[1] for p in parts]), retrieval

    def finished_runs(self) -> list:
        """The names of its finished runs (those the pooled numbers hold)."""
        return [run.cell.name for run in self.runs if run.status == "finished"]


def group_runs(cells: dict) -> dict:
    """``{cell name: GroupResults}``: each cell of the grid with its training-seed repeats."""
    groups: dict = {}
    for result in cells.values():
        groups.setdefault(result.cell.group, []).append(result)
    return {name: GroupResults(runs) for name, runs in groups.items()}


def collect(grid: list, settings: Settings) -> dict:
    """``{cell name: CellResults}`` for every cell of the grid."""
    found = {}
    for cell in grid:
        files = CellFiles(settings.out, cell)
        found[cell.name] = CellResults(cell, cell_status(cell, settings), cell_evals(cell, settings),
                                       read_record(files), files, cell_inspection(cell, settings))
    return found


def _titled(table: dict, title: str, caption: str) -> dict:
    return {**table, "title": title, "caption": caption}


def build_tables(cells: dict, seeds: list) -> dict:
    """Tables I, II and III (dicts of :mod:`srcid.eval.tables`)."""
    cross1, same1 = {}, {}
    for name, _, label in QUANTIZER_BASELINES:
        if name in cells:
            cross, same, _ = cells[name].parts(LAYERS_ONLY1)
            cross1[label] = cross
            if same:
                same1[label] = same
    rows2, rows3 = {}, {}
    if "dcid-vq" in cells:
        cross, _, retrieval = cells["dcid-vq"].parts(LAYERS_ONLY1)
        rows2["DCID"], rows3["DCID"] = cross, retrieval or {}
    if "srcid" in cells:
        rows2["SRCID(only1)"] = cells["srcid"].parts(LAYERS_ONLY1)[0]
        cross, _, retrieval = cells["srcid"].parts(LAYERS_FULL)
        rows2["SRCID"], rows3["SRCID"] = cross, retrieval or {}
    return {
        "table1": _titled(table1(cross1, same1, seeds), "Table I: quantization methods on DCID",
                          "DCID with each quantizer, cross-modal results and, below each, the training modality's "
                          "own results (m → m; AVE→AVVP's equal AVE's and are left out)."),
        "table2": _titled(table2(rows2, seeds), "Table II: cross-modal generalization on four audio-visual tasks",
                          "SRCID(only1): the SRCID model's layer-1 codes only. AVE and UCF(v)↔VGG(a): accuracy; "
                          "AVVP: micro precision at 0.5; AVE→AVVP: micro F1 (all in %)."),
        "table3": table3(rows3),
    }


def _row_average(row: dict) -> Optional[dict]:
    return row[AVG]


def figure3(cells: dict, seeds: list) -> dict:
    """Fig. 3's data: SRCID's cross-modal results per codebook size and per CLUB setting (Table II layout)."""
    sized = sorted((c for c in cells.values() if c.cell.variant == "srcid" and c.cell.club == "both"),
                   key=lambda c: c.cell.codebook_size)
    codebook_rows = {f"codebook {c.cell.codebook_size}": c.parts(LAYERS_FULL)[0] for c in sized}
    codebook_table = _titled(table2(codebook_rows, seeds), "Fig. 3 (left): SRCID by codebook size",
                             "SRCID (layers 1,2) trained with each codebook size; cross-modal results (%).")
    points = [{"size": c.cell.codebook_size, "cell": c.cell.name, "status": c.status, "avg": _row_average(row)}
              for c, row in zip(sized, codebook_table["rows"])]
    club_cells = [c for key in ("both", 1, 2) for c in cells.values() if c.cell.variant == "srcid"
                  and c.cell.club == key and (key != "both" or c.cell.name == "srcid")]
    club_rows = {CLUB_SETTINGS[c.cell.club]: c.parts(LAYERS_FULL)[0] for c in club_cells}
    club_table = _titled(table2(club_rows, seeds), "Fig. 3 (right): SRCID with and without CLUB",
                         "SRCID (layers 1,2) with the CLUB MI loss in both layers, or switched off in one layer; "
                         "cross-modal results (%).")
    bars = [{"setting": CLUB_SETTINGS[c.cell.club], "cell": c.cell.name, "status": c.status,
             "avg": _row_average(row)}
            for c, row in zip(club_cells, club_table["rows"])]
    return {"codebook_size": {"table": codebook_table, "points": points},
            "club": {"table": club_table, "bars": bars}}


def method_averages(tables: dict) -> list:
    """Table II's average of every method row (Table I's cross-modal rows, then Table II's SRCID rows)."""
    rows = [r for r in tables["table1"]["rows"] if r["kind"] == "cross-modal"]
    rows += [r for r in tables["table2"]["rows"] if r["method"].startswith("SRCID")]
    return [{"method": r["method"], "avg": _row_average(r)} for r in rows]


def mi_curves(run_dir: Path) -> Optional[dict]:
    """Per layer, the CLUB MI estimate (mean over modalities) against the step, and the warm-start switch."""
    if not (run_dir / METRICS_CSV).is_file():
        return None
    series = read_metrics(run_dir)
    layers = {}
    for k in (1, 2):
        parts = [key for key in series if key.startswith(f"L{k}/mi/")]
        if parts:
            steps = series[parts[0]][0]
            if all(len(series[p][0]) == len(steps) and (series[p][0] == steps).all() for p in parts):
                values = sum(series[p][1] for p in parts) / len(parts)
                layers[f"L{k}"] = {"steps": steps.tolist(),
                                   "mi": [float(v) if math.isfinite(v) else None for v in values.tolist()],
                                   "modalities": [p.rsplit("/", 1)[1] for p in parts]}
    switch = next((e for e in read_events(run_dir) if e["name"] == "warm_start_switch"), None)
    threshold = None
    try:
        config = json.loads((run_dir / RUN_CONFIG_FILE).read_text(encoding="utf-8"))
        if config["warm_start"]["mode"] == "mi":
            threshold = float(config["warm_start"]["mi_threshold"])
    except (OSError, ValueError, KeyError, TypeError):
        threshold = None
    return {"run_dir": str(run_dir), "layers": layers, "threshold": threshold,
            "switch": None if switch is None else {"step": switch["step"], "info": switch.get("info", {})}}


def _cell_summary(result: CellResults) -> dict:
    cell, record = result.cell, result.record
    return {
        "label": cell.label,
        "variant": cell.variant,
        "train_seed": cell.train_seed,
        "group": cell.group,
        "overrides": list(cell.overrides),
        "codebook_size": cell.codebook_size,
        "club": cell.club,
        "status": result.status,
        "run_dir": str(result.files.run),
        "train": record.get("train"),
        "commands": record.get("commands", {}),
        "seconds": record.get("seconds", {}),
        "failure": record.get("failure"),
        "evaluations": {
            layers: {"path": str(result.files.eval_json(layers)), "method": data["method"], "model": data.get("model"),
                     "results": data["results"], "tables": data["tables"]}
            for layers, data in result.evals.items()
        },
        "inspection": None if result.inspection is None else {
            "path": str(result.files.inspect_json), "clips": result.inspection.get("clips"),
            "live_std": result.inspection.get("live_std"), "stats": result.inspection["stats"],
        },
    }


def _format_avg(avg: Optional[dict]) -> str:
    return format_cell(avg)


def _live_rule(inspection: dict) -> str:
    """How the inspection decided that a dimension of y is live (older JSONs carry only ``live_std``)."""
    live_std, live_rel = inspection.get("live_std"), inspection.get("live_rel")
    if live_std is not None:
        return f"whose std exceeds {live_std:g}"
    if live_rel is not None:
        return f"whose std exceeds {live_rel:g} times the spread of the layer's reconstruction target"
    return "that vary"


def collapse_table(cells: dict) -> list:
    """Markdown lines: per cell and layer, codes used, live specific dimensions, dead hidden units, relative
    reconstruction error, the class read back from the codes and the kinds of collapse flagged."""
    inspected = [r for r in cells.values() if r.inspection is not None]
    if not inspected:
        return ["No collapse checks yet."]
    modalities = list(dict.fromkeys(s["modality"] for r in inspected for s in r.inspection["stats"]))
    names = " / ".join(modalities)
    first = inspected[0].inspection
    collapse_codes = first.get("collapse_codes")
    codebook_rule = ("" if collapse_codes is None else
                     f" (*collapsed codebook*: at most {collapse_codes} distinct codes over every clip and step)")
    lines = [f"`srcid inspect` of each cell's model on {first.get('clips')} pretraining clips: "
             f"different codes used{codebook_rule}, dimensions of the specific output y {_live_rule(first)} "
             "(0 = *dead y*: y carries nothing, CLUB's estimate for it is 0 by construction, and layer 2 reads a "
             "constant), the share of the hidden ReLU units feeding y that never fire, the reconstruction error "
             "relative to the target's variance, the class read back from the codes on held-out labelled steps "
             "(each code's most frequent class; `srcid inspect`'s second table, where the most frequent class "
             "alone scores what reading nothing does), and the kinds of collapse flagged.",
             "",
             f"| cell | layer | distinct codes ({names}) | live y dims ({names}) | dead units ({names}) "
             f"| recon MSE / target var ({names}) | class from codes ({names}) | flagged |",
             "|---|:-:|---|---|---|---|---|---|"]

    def joined(stats, key, form):
        by_modality = {s["modality"]: s for s in stats}
        return " / ".join("-" if by_modality.get(m, {}).get(key) is None else form(by_modality[m])
                          for m in modalities)

    def flagged(stats):
        kinds = {}
        for s in stats:
            flags = s.get("flags")
            if flags is None:  # an older JSON: its 'collapsed' is the dead-y flag
                flags = ["dead y"] if s.get("collapsed") else []
            for flag in flags:
                kinds.setdefault(flag, []).append(s["modality"])
        return "; ".join(f"{flag}: {', '.join(found)}" for flag, found in kinds.items()) or "-"

    for result in inspected:
        stats = result.inspection["stats"]
        for layer in sorted({s["layer"] for s in stats}):
            in_layer = [s for s in stats if s["layer"] == layer]
            codes = joined(in_layer, "distinct_codes", lambda s: str(s["distinct_codes"]))
            live = joined(in_layer, "specific_live_dims", lambda s: f"{s['specific_live_dims']}/{s['specific_dim']}")
            dead = joined(in_layer, "dead_unit_fraction", lambda s: f"{100 * s['dead_unit_fraction']:.0f}%")
            recon = joined(in_layer, "recon_relative", lambda s: f"{s['recon_relative']:.2f}")
            read = joined(in_layer, "class_from_codes", lambda s: f"{100 * s['class_from_codes']:.0f}%")
            lines.append(f"| {result.cell.name} | {layer} | {codes} | {live} | {dead} | {recon} | {read} "
                         f"| {flagged(in_layer)} |")
    return lines


def _train_seed_note(settings: Settings, pooled: dict) -> list:
    seeds = settings.train_seeds
    if len(seeds) == 1:
        return []
    fewer = [f"{name} ({len(runs)} of {len(seeds)})" for name, runs in pooled.items() if 0 < len(runs) < len(seeds)]
    heads = len(settings.seed_list())
    return [f"Training seeds: {', '.join(map(str, seeds))}: each cell is trained once per seed (the repeats are "
            f"`<cell>-seed<S>`). Tables I-III and Fig. 3 pool the repeats that are finished: each number is the mean ± "
            f"sample std over up to {len(seeds)} × {heads} runs (training seed × head seed; retrieval: training seeds). "
            + (f"Pooled over fewer training seeds: {', '.join(fewer)}." if fewer else ""),
            ""]


def _markdown(settings: Settings, cells: dict, tables: dict, fig3: dict, curves: Optional[dict], pooled: dict) -> str:
    finished = sum(c.status == "finished" for c in cells.values())
    plan = settings.plan
    lines = [
        f"# SRCID study (preset {settings.preset})",
        "",
        f"Command: `{settings.command}`",
        "",
        f"Data: `{settings.data}`. Training: {plan.epochs} epochs"
        + (f", at most {settings.steps_limit} steps" if settings.steps_limit else "")
        + f", {plan.global_batch} clips per step over {settings.processes} process(es). "
        f"Heads: {plan.epochs_cls} epochs (classification), {plan.epochs_loc} (localization), "
        f"seeds {', '.join(map(str, settings.seed_list()))}. Cells finished: {finished} of {len(cells)}.",
        "",
        *_train_seed_note(settings, pooled),
        "## Table I",
        "",
        to_markdown(tables["table1"]),
        "## Table II",
        "",
        to_markdown(tables["table2"]),
        "## Table III",
        "",
        to_markdown(tables["table3"]),
        "## Cross-modal average per method",
        "",
        f"![cross-modal average]({PLOT_FILES['cross_modal_average']})",
        "",
        "| method | Avg. |",
        "|---|:-:|",
        *[f"| {m['method']} | {_format_avg(m['avg'])} |" for m in method_averages(tables)],
        "",
        "## Fig. 3 (left): codebook size",
        "",
        to_markdown(fig3["codebook_size"]["table"]),
        f"![codebook size]({PLOT_FILES['codebook_size']})",
        "",
        "## Fig. 3 (right): CLUB ablation",
        "",
        to_markdown(fig3["club"]["table"]),
    ]
    lines += [f"![CLUB ablation]({PLOT_FILES['club']})", "", "## Training curves: CLUB MI per layer", ""]
    if curves is None:
        lines.append(f"No metrics yet from the `{MI_CELL}` cell.")
    else:
        switch = curves["switch"]
        lines.append(f"From `{curves['run_dir']}/{METRICS_CSV}` (mean over modalities). "
                     + ("Layer 2 did not switch on." if switch is None else
                        f"Layer 2 switched on at step {switch['step']}: {switch['info'].get('reason', '')}."))
    lines += ["", f"![MI curves]({PLOT_FILES['mi_curves']})", "", "## Collapse check", ""]
    lines += collapse_table(cells)
    lines += ["", "## Cells", "",
              "| cell | what | status | run directory | seconds (train, evaluation and check) |", "|---|---|---|---|---|"]
    for result in cells.values():
        seconds = result.record.get("seconds", {})
        train = seconds.get("train")
        evals = sum(v for k, v in seconds.items() if k.startswith(("eval", "inspect")))
        timing = "-" if train is None else f"{train:.0f}, {evals:.0f}"
        status = result.status
        if status == "failed":
            status += ": " + result.record["failure"]["error"].replace("|", "\\|")
        lines.append(f"| {result.cell.name} | {result.cell.label} | {status} | `{result.files.run}` | {timing} |")
    return "\n".join(lines) + "\n"


def write_report(settings: Settings, grid: list, failed: list) -> dict:
    """Write ``tables.md``, ``results.json`` and the plots into the study folder; returns the JSON data."""
    cells = collect(grid, settings)
    groups = group_runs(cells)
    # pooled runs have training x head values per cell, so the tables cannot label them by head seed
    seeds = settings.seed_list() if len(settings.train_seeds) == 1 else None
    tables = build_tables(groups, seeds)
    fig3 = figure3(groups, seeds)
    pooled = {name: group.finished_runs() for name, group in groups.items()}
    averages = method_averages(tables)
    curves = mi_curves(cells[MI_CELL].files.run) if MI_CELL in cells else None
    out = settings.out
    plots.method_averages(averages, out / PLOT_FILES["cross_modal_average"])
    default_size = groups["srcid"].cell.codebook_size if "srcid" in groups else None
    plots.codebook_curve(fig3["codebook_size"]["points"], out / PLOT_FILES["codebook_size"], default_size)
    plots.club_bars(fig3["club"]["bars"], out / PLOT_FILES["club"])
    plots.mi_curves(curves, out / PLOT_FILES["mi_curves"])
    plan = settings.plan
    data = {
        "srcid_version": __version__,
        "command": settings.command,
        "preset": settings.preset,
        "data": str(settings.data),
        "out": str(out),
        "seeds": settings.seed_list(),
        "train_seeds": list(settings.train_seeds),
        "pooled_runs": pooled,
        "training": {"epochs": plan.epochs, "max_steps": settings.steps_limit, "global_batch": plan.global_batch,
                     "processes": settings.processes, "log_every": plan.log_every, "kernels": settings.kernels},
        "evaluation": {"task": "all", "protocol": "default", "epochs_cls": plan.epochs_cls,
                       "epochs_loc": plan.epochs_loc},
        "failed": list(failed),
        "cells": {name: _cell_summary(result) for name, result in cells.items()},
        "tables": tables,
        "cross_modal_average": averages,
        "figure3": fig3,
        "mi_curves": curves,
        "files": {"tables": TABLES_FILE, **PLOT_FILES},
    }
    write_json_atomic(out / RESULTS_FILE, data)
    write_atomic(out / TABLES_FILE, _markdown(settings, cells, tables, fig3, curves, pooled))
    return data
