import csv
import json

import matplotlib.image
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from srcid.errors import SrcidError
from srcid.train.metrics_log import MetricsLogger, metric_group, plot_metrics, read_events, read_metrics


def csv_rows(run_dir):
    with open(run_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def logged(rng, n_rows):
    """Rows of scalars; layer-2 keys appear only from the middle on."""
    rows = []
    for i in range(n_rows):
        step = 10 * i
        row = {"loss/l1/recon_audio": rng.random(), "loss/l1/cpc": rng.random(), "mi/l1/audio": rng.normal(),
               "lr": 4e-4, "throughput/clips_per_s": 100 + rng.random()}
        if i >= n_rows // 2:
            row.update({"loss/l2/recon_audio": rng.random(), "mi/l2/audio": rng.normal()})
        rows.append((step, row))
    return rows


def test_csv_widens_when_keys_appear_and_reads_back(tmp_path):
    rng = np.random.default_rng(0)
    rows = logged(rng, 9)
    with MetricsLogger(tmp_path) as logger:
        for step, row in rows:
            logger.log(step, row)
    table = csv_rows(tmp_path)
    assert list(table[0]) == ["step", "loss/l1/recon_audio", "loss/l1/cpc", "mi/l1/audio", "lr",
                              "throughput/clips_per_s", "loss/l2/recon_audio", "mi/l2/audio"]
    assert len(table) == len(rows)
    for (step, row), line in zip(rows, table):
        assert int(line["step"]) == step
        for key in line:
            if key == "step":
                continue
            if key in row:
                assert float(line[key]) == row[key]  # exact round trip
            else:
                assert line[key] == ""
    series = read_metrics(tmp_path)
    steps, values = series["loss/l2/recon_audio"]
    assert steps.tolist() == [s for s, r in rows if "loss/l2/recon_audio" in r]
    assert values.tolist() == [r["loss/l2/recon_audio"] for _, r in rows if "loss/l2/recon_audio" in r]


def test_tensorboard_scalars_and_events(tmp_path):
    rng = np.random.default_rng(1)
    rows = logged(rng, 6)
    with MetricsLogger(tmp_path) as logger:
        for step, row in rows:
            logger.log(step, row)
        logger.event(30, "warm_start_switch", {"reason": "MI trigger", "smoothed_mi": 0.01})
    files = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1 and files[0].stat().st_size > 0
    accumulator = EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    scalars = accumulator.Scalars("mi/l1/audio")
    assert [e.step for e in scalars] == [s for s, _ in rows]
    assert np.allclose([e.value for e in scalars], [r["mi/l1/audio"] for _, r in rows], rtol=1e-6)
    assert "events/warm_start_switch/text_summary" in accumulator.Tags()["tensors"]
    events = read_events(tmp_path)
    assert [(e["step"], e["name"], e["info"]) for e in events] == [
        (30, "warm_start_switch", {"reason": "MI trigger", "smoothed_mi": 0.01})]
    assert json.loads((tmp_path / "events.jsonl").read_text().splitlines()[0])["name"] == "warm_start_switch"


def test_plot_has_one_panel_per_group_and_marks_events(tmp_path):
    rng = np.random.default_rng(2)
    with MetricsLogger(tmp_path) as logger:
        for step, row in logged(rng, 12):
            logger.log(step, row)
        logger.event(60, "warm_start_switch", {"reason": "fallback"})
    path = plot_metrics(tmp_path)
    assert path == tmp_path / "metrics.png"
    image = matplotlib.image.imread(path)
    # 6 groups: loss/l1, mi/l1, lr, throughput, loss/l2, mi/l2 -> 3 x 2 panels of 440 x 300 px
    assert image.shape[:2] == (600, 1320)
    assert image[..., :3].std() > 0.05
    assert len(np.unique(image[..., :3].reshape(-1, 3), axis=0)) > 50
    assert sorted({metric_group(k) for k in read_metrics(tmp_path)}) == sorted(
        ["loss/l1", "mi/l1", "lr", "throughput", "loss/l2", "mi/l2"])


def test_plot_works_with_a_single_row_and_any_keys(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        logger.log(0, {"anything": 1.5, "deep/nested/key/x": float("nan"), "deep/nested/key/y": 2.0})
    image = matplotlib.image.imread(plot_metrics(tmp_path))
    assert image.shape[:2] == (300, 880)
    assert image[..., :3].std() > 0.05


def test_resume_drops_rows_logged_after_the_checkpoint(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        for step in range(0, 100, 10):
            logger.log(step, {"loss": step / 10})
        logger.event(40, "checkpoint", {})
        logger.event(70, "checkpoint", {})
    with MetricsLogger(tmp_path, resume_step=50) as logger:
        logger.log(60, {"loss": -1.0, "new": 3.0})
    steps, values = read_metrics(tmp_path)["loss"]
    assert steps.tolist() == [0, 10, 20, 30, 40, 50, 60]
    assert values.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, -1.0]
    assert read_metrics(tmp_path)["new"][0].tolist() == [60]
    assert [e["step"] for e in read_events(tmp_path)] == [40]


def test_disabled_logger_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path / "run", enabled=False)
    logger.log(0, {"loss": 1.0})
    logger.event(0, "x", {})
    logger.close()
    assert not (tmp_path / "run").exists()


def test_bad_values_are_one_line_errors(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        with pytest.raises(SrcidError, match="'loss' at step 3 is not a number"):
            logger.log(3, {"loss": "high"})
        with pytest.raises(SrcidError, match="invalid key"):
            logger.log(3, {"step": 1.0})
        with pytest.raises(SrcidError, match="step"):
            logger.log(-1, {"loss": 1.0})
    with pytest.raises(SrcidError, match="no metrics file"):
        read_metrics(tmp_path / "elsewhere")
