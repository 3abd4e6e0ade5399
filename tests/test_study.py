"""``srcid study`` on the tiny preset: the whole grid end to end, skipping, --only, resume, failing cells, bad input."""
import csv
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import srcid.cli
from srcid.errors import SrcidError
from srcid.study.grid import (PLANS, build_grid, codebook_sizes, matches, preset_codebook_size, select, train_seed_list,
                              with_train_seeds)
from srcid.study.cells import read_eval
from srcid.study.runner import error_line
from srcid.run import TRAINER_MODULE

ENV = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
TINY_SIZES = [16, 32, 64]  # the tiny preset's codebook size 32 times 0.5, 1, 2
DCID_ROWS = ["DCID(VQ)", "DCID(FSQ)", "DCID(RVQ-2)", "DCID(RVQ-3)", "DCID(RVQ-4)"]
PLOTS = ["cross_modal_average.png", "fig3_codebook_size.png", "fig3_club.png", "mi_curves.png"]
TABLE_METRIC = {"ave": "accuracy", "avvp": "precision", "ave-avvp": "f1", "ucf-vgg": "accuracy"}


def study(*args, timeout=400):
    return subprocess.run([sys.executable, "-m", "srcid.cli", "study", *map(str, args)], env=ENV,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The whole tiny grid, data synthesized into the study folder."""
    out = tmp_path_factory.mktemp("study") / "tiny"
    result = study("--preset", "tiny", "--out", out)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return out


def results_of(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def row(table: dict, method: str) -> dict:
    return next(r for r in table["rows"] if r["method"] == method)


# --------------------------------------------------------------------------- the whole grid


def test_tables_markdown_has_every_table_and_figure(full):
    text = (full / "tables.md").read_text()
    for heading in ("## Table I", "## Table II", "## Table III", "## Fig. 3 (left): codebook size",
                    "## Fig. 3 (right): CLUB ablation", "## Training curves", "## Collapse check", "## Cells"):
        assert heading in text
    for method in DCID_ROWS + ["| m → m |", "| DCID |", "| SRCID(only1) |", "| SRCID |"]:
        assert method in text
    for size in TINY_SIZES:
        assert f"| codebook {size} |" in text
    for plot in PLOTS:
        assert f"]({plot})" in text
    assert "srcid study --preset tiny" in text


def test_results_json_is_complete(full):
    data = results_of(full)
    assert data["preset"] == "tiny" and data["seeds"] == [43] and data["failed"] == []
    assert data["command"].startswith("srcid study --preset tiny --out ")
    grid = build_grid(PLANS["tiny"])
    assert list(data["cells"]) == [cell.name for cell in grid]
    for name, cell in data["cells"].items():
        assert cell["status"] == "finished", name
        assert (Path(cell["run_dir"]) / "model.safetensors").is_file()
        assert set(cell["evaluations"]) == ({"1,2", "1"} if name == "srcid" else
                                            {"1"} if name.startswith("dcid") else {"1,2"})
        for evaluation in cell["evaluations"].values():
            assert set(evaluation["results"]) == {"ave", "avvp", "ave-avvp", "ucf-vgg", "retrieval"}
        inspection = cell["inspection"]
        layers = 1 if name.startswith("dcid") else 2
        assert [(s["layer"], s["modality"]) for s in inspection["stats"]] == [
            (k, m) for k in range(1, layers + 1) for m in ("audio", "video", "text")]
    tables = data["tables"]
    assert [r["method"] for r in tables["table1"]["rows"]] == [m for d in DCID_ROWS for m in (d, "m → m")]
    assert [r["method"] for r in tables["table2"]["rows"]] == ["DCID", "SRCID(only1)", "SRCID"]
    assert [r["method"] for r in tables["table3"]["rows"]] == ["DCID", "SRCID"]
    for name in ("table1", "table2", "table3"):
        assert all(r["avg"] is not None for r in tables[name]["rows"]), name
    points = data["figure3"]["codebook_size"]["points"]
    assert [p["size"] for p in points] == TINY_SIZES and all(p["avg"] is not None for p in points)
    bars = {b["setting"]: b for b in data["figure3"]["club"]["bars"]}
    assert bars["CLUB in both layers"]["cell"] == "srcid" and bars["CLUB in both layers"]["avg"] is not None
    assert [b["cell"] for b in bars.values()] == ["srcid", "srcid-no-club-l1", "srcid-no-club-l2"]
    assert all(b["avg"] is not None for b in bars.values())
    assert [m["method"] for m in data["cross_modal_average"]] == DCID_ROWS + ["SRCID(only1)", "SRCID"]


def _reference_average(eval_json: Path) -> float:
    """Table II's average recomputed from an evaluation's per-seed numbers (float64, one seed)."""
    results = json.loads(eval_json.read_text())["results"]
    cells = [results[task]["experiments"][direction]["metrics"][metric]["values"][0]
             for task, metric in TABLE_METRIC.items() for direction in ("V->A", "A->V")]
    return float(np.mean(np.array(cells, dtype=np.float64)))


def test_table_numbers_come_from_the_cells_evaluations(full):
    data = results_of(full)
    cells = full / "cells"
    table2 = data["tables"]["table2"]
    assert math.isclose(row(table2, "SRCID")["avg"]["mean"], _reference_average(cells / "srcid" / "eval-layers1-2.json"))
    assert math.isclose(row(table2, "SRCID(only1)")["avg"]["mean"], _reference_average(cells / "srcid" / "eval-layers1.json"))
    assert math.isclose(row(table2, "DCID")["avg"]["mean"], _reference_average(cells / "dcid-vq" / "eval-layers1.json"))
    table1 = data["tables"]["table1"]
    for label, cell in zip(DCID_ROWS, ["dcid-vq", "dcid-fsq", "dcid-rvq2", "dcid-rvq3", "dcid-rvq4"]):
        assert math.isclose(row(table1, label)["avg"]["mean"], _reference_average(cells / cell / "eval-layers1.json"))
    for point in data["figure3"]["codebook_size"]["points"]:
        name = "srcid" if point["size"] == 32 else f"srcid-codebook-{point['size']}"
        assert point["cell"] == name
        assert math.isclose(point["avg"]["mean"], _reference_average(cells / name / "eval-layers1-2.json"))
    retrieval = json.loads((cells / "srcid" / "eval-layers1-2.json").read_text())["results"]["retrieval"]
    srcid3 = row(data["tables"]["table3"], "SRCID")
    assert math.isclose(srcid3["cells"]["audio-text/R@5"]["mean"], retrieval["audio-text"]["mean"]["R@5"])


def test_collapse_table_follows_the_inspect_json(full):
    text = (full / "tables.md").read_text()
    stats = json.loads((full / "cells" / "srcid" / "inspect.json").read_text())["stats"]
    layer2 = {s["modality"]: s for s in stats if s["layer"] == 2}
    live = " / ".join(f"{layer2[m]['specific_live_dims']}/{layer2[m]['specific_dim']}" for m in ("audio", "video", "text"))
    codes = " / ".join(str(layer2[m]["distinct_codes"]) for m in ("audio", "video", "text"))
    dead = " / ".join(f"{100 * layer2[m]['dead_unit_fraction']:.0f}%" for m in ("audio", "video", "text"))
    recon = " / ".join("-" if layer2[m]["recon_relative"] is None else f"{layer2[m]['recon_relative']:.2f}"
                       for m in ("audio", "video", "text"))
    read = " / ".join("-" if layer2[m]["class_from_codes"] is None else f"{100 * layer2[m]['class_from_codes']:.0f}%"
                      for m in ("audio", "video", "text"))
    kinds = {}
    for m in ("audio", "video", "text"):
        for flag in layer2[m]["flags"]:
            kinds.setdefault(flag, []).append(m)
    flagged = "; ".join(f"{flag}: {', '.join(found)}" for flag, found in kinds.items()) or "-"
    assert f"| srcid | 2 | {codes} | {live} | {dead} | {recon} | {read} | {flagged} |" in text
    assert all(s["classes"] >= 2 and 0.0 <= s["class_from_codes"] <= 1.0 for s in stats)  # pretraining clips: labelled
    assert all(s["collapsed_codebook"] == (s["distinct_codes"] <= 2) for s in stats)
    assert (full / "cells" / "srcid" / "inspect-codes.png").is_file()  # the code-usage plot beside the JSON
    assert "| dcid-vq | 1 |" in text and "| dcid-vq | 2 |" not in text


def test_collapse_table_reads_older_and_flagged_inspect_json():
    from types import SimpleNamespace

    from srcid.study.report import collapse_table

    def stat(m, **extra):
        return dict({"layer": 1, "modality": m, "distinct_codes": 5, "specific_live_dims": 3, "specific_dim": 8,
                     "recon_relative": 0.5, "collapsed": False}, **extra)

    old = {"clips": 40, "live_std": 0.01, "stats": [stat("audio"), stat("video", collapsed=True)]}
    new = {"clips": 40, "live_std": None, "live_rel": 0.01, "collapse_codes": 2, "stats": [
        stat("audio", distinct_codes=1, dead_unit_fraction=0.25, class_from_codes=0.125, flags=["collapsed codebook"]),
        stat("video", specific_live_dims=0, dead_unit_fraction=None, flags=["collapsed codebook", "dead y"])]}
    cells = {name: SimpleNamespace(cell=SimpleNamespace(name=name), inspection=data)
             for name, data in (("new", new), ("old", old))}
    text = "\n".join(collapse_table(cells))
    assert "0.01 times the spread" in text and "at most 2 distinct codes" in text
    assert ("| new | 1 | 1 / 5 | 3/8 / 0/8 | 25% / - | 0.50 / 0.50 | 12% / - | collapsed codebook: audio, video; "
            "dead y: video |") in text
    assert "| old | 1 | 5 / 5 | 3/8 / 3/8 | - / - | 0.50 / 0.50 | - / - | dead y: video |" in text


def test_mi_curves_follow_metrics_csv_and_the_switch_event(full):
    curves = results_of(full)["mi_curves"]
    run = full / "cells" / "srcid" / "run"
    with open(run / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for layer in ("L1", "L2"):
        columns = [c for c in rows[0] if c.startswith(f"{layer}/mi/")]
        assert len(columns) == 3
        reference = [sum(float(r[c]) for c in columns) / 3 for r in rows]
        assert curves["layers"][layer]["steps"] == [int(r["step"]) for r in rows] == list(range(1, 9))
        np.testing.assert_allclose(curves["layers"][layer]["mi"], reference, rtol=1e-12)
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    switch = next(e for e in events if e["name"] == "warm_start_switch")
    assert curves["switch"]["step"] == switch["step"]
    assert f"switched on at step {switch['step']}" in (full / "tables.md").read_text()


def test_plots_exist_and_are_not_blank(full):
    from matplotlib.image import imread

    for name in PLOTS:
        path = full / name
        assert path.stat().st_size > 8000, name
        image = imread(path)
        assert image.shape[0] >= 300 and image.shape[1] >= 400
        gray = image[..., :3].mean(axis=-1)
        assert (gray < 0.5).mean() > 0.002, f"{name} is nearly blank"
        assert len(np.unique(image[..., :3].reshape(-1, 3), axis=0)) > 20, name


def test_second_invocation_skips_finished_cells(full):
    before = results_of(full)["tables"]
    # An incomplete evaluation JSON makes its cell evaluate again; everything else is skipped.
    damaged = full / "cells" / "dcid-rvq3" / "eval-layers1.json"
    data = json.loads(damaged.read_text())
    del data["results"]["retrieval"]
    damaged.write_text(json.dumps(data))
    # A missing collapse check is run again on its own.
    (full / "cells" / "dcid-fsq" / "inspect.json").unlink()
    start = time.perf_counter()
    result = study("--preset", "tiny", "--out", full)
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    skipped = [line for line in lines if line.endswith("finished earlier, skipped")]
    assert len(skipped) == len(results_of(full)["cells"]) - 2
    assert any("dcid-rvq3: evaluating with layers 1" in line for line in lines)
    assert any("dcid-fsq: checking for collapse" in line for line in lines)
    assert not any("dcid-fsq: evaluating" in line for line in lines)
    assert (full / "cells" / "dcid-fsq" / "inspect.json").is_file()
    assert not any(": training " in line or ": resuming " in line for line in lines)
    assert elapsed < 60
    assert "retrieval" in json.loads(damaged.read_text())["results"]
    after = results_of(full)["tables"]
    assert row(after["table2"], "SRCID") == row(before["table2"], "SRCID")


# --------------------------------------------------------------------------- --only, resume, failures


def test_only_a_subset_with_a_resumed_and_a_failing_cell(full, tmp_path):
    out = tmp_path / "subset"
    data = full / "data"
    # dcid-vq cannot create its run directory: its training fails, the next cell still runs.
    (out / "cells" / "dcid-vq").mkdir(parents=True)
    (out / "cells" / "dcid-vq" / "run").write_text("in the way")
    # dcid-fsq was interrupted after 3 of its 8 steps: it is resumed from the checkpoint.
    fsq_run = out / "cells" / "dcid-fsq" / "run"
    pre = subprocess.run(
        [sys.executable, "-m", TRAINER_MODULE, "--model", "dcid-fsq", "--preset", "tiny",
         "--data", str(data / "pretrain"), "--out", str(fsq_run), "--epochs", "4", "--quiet", "--max-steps", "3",
         "--set", "batch_size=80", "--set", "log_every=1"],
        env=ENV, capture_output=True, text=True, timeout=300)
    assert pre.returncode == 0, pre.stderr[-3000:]
    result = study("--preset", "tiny", "--data", data, "--out", out, "--only", "dcid-(vq|fsq)")
    assert result.returncode != 0
    error = result.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("srcid: error: 1 of 2 cells failed: dcid-vq (training")
    assert "dcid-fsq" not in error[0]
    assert "[2/2] dcid-fsq: resuming DCID(FSQ) (8 steps)" in result.stdout
    assert "[2/2] dcid-fsq: done in" in result.stdout
    with open(fsq_run / "metrics.csv", newline="") as handle:
        assert [int(r["step"]) for r in csv.DictReader(handle)] == list(range(1, 9))
    assert "--resume" in (out / "cells" / "dcid-fsq" / "train.log").read_text()
    data_json = results_of(out)
    statuses = {name: cell["status"] for name, cell in data_json["cells"].items()}
    assert statuses["dcid-fsq"] == "finished" and statuses["dcid-vq"] == "failed"
    assert data_json["failed"] == ["dcid-vq"]
    assert {s for n, s in statuses.items() if n not in ("dcid-fsq", "dcid-vq")} == {"not run"}
    assert not (out / "cells" / "srcid").exists()
    assert row(data_json["tables"]["table1"], "DCID(FSQ)")["avg"] is not None
    assert row(data_json["tables"]["table1"], "DCID(VQ)")["avg"] is None
    assert "| DCID(VQ) | - | - |" in (out / "tables.md").read_text()
    for name in PLOTS:
        assert (out / name).stat().st_size > 5000


def test_training_seeds_repeat_cells_and_the_tables_pool_them(full, tmp_path):
    out = tmp_path / "seeds"
    result = study("--preset", "tiny", "--data", full / "data", "--out", out, "--only", "dcid-vq", "--train-seeds", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[2/2] dcid-vq-seed1: training DCID(VQ)" in result.stdout
    log = (out / "cells" / "dcid-vq-seed1" / "train.log").read_text()
    assert "--set seed=1 --set model.seed=1" in log.splitlines()[0]
    assert "--set seed=" not in (out / "cells" / "dcid-vq" / "train.log").read_text().splitlines()[0]
    data = results_of(out)
    assert data["train_seeds"] == [43, 1] and data["command"].endswith("--train-seeds 2")
    assert data["cells"]["dcid-vq-seed1"]["train_seed"] == 1 and data["cells"]["dcid-vq-seed1"]["group"] == "dcid-vq"
    dcid = row(data["tables"]["table1"], "DCID(VQ)")
    assert all(cell["n"] == 2 for cell in dcid["cells"].values())  # 2 training seeds x 1 head seed
    runs = [_reference_average(out / "cells" / name / "eval-layers1.json") for name in ("dcid-vq", "dcid-vq-seed1")]
    assert math.isclose(dcid["avg"]["mean"], sum(runs) / 2)
    assert math.isclose(dcid["avg"]["std"], abs(runs[0] - runs[1]) / math.sqrt(2))
    assert row(data["tables"]["table3"], "DCID")["avg"] is not None
    assert "Training seeds: 43, 1" in (out / "tables.md").read_text()


def test_set_items_reach_every_cell_and_a_change_is_refused(full, tmp_path):
    out = tmp_path / "authors"
    result = study("--preset", "tiny", "--data", full / "data", "--out", out, "--only", "dcid-vq", "--max-steps", "2",
                   "--set", "profile=authors")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_config = json.loads((out / "cells" / "dcid-vq" / "run" / "run_config.json").read_text())
    assert run_config["profile"] == "authors" and run_config["model"]["video_specific"] == "head"
    assert run_config["warm_start"]["mode"] == "epoch"
    assert results_of(out)["command"].endswith("--set profile=authors")
    again = study("--preset", "tiny", "--data", full / "data", "--out", out, "--only", "dcid-vq", "--max-steps", "2")
    error = again.stderr.strip().splitlines()
    assert again.returncode != 0 and len(error) == 1
    assert "cells trained with other settings: dcid-vq (overrides)" in error[0]


def test_corrupt_data_fails_the_cell_and_names_it(full, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(full / "data", data)
    (data / "pretrain" / "train-000001.tar").write_bytes(np.random.default_rng(0).bytes(5000))
    result = study("--preset", "tiny", "--data", data, "--out", tmp_path / "bad", "--only", "dcid-vq")
    assert result.returncode != 0
    error = result.stderr.strip().splitlines()
    assert len(error) == 1
    assert "dcid-vq (training exited with status" in error[0] and "train-000001.tar" in error[0]
    assert "[1/1] dcid-vq: FAILED" in result.stdout
    failure = results_of(tmp_path / "bad")["cells"]["dcid-vq"]["failure"]
    assert failure["stage"] == "training" and Path(failure["log"]).is_file()


# --------------------------------------------------------------------------- bad input


@pytest.fixture
def cli(capsys):
    def run(*argv):
        code = srcid.cli.main([str(a) for a in argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err
    return run


def test_unknown_preset_is_one_line(cli, tmp_path):
    code, _, err = cli("study", "--preset", "huge", "--out", tmp_path / "s")
    assert code != 0 and err.strip().splitlines() == ["srcid: error: --preset 'huge': choose one of tiny, small, paper"]
    assert not (tmp_path / "s").exists()


def test_only_matching_nothing_is_one_line(cli, full, tmp_path):
    code, _, err = cli("study", "--preset", "tiny", "--data", full / "data", "--out", tmp_path / "s", "--only", "nothing*")
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and "--only 'nothing*' matches no cell" in lines[0] and "dcid-rvq2" in lines[0]
    assert not (tmp_path / "s").exists()


def test_data_without_task_folders_is_one_line(cli, full, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(full / "data" / "pretrain", data / "pretrain")
    code, _, err = cli("study", "--preset", "tiny", "--data", data, "--out", tmp_path / "s")
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1
    assert "missing ave/, avvp/, ave_avvp/, ucf_vgg/, retrieval/" in lines[0] and str(data) in lines[0]
    code, _, err = cli("study", "--preset", "tiny", "--data", tmp_path / "nowhere", "--out", tmp_path / "s")
    assert code != 0 and len(err.strip().splitlines()) == 1 and "no such folder" in err


@pytest.mark.parametrize("flags, message", [
    (["--processes", "3"], "--processes 3: the global batch of 80 clips does not split evenly over the processes"),
    (["--seeds", "0"], "--seeds 0: must be at least 1"),
    (["--train-seeds", "0"], "--train-seeds 0: must be at least 1"),
    (["--max-steps", "0"], "--max-steps 0: must be at least 1"),
])
def test_bad_numbers_are_one_line(cli, full, tmp_path, flags, message):
    code, _, err = cli("study", "--preset", "tiny", "--data", full / "data", "--out", tmp_path / "s", *flags)
    assert code != 0 and err.strip().splitlines() == [f"srcid: error: {message}"]


@pytest.mark.parametrize("item, message", [
    ("model.nope=1", "model.nope"),
    ("model.text_target=bert", "text_target='bert': choose one of lstm, features"),
    ("profile=nobody", "profile=nobody: choose one of default, authors"),
    ("seed=3", "--set seed=3: seed is set by the study (--train-seeds), not by --set"),
    ("batch_size=8", "batch_size is set by the study (--processes)"),
    ("profile", "--set 'profile': expected KEY=VALUE"),
    ("warm_start.mi_layer2_weight=0.3", "--set: config key warm_start.mi_layer2_weight: renamed to "
                                         "warm_start.layer2_loss_weight"),
])
def test_bad_set_items_are_one_line_before_anything_is_written(cli, tmp_path, item, message):
    code, _, err = cli("study", "--preset", "tiny", "--out", tmp_path / "s", "--set", item)
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "s").exists()


def test_out_that_is_a_file_is_one_line(cli, tmp_path):
    (tmp_path / "f").write_text("x")
    code, _, err = cli("study", "--preset", "tiny", "--out", tmp_path / "f")
    assert code != 0 and err.strip().splitlines() == [f"srcid: error: --out {tmp_path / 'f'}: is a file; name a folder for the study"]


# --------------------------------------------------------------------------- grid and helpers


def test_grid_per_preset_and_club_cells():
    for preset, size in (("tiny", 32), ("small", 128), ("paper", 400)):
        assert preset_codebook_size(preset) == size
        sizes = codebook_sizes(PLANS[preset], size)
        assert size in sizes and len(sizes) >= (5 if preset != "tiny" else 3)
    assert codebook_sizes(PLANS["paper"], 400) == (100, 200, 300, 400, 500, 600, 800)
    with_keys = {c.name: c for c in build_grid(PLANS["small"])}  # the small preset's codebook size: 128
    assert with_keys["srcid-no-club-l1"].overrides == ("model.weights.mi_layer1=0",)
    assert with_keys["srcid-no-club-l2"].overrides == ("model.weights.mi_layer2=0",)
    assert with_keys["srcid-codebook-32"].overrides == ("model.quantizer.codebook_size=32",)
    assert "srcid-codebook-128" not in with_keys and with_keys["srcid"].layers == ("1,2", "1")
    assert len(with_keys) == 12


def test_training_seed_repeats_of_the_grid():
    assert train_seed_list(1) == [43] and train_seed_list(3) == [43, 1, 2]
    grid = build_grid(PLANS["small"])
    cells = with_train_seeds(grid, train_seed_list(3))
    names = [c.name for c in cells]
    assert names[:4] == ["srcid", "srcid-seed1", "srcid-seed2", "dcid-vq"]
    assert "srcid-no-club-l1-seed2" in names
    assert len(cells) == 3 * 12
    repeat = cells[2]
    assert (repeat.train_seed, repeat.base, repeat.group) == (2, "srcid", "srcid")
    assert repeat.overrides == ("seed=2", "model.seed=2") and repeat.layers == ("1,2", "1")
    sized = next(c for c in cells if c.name == "srcid-codebook-64-seed1")
    assert sized.overrides == ("model.quantizer.codebook_size=64", "seed=1", "model.seed=1")
    assert cells[0].group == "srcid" and cells[0].train_seed == 43
    # --only matches a repeat through the name of the cell it repeats
    assert [c.name for c in select(cells, ["^srcid$"])] == ["srcid", "srcid-seed1", "srcid-seed2"]
    assert [c.name for c in select(cells, ["seed2$"])][:2] == ["srcid-seed2", "dcid-vq-seed2"]


def test_pooling_over_training_seeds_uses_the_runs_that_finished():
    from types import SimpleNamespace

    from srcid.study.report import GroupResults

    def run(name, parts, status="finished"):
        return SimpleNamespace(cell=SimpleNamespace(name=name), status=status, parts=lambda layers: parts)

    first = run("c", ({"ave": {"V->A": {"values": [1.0, 2.0]}, "A->V": {"values": [3.0, 4.0]}}},
                      {"ave": {"V->V": {"values": [7.0, 8.0]}}}, {"video-text": {"R@1": 10.0, "R@5": 20.0}}))
    second = run("c-seed1", ({"ave": {"V->A": {"values": [5.0, 6.0]}}}, {}, None))
    missing = run("c-seed2", ({}, {}, None), status="not run")
    cross, same, retrieval = GroupResults([first, second, missing]).parts("1")
    assert cross == {"ave": {"V->A": {"values": [1.0, 2.0, 5.0, 6.0]}, "A->V": {"values": [3.0, 4.0]}}}
    assert same == {"ave": {"V->V": {"values": [7.0, 8.0]}}}
    assert retrieval == {"video-text": {"R@1": {"values": [10.0]}, "R@5": {"values": [20.0]}}}
    assert GroupResults([first, second, missing]).finished_runs() == ["c", "c-seed1"]
    assert GroupResults([first, second, missing]).status == "not run"
    assert GroupResults([first]).parts("1") == first.parts("1")


def test_only_patterns_glob_and_regex():
    cells = build_grid(PLANS["tiny"])
    names = lambda *patterns: [c.name for c in select(cells, patterns)]
    assert names("dcid-rvq*") == ["dcid-rvq2", "dcid-rvq3", "dcid-rvq4"]
    assert names("rvq[23]") == ["dcid-rvq2", "dcid-rvq3"]
    assert names("^srcid$", "dcid-vq") == ["srcid", "dcid-vq"]
    assert names() == [c.name for c in cells]
    assert matches("srcid-codebook-16", "codebook") and not matches("srcid", "codebook")
    with pytest.raises(SrcidError, match="matches no cell"):
        select(cells, ["srcid", "nothing-here"])


def test_error_line_and_incomplete_evaluations(tmp_path):
    log = tmp_path / "log"
    log.write_text("warming up\nsrcid: error: shard x.tar: bad\nTraceback\n")
    assert error_line(log) == "shard x.tar: bad"
    log.write_text("Traceback (most recent call last):\n  ...\nRuntimeError: boom\n\n")
    assert error_line(log) == "RuntimeError: boom"
    path = tmp_path / "eval.json"
    path.write_text("{not json")
    assert read_eval(path, {}) is None
    path.write_text(json.dumps({"command": "eval", "protocol": "default", "tasks_run": ["ave"], "results": {"ave": {}},
                                "tables": {}, "method": "SRCID"}))
    assert read_eval(path, {}) is None


def test_commands_for_several_processes_and_kernels(tmp_path):
    from srcid.study.cells import Settings, train_spec
    from srcid.study.runner import eval_command, inspect_command, train_command

    settings = Settings(plan=PLANS["small"], out=tmp_path, data=tmp_path / "data", seeds=2, max_steps=None,
                        processes=4, kernels="reference", command="srcid study")
    cell = {c.name: c for c in build_grid(PLANS["small"])}["srcid-codebook-64"]
    command = train_command(cell, settings, tmp_path / "run", resume=True)
    assert Path(command[0]).name == "deepspeed" and command[1:3] == ["--num_gpus", "4"]
    assert command[5:7] == ["--module", TRAINER_MODULE]  # the installed trainer: no checkout needed
    joined = " ".join(command)
    assert "--model srcid --preset small" in joined and f"--data {tmp_path / 'data' / 'pretrain'}" in joined
    assert "--epochs 20" in joined and "--max-steps" not in joined and joined.endswith("--kernels reference --resume")
    sets = [command[i + 1] for i, word in enumerate(command) if word == "--set"]
    assert sets == ["batch_size=20", "log_every=10", "model.quantizer.codebook_size=64"]
    # --set items reach every cell's training, before the cell's own, and are part of what decides the model
    profiled = dataclasses.replace(settings, overrides=["profile=authors", "model.quantizer.codebook_size=16"])
    command = train_command(cell, profiled, tmp_path / "run", resume=False)
    sets = [command[i + 1] for i, word in enumerate(command) if word == "--set"]
    assert sets == ["batch_size=20", "log_every=10", "profile=authors", "model.quantizer.codebook_size=16",
                    "model.quantizer.codebook_size=64"]
    assert train_spec(cell, profiled) != train_spec(cell, settings)
    evaluation = eval_command(settings, tmp_path / "run", "1,2", tmp_path / "e.json")
    assert evaluation[:4] == [sys.executable, "-m", "srcid.cli", "eval"]
    assert " ".join(evaluation[4:]) == (f"--run {tmp_path / 'run'} --data {tmp_path / 'data'} --task all --layers 1,2 "
                                        f"--seeds 2 --epochs-cls 30 --epochs-loc 50 --out {tmp_path / 'e.json'} "
                                        "--overwrite --kernels reference")
    check = inspect_command(settings, tmp_path / "run", tmp_path / "i.json")
    assert " ".join(check[3:]) == (f"inspect --run {tmp_path / 'run'} --data {tmp_path / 'data' / 'pretrain'} "
                                   f"--json {tmp_path / 'i.json'} --overwrite --kernels reference")
