"""The paper's tables: averaging rules, Markdown and JSON."""
import json

import numpy as np
import pytest

from srcid.errors import SrcidError
from srcid.eval.metrics import retrieval_report, summarize
from srcid.eval.tables import table1, table2, table3, to_markdown

TASKS = ("ave", "avvp", "ave-avvp", "ucf-vgg")

# The paper's own numbers (Tables I-III) and the averages it prints.
PAPER_TABLE2 = {
    "CODIS": ([36.8, 39.7, 46.7, 47.6, 37.8, 37.6, 50.8, 45.2], 42.78),
    "TURN": ([37.6, 39.2, 48.4, 50.2, 36.6, 38.4, 49.4, 46.1], 43.24),
    "CMCM": ([46.3, 45.8, 57.1, 58.2, 44.1, 45.2, 51.2, 48.3], 49.53),
    "DCID": ([54.1, 55.0, 63.4, 71.0, 53.0, 52.4, 67.1, 60.6], 59.58),
    "SRCID(only1)": ([49.4, 53.5, 60.4, 77.2, 53.4, 52.9, 70.6, 59.5], 59.61),
    "SRCID": ([49.2, 54.2, 72.1, 85.6, 54.8, 53.7, 69.1, 59.0], 62.21),
}
PAPER_TABLE1 = {
    "DCID(VQ)": ([54.1, 55.0, 63.4, 71.0, 53.0, 52.4, 67.1, 60.6], 59.58, [64.8, 65.8, 71.0, 72.9, 80.0, 85.4], 73.32),
    "DCID(FSQ)": ([45.2, 50.4, 48.1, 54.9, 51.4, 44.0, 67.1, 60.6], 52.71, [76.5, 78.2, 65.8, 72.1, 98.5, 92.2], 80.55),
    "DCID(RVQ-2)": ([49.3, 55.0, 58.4, 66.9, 57.4, 54.2, 68.9, 63.5], 59.20, None, None),
    "DCID(RVQ-3)": ([47.6, 53.2, 59.9, 67.2, 54.3, 53.0, 68.5, 62.4], 58.26, None, None),
    "DCID(RVQ-4)": ([48.5, 55.5, 58.7, 68.6, 56.3, 54.7, 69.4, 64.3], 59.50, [69.9, 70.3, 75.1, 75.6, 88.0, 90.8], 78.28),
}
PAPER_TABLE3 = {
    "CMCM": ([0.4, 3.8, 6.9], [1.62, 8.04, 14.87], 5.94),
    "DCID": ([0.5, 4.5, 7.8], [2.06, 9.00, 16.70], 6.76),
    "SRCID": ([0.9, 4.7, 8.3], [2.28, 9.54, 17.32], 7.17),
}
HALF_CENT = 0.005 + 1e-9  # the paper rounds to two decimals


def _cross(values):
    return {task: {"V->A": values[2 * i], "A->V": values[2 * i + 1]} for i, task in enumerate(TASKS)}


def _same(values):
    return {task: {"V->V": values[2 * i], "A->A": values[2 * i + 1]} for i, task in enumerate(("ave", "avvp", "ucf-vgg"))}


def _retrieval(vt, at):
    return {"video-text": dict(zip(("R@1", "R@5", "R@10"), vt)), "audio-text": dict(zip(("R@1", "R@5", "R@10"), at))}


def test_table2_reproduces_the_papers_averages():
    table = table2({method: _cross(values) for method, (values, _) in PAPER_TABLE2.items()})
    assert [row["method"] for row in table["rows"]] == list(PAPER_TABLE2)
    for row, (values, printed) in zip(table["rows"], PAPER_TABLE2.values()):
        assert abs(row["avg"]["mean"] - printed) <= HALF_CENT
        assert row["cells"]["avvp/A->V"]["mean"] == values[3]


def test_markdown_prints_the_papers_averages_exactly():
    text = to_markdown(table2({method: _cross(values) for method, (values, _) in PAPER_TABLE2.items()}))
    for method, (_, printed) in PAPER_TABLE2.items():
        line = next(line for line in text.splitlines() if line.startswith(f"| {method} |"))
        assert line.rstrip().endswith(f"| {printed:.2f} |"), line


def test_table1_reproduces_the_papers_averages_including_m_to_m_rows():
    results = {m: _cross(v[0]) for m, v in PAPER_TABLE1.items()}
    same = {m: _same(v[2]) for m, v in PAPER_TABLE1.items() if v[2] is not None}
    table = table1(results, same)
    expected = []
    for values, avg, same_values, same_avg in PAPER_TABLE1.values():
        expected.append(("cross-modal", avg))
        if same_values is not None:
            expected.append(("same-modality", same_avg))
    assert [row["kind"] for row in table["rows"]] == [kind for kind, _ in expected]
    for row, (_, printed) in zip(table["rows"], expected):
        assert abs(row["avg"]["mean"] - printed) <= HALF_CENT
    m_row = table["rows"][1]
    assert m_row["of"] == "DCID(VQ)"
    assert m_row["cells"]["ave/V->A"]["mean"] == 64.8 and m_row["cells"]["ucf-vgg/A->V"]["mean"] == 85.4
    assert m_row["cells"]["ave-avvp/V->A"] is None and m_row["cells"]["ave-avvp/A->V"] is None


def test_table3_reproduces_the_papers_averages():
    table = table3({m: _retrieval(vt, at) for m, (vt, at, _) in PAPER_TABLE3.items()})
    for row, (_, _, printed) in zip(table["rows"], PAPER_TABLE3.values()):
        assert abs(row["avg"]["mean"] - printed) <= HALF_CENT


def test_table3_accepts_a_whole_retrieval_report():
    rng = np.random.default_rng(0)
    sim = rng.normal(size=(12, 12))
    pairs = [(i, i) for i in range(12)]
    vt, at = retrieval_report(sim, pairs), retrieval_report(sim.T, pairs, names=("A", "T"))
    table = table3({"ours": {"video-text": vt, "audio-text": at}})
    cells = table["rows"][0]["cells"]
    assert cells["video-text/R@5"]["mean"] == pytest.approx(vt["mean"]["R@5"])
    assert cells["audio-text/R@10"]["mean"] == pytest.approx(at["mean"]["R@10"])


def test_markdown_has_every_column_and_dashes_for_missing_cells():
    partial = _cross(PAPER_TABLE2["SRCID"][0])
    del partial["ucf-vgg"]
    table = table2({"DCID": _cross(PAPER_TABLE2["DCID"][0]), "ours": partial})
    text = to_markdown(table)
    header = next(line for line in text.splitlines() if line.startswith("| Method"))
    for label in ("AVE V→A", "AVE A→V", "AVVP V→A", "AVVP A→V", "AVE→AVVP V→A", "AVE→AVVP A→V",
                  "UCF(v)↔VGG(a) V→A", "UCF(v)↔VGG(a) A→V", "Avg."):
        assert label in header
    assert header.count("|") == 11
    ours = next(line for line in text.splitlines() if line.startswith("| ours"))
    assert ours.split("|")[-4:-1] == [" - ", " - ", " - "]  # two UCF cells and the Avg.
    dcid = next(line for line in text.splitlines() if line.startswith("| DCID"))
    assert "| 54.10 |" in dcid and dcid.rstrip().endswith("| 59.58 |")

    text3 = to_markdown(table3({m: _retrieval(vt, at) for m, (vt, at, _) in PAPER_TABLE3.items()}))
    for label in ("MSCOCO (V↔T) R@1", "MSCOCO (V↔T) R@10", "Clotho (A↔T) R@5", "Avg."):
        assert label in text3
    assert "| 7.17 |" in text3


def test_seeds_give_mean_and_std_per_cell_and_for_the_average():
    rng = np.random.default_rng(1)
    seeds = [43, 44, 45]
    per_seed = rng.normal(60, 3, size=(3, 8))
    result = _cross([list(per_seed[:, c]) for c in range(8)])
    result["ave"]["V->A"] = summarize(per_seed[:, 0])  # a run_seeds summary works too
    result["ave"]["A->V"] = per_seed[:, 1]  # and so does an array
    table = table2({"ours": result}, seeds=seeds)
    row = table["rows"][0]
    assert row["cells"]["avvp/V->A"]["std"] == pytest.approx(float(np.std(per_seed[:, 2], ddof=1)))
    assert row["avg"]["mean"] == pytest.approx(float(per_seed.mean()))
    assert row["avg"]["std"] == pytest.approx(float(np.std(per_seed.mean(axis=1), ddof=1)))
    text = to_markdown(table)
    assert f"{per_seed[:, 2].mean():.2f} ± {np.std(per_seed[:, 2], ddof=1):.2f}" in text
    assert "43, 44, 45" in text
    assert json.loads(json.dumps(table)) == table
    assert table["seeds"] == seeds


def test_mean_only_cells_average_without_spread():
    result = {task: {"V->A": {"mean": 50.0, "std": 1.0}, "A->V": 60.0} for task in TASKS}
    row = table2({"ours": result})["rows"][0]
    assert row["avg"]["mean"] == pytest.approx(55.0) and row["avg"]["std"] is None
    assert row["cells"]["ave/V->A"]["std"] == 1.0


def test_json_round_trips_for_every_table():
    tables = [
        table1({m: _cross(v[0]) for m, v in PAPER_TABLE1.items()}, {"DCID(VQ)": _same(PAPER_TABLE1["DCID(VQ)"][2])}),
        table2({m: _cross(v) for m, (v, _) in PAPER_TABLE2.items()}),
        table3({m: _retrieval(vt, at) for m, (vt, at, _) in PAPER_TABLE3.items()}),
    ]
    for table in tables:
        assert json.loads(json.dumps(table)) == table


def test_bad_results_are_reported_clearly():
    with pytest.raises(SrcidError, match="unknown key 'avv'"):
        table2({"ours": {"avv": {"V->A": 1.0}}})
    with pytest.raises(SrcidError, match="unknown key 'V->V'"):
        table2({"ours": {"ave": {"V->V": 1.0}}})
    with pytest.raises(SrcidError, match="unknown key 'ave-avvp'"):
        table1({"ours": {}}, {"ours": {"ave-avvp": {"V->V": 1.0}}})
    with pytest.raises(SrcidError, match="2 values for 3 seeds"):
        table2({"ours": {"ave": {"V->A": [1.0, 2.0]}}}, seeds=[1, 2, 3])
    with pytest.raises(SrcidError, match="finite"):
        table2({"ours": {"ave": {"V->A": float("nan")}}})
    with pytest.raises(SrcidError, match="no cross-modal row"):
        table1({"a": {}}, {"b": {}})
    with pytest.raises(SrcidError, match="unknown key 'R@2'"):
        table3({"ours": {"video-text": {"R@2": 1.0}}})


# --------------------------------------------------------------------------- AVVP F1 beside the paper's columns


def test_avvp_f1_columns_follow_the_average_and_leave_it_unchanged():
    values, printed = PAPER_TABLE2["SRCID"]
    plain = table2({"SRCID": _cross(values)})
    with_f1 = table2({"SRCID": {**_cross(values), "avvp-f1": {"V->A": [40.0, 42.0], "A->V": 55.5}}})
    assert "extra_columns" not in plain and "extra_cells" not in plain["rows"][0]  # what the study report builds
    assert [c["key"] for c in with_f1["columns"]] == [c["key"] for c in plain["columns"]]
    assert [c["key"] for c in with_f1["extra_columns"]] == ["avvp-f1/V->A", "avvp-f1/A->V"]
    row = with_f1["rows"][0]
    assert row["cells"] == plain["rows"][0]["cells"] and row["avg"] == plain["rows"][0]["avg"]
    assert abs(row["avg"]["mean"] - printed) <= HALF_CENT
    assert row["extra_cells"]["avvp-f1/V->A"]["mean"] == 41.0 and row["extra_cells"]["avvp-f1/A->V"]["mean"] == 55.5
    text = to_markdown(with_f1)
    header = next(line for line in text.splitlines() if line.startswith("| Method"))
    assert header.rstrip().endswith("| Avg. | AVVP F1 V→A | AVVP F1 A→V |")
    line = next(line for line in text.splitlines() if line.startswith("| SRCID |"))
    assert line.rstrip().endswith(f"| {printed:.2f} | 41.00 ± 1.41 | 55.50 |")
    assert "AVVP F1: micro F1" in text and "not in Avg." in text
    assert "AVVP F1" not in to_markdown(plain)
    assert json.loads(json.dumps(with_f1)) == with_f1

    # a row without F1 (another method) shows dashes there
    two = table2({"DCID": _cross(PAPER_TABLE2["DCID"][0]), "SRCID": {**_cross(values), "avvp-f1": {"V->A": 1.0}}})
    assert two["rows"][0]["extra_cells"] == {"avvp-f1/V->A": None, "avvp-f1/A->V": None}
    dcid = next(line for line in to_markdown(two).splitlines() if line.startswith("| DCID |"))
    assert dcid.rstrip().endswith("| 59.58 | - | - |")


def test_table1_m_to_m_rows_carry_their_own_avvp_f1():
    values, avg, same_values, same_avg = PAPER_TABLE1["DCID(VQ)"]
    table = table1({"DCID(VQ)": {**_cross(values), "avvp-f1": {"V->A": 30.0, "A->V": 31.0}}},
                   {"DCID(VQ)": {**_same(same_values), "avvp-f1": {"V->V": 60.0, "A->A": 61.0}}})
    cross, same = table["rows"]
    assert abs(cross["avg"]["mean"] - avg) <= HALF_CENT and abs(same["avg"]["mean"] - same_avg) <= HALF_CENT
    assert [c["mean"] for c in cross["extra_cells"].values()] == [30.0, 31.0]
    assert [c["mean"] for c in same["extra_cells"].values()] == [60.0, 61.0]
    with pytest.raises(SrcidError, match="unknown key 'V->A'"):
        table1({"x": {}}, {"x": {"avvp-f1": {"V->A": 1.0}}})


def test_eval_result_tables_show_avvp_f1():
    from srcid.eval.tasks import result_tables

    def experiment(precision, f1):
        return {"metrics": {"precision": {"values": [precision]}, "recall": {"values": [1.0]}, "f1": {"values": [f1]}}}

    results = {"avvp": {"metric": "precision", "experiments": {
        "V->A": experiment(90.0, 10.0), "A->V": experiment(80.0, 20.0),
        "V->V": experiment(70.0, 30.0), "A->A": experiment(60.0, 40.0)}}}
    tables = result_tables("SRCID", results, [43])
    row2 = tables["table2"]["rows"][0]
    assert row2["cells"]["avvp/V->A"]["mean"] == 90.0 and row2["avg"] is None  # Avg. needs all eight paper cells
    assert [c["mean"] for c in row2["extra_cells"].values()] == [10.0, 20.0]
    same = tables["table1"]["rows"][1]
    assert [c["mean"] for c in same["extra_cells"].values()] == [30.0, 40.0]
