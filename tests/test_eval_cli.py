"""``srcid eval``, ``srcid encode`` and ``srcid inspect`` end to end: a briefly trained tiny model on synthetic data, and bad input."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import srcid.cli
from helpers_model import TINY_SHAPES, tiny_model
from helpers_training import train_for_steps
from srcid.data.manifest import load_manifest
from srcid.data.reader import ShardLoader
from srcid.data.shards import DatasetWriter
from srcid.eval.features import CODES_INFO, scan_split
from srcid.model import build_model_from_manifest, model_config
from srcid.model.export import export_model, load_model

REPO = Path(__file__).resolve().parents[1]
RUN_CLI = "import sys, srcid.cli as c\nsys.exit(c.main())"
TRAIN_STEPS = 30


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(synth_dir, tmp_path_factory):
    """A tiny SRCID model trained for 30 steps on synthetic ``pretrain`` and exported into a run directory."""
    run = tmp_path_factory.mktemp("run")
    loader = ShardLoader(synth_dir / "pretrain", "train", batch_size=32, seed=0)
    torch.manual_seed(0)
    config = model_config("tiny")
    model = build_model_from_manifest("srcid", config, loader.manifest)
    step = train_for_steps(model, loader, TRAIN_STEPS, layer2_weight=1.0)
    export_model(model, variant="srcid", config=config, input_shapes=model.input_shapes, path=run / "model.safetensors",
                 extra={"run_dir": str(run), "step": step})
    return run


@pytest.fixture
def cli():
    """``srcid ...`` in this process."""
    return lambda *argv: srcid.cli.main([str(a) for a in argv])


def numbers_in(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from numbers_in(v)
    elif isinstance(value, list):
        for v in value:
            yield from numbers_in(v)
    elif isinstance(value, float):
        yield value


def test_eval_all_tasks(run_dir, synth_dir, cli, capsys):
    assert cli("eval", "--run", run_dir, "--data", synth_dir, "--task", "all", "--seeds", "1",
               "--epochs-cls", "3", "--epochs-loc", "3", "--device", "cpu") == 0
    out = capsys.readouterr().out
    report = json.loads((run_dir / "eval-default-layers1-2.json").read_text())
    assert f"wrote {run_dir / 'eval-default-layers1-2.json'}" in out
    assert "protocol default" in out and f"step {TRAIN_STEPS}" in out
    for title in ("Table II", "Table I:", "Table III"):
        assert title in out
    assert "| SRCID |" in out and "| m → m |" in out
    assert report["protocol"] == "default" and report["layers"] == [1, 2] and report["feature_dim"] == 32
    assert report["seeds"] == [43] and report["method"] == "SRCID"
    assert report["model"]["path"] == str(run_dir / "model.safetensors") and report["model"]["step"] == TRAIN_STEPS
    assert report["markdown"] in out

    tables = report["tables"]
    cross = tables["table2"]["rows"][0]
    assert len(cross["cells"]) == 8 and all(c is not None for c in cross["cells"].values()) and cross["avg"] is not None
    same = tables["table1"]["rows"][1]
    assert same["kind"] == "same-modality"
    present = [k for k, c in same["cells"].items() if c is not None]
    assert present == ["ave/V->A", "ave/A->V", "avvp/V->A", "avvp/A->V", "ucf-vgg/V->A", "ucf-vgg/A->V"]
    retrieval = tables["table3"]["rows"][0]
    assert len(retrieval["cells"]) == 6 and all(c is not None for c in retrieval["cells"].values())

    results = report["results"]
    assert set(results) == {"ave", "avvp", "ave-avvp", "ucf-vgg", "retrieval"}
    for task, directions in (("ave", 4), ("avvp", 4), ("ave-avvp", 2), ("ucf-vgg", 4)):
        experiments = results[task]["experiments"]
        assert len(experiments) == directions
        for direction, result in experiments.items():
            assert result["seeds"] == [43] and result["keep"] == "last" and result["selected_epochs"] == [3]
            assert result["metrics"][results[task]["metric"]]["n"] == 1
            train_mod, test_mod = ({"V": "video", "A": "audio"}[direction[0]], {"V": "video", "A": "audio"}[direction[-1]])
            assert result["train"]["modality"] == train_mod and result["test"]["modality"] == test_mod
    ucf = results["ucf-vgg"]["experiments"]
    assert (ucf["V->A"]["train"]["split"], ucf["V->A"]["test"]["split"]) == ("ucf_train", "vgg_test")
    assert (ucf["A->V"]["train"]["split"], ucf["A->V"]["test"]["split"]) == ("vgg_train", "ucf_test")
    assert results["ave"]["experiments"]["V->A"]["test"]["split"] == "test"
    assert results["ave-avvp"]["experiments"]["V->A"]["excluded_classes"] == [4]  # the background column
    for name in ("video-text", "audio-text"):
        entry = results["retrieval"][name]
        assert entry["items"] == 100 and entry["captions"] == 100
        assert set(entry) >= {"mean", "T->V" if name == "video-text" else "T->A"}
    numbers = list(numbers_in({"results": results, "tables": tables}))
    assert numbers and all(0.0 <= v <= 100.0 for v in numbers if not math.isnan(v))
    for cell in list(cross["cells"].values()) + list(retrieval["cells"].values()):
        assert 0.0 <= cell["mean"] <= 100.0


def test_eval_authors_protocol_and_layer_1(run_dir, synth_dir, cli, capsys, tmp_path):
    out_file = tmp_path / "authors.json"
    assert cli("eval", "--run", run_dir / "model.safetensors", "--data", synth_dir, "--task", "ave", "--protocol", "authors",
               "--layers", "1", "--seeds", "2", "--epochs-cls", "2", "--out", out_file) == 0
    out = capsys.readouterr().out
    assert "protocol authors" in out and "SRCID(only1)" in out
    report = json.loads(out_file.read_text())
    assert report["protocol"] == "authors" and "best epoch" in report["protocol_description"]
    assert report["layers"] == [1] and report["feature_dim"] == 16 and report["seeds"] == [43, 44]
    experiments = report["results"]["ave"]["experiments"]
    assert experiments["V->A"]["test"]["split"] == "train" and experiments["A->V"]["test"]["split"] == "train"
    assert experiments["V->V"]["test"]["split"] == "test"
    assert "authors" in experiments["V->A"]["note"]
    for result in experiments.values():
        assert result["keep"] == "best" and all(1 <= e <= 2 for e in result["selected_epochs"])
        assert result["metrics"]["accuracy"]["std"] is not None
    assert list(report["results"]) == ["ave"]


def test_encode_writes_codes_and_keeps_meta(run_dir, synth_dir, cli, capsys, tmp_path):
    model, _ = load_model(run_dir / "model.safetensors")
    for name, splits in (("ucf_vgg", "ucf_test,vgg_test"), ("retrieval", None)):
        out = tmp_path / name
        argv = ["encode", "--run", run_dir, "--data", synth_dir / name, "--out", out]
        if splits:
            argv += ["--splits", splits]
        assert cli(*argv) == 0
        assert f"wrote {out / 'dataset.json'}" in capsys.readouterr().out
        source, codes = load_manifest(synth_dir / name), load_manifest(out)
        assert codes.classes == source.classes and "codes" in codes.tasks
        assert list(codes.splits) == (splits.split(",") if splits else list(source.splits))
        info = json.loads((out / CODES_INFO).read_text())
        assert info["columns"] == ["layer1", "layer2"] and info["layers"] == [1, 2]
        for split in codes.splits:
            original, written = scan_split(synth_dir / name, split, needed_by="test"), scan_split(out, split, needed_by="test")
            assert written.keys == original.keys and written.metas == original.metas
            assert written.carried == {k: tuple(m for m in c if m in codes.modalities) for k, c in original.carried.items()}
            for m in written.modalities():
                batch = next(iter(ShardLoader(synth_dir / name, split, batch_size=1000, shuffle=False, modalities=(m,)).epoch(0)))
                stored = next(iter(ShardLoader(out, split, batch_size=1000, shuffle=False, modalities=(m,)).epoch(0)))
                encoded = model.encode(batch.features[m], m, mask=batch.masks[m] if m == "text" else None, layers=(1, 2))
                expected = torch.stack([i.float() for i in encoded.indices], dim=-1)  # [B, T, layers]
                if m == "text":
                    lengths = batch.masks[m].sum(1).clamp(max=10)
                    assert torch.equal(stored.masks[m].sum(1), lengths)
                    stored_codes = stored.features[m]
                    expected = expected[:, : stored_codes.shape[1]] * stored.masks[m][..., None].float()  # valid steps only
                else:
                    stored_codes = stored.features[m]
                assert torch.equal(stored_codes, expected)
                assert stored_codes.max() < 32 and stored_codes.min() >= 0


# --------------------------------------------------------------------------- bad input, through the command line


def write_folder(folder, clips_by_split, *, modalities=("audio", "video"), classes=("c0", "c1", "c2"), shapes=None):
    """A small task folder: ``clips_by_split[split]`` lists ``(carried modalities, label, segment class or None)``."""
    shapes = dict(TINY_SHAPES, **(shapes or {}))
    rng = np.random.default_rng(0)
    with DatasetWriter(folder, name=Path(folder).name, modalities={m: (list(shapes[m]), "float32") for m in modalities},
                       classes=list(classes), tasks=["classification"]) as writer:
        for split, clips in clips_by_split.items():
            for i, (carried, label, segment) in enumerate(clips):
                features = {m: rng.standard_normal([6 if s is None else s for s in shapes[m]]).astype(np.float32)
                            for m in carried}
                meta = {"label": label}
                if segment is not None:
                    meta["segments"] = {m: [[segment]] * 10 for m in carried if m != "text"}
                writer.write(split, f"{split}-{i}", features, meta)


AV = ("audio", "video")


def ave_clips(n=4, label=1, segment=1):
    return [(AV, label, segment)] * n


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    paths = {}
    for variant in ("srcid", "dcid"):
        model = tiny_model(variant)
        paths[variant] = export_model(model, variant=variant, config=model.config, input_shapes=TINY_SHAPES,
                                      path=folder / variant / "model.safetensors", extra={"step": 0})
    return paths


def case_no_model(tmp):
    (tmp / "run").mkdir()
    write_folder(tmp / "data" / "ave", {"train": ave_clips(), "test": ave_clips()})
    return ["--run", tmp / "run", "--task", "ave"], ["no exported model in", "srcid export"]


def case_missing_folder(tmp):
    write_folder(tmp / "data" / "ave", {"train": ave_clips(), "test": ave_clips()})
    return ["--task", "avvp"], ["avvp", "missing task folder"]


def case_missing_modality(tmp):
    write_folder(tmp / "data" / "ave", {"train": [(("audio",), 1, None)] * 4, "test": [(("audio",), 1, None)] * 4},
                 modalities=("audio",))
    return ["--task", "ave"], ["ave/dataset.json", "declares no video", "split train"]


def case_missing_labels(tmp):
    write_folder(tmp / "data" / "ave", {"train": ave_clips(), "test": ave_clips(2) + ave_clips(2, label=None)})
    return ["--task", "ave"], ["ave", "split test", "2 of 4 clips have no clip label"]


def case_missing_segments(tmp):
    write_folder(tmp / "data" / "avvp", {"train": ave_clips(segment=None), "test": ave_clips()})
    return ["--task", "avvp"], ["avvp", "split train", "segments.video"]


def case_missing_split(tmp):
    write_folder(tmp / "data" / "ave", {"train": ave_clips()})
    return ["--task", "ave"], ["ave", "no split 'test'"]


def case_clips_without_the_modality(tmp):
    write_folder(tmp / "data" / "ucf_vgg", {"ucf_train": [(("audio",), 0, 0)] * 3, "ucf_test": [(("video",), 0, 0)] * 3,
                                            "vgg_train": [(("audio",), 0, 0)] * 3, "vgg_test": [(("audio",), 0, 0)] * 3})
    return ["--task", "ucf-vgg"], ["ucf_vgg", "split ucf_train", "3 of 3 clips carry no video"]


def case_ave_avvp_classes(tmp):
    write_folder(tmp / "data" / "ave_avvp", {"train": ave_clips(segment=1), "test": ave_clips(2, segment=1) + ave_clips(2, segment=2)})
    return ["--task", "ave-avvp"], ["ave_avvp", "shared classes", "only the test split uses 'c2'"]


def case_ucf_vgg_classes(tmp):
    ucf, vgg = [(("video",), 0, 0), (("video",), 1, 1)], [(("audio",), 0, 0), (("audio",), 2, 2)]
    write_folder(tmp / "data" / "ucf_vgg", {"ucf_train": ucf, "ucf_test": ucf, "vgg_train": vgg, "vgg_test": vgg})
    return ["--task", "ucf-vgg"], ["ucf_vgg", "class lists of the two sources differ", "'c1'", "'c2'"]


def case_retrieval_without_text(tmp):
    write_folder(tmp / "data" / "retrieval", {"test": ave_clips()})
    return ["--task", "retrieval"], ["retrieval/dataset.json", "no text"]


def case_shape_mismatch(tmp):
    write_folder(tmp / "data" / "ave", {"train": ave_clips(), "test": ave_clips()}, shapes={"audio": (10, 8)})
    return ["--task", "ave"], ["ave/dataset.json", "audio shape [10, 8]", "[10, 16]"]


def case_one_layer_model(tmp):
    write_folder(tmp / "data" / "ave", {"train": ave_clips(), "test": ave_clips()})
    return ["--task", "ave", "--layers", "1,2", "--model", "dcid"], ["dcid model has 1 layer", "--layers 1"]


CASES = [case_no_model, case_missing_folder, case_missing_modality, case_missing_labels, case_missing_segments,
         case_missing_split, case_clips_without_the_modality, case_ave_avvp_classes, case_ucf_vgg_classes,
         case_retrieval_without_text, case_shape_mismatch, case_one_layer_model]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.__name__[5:])
def test_bad_input_is_one_line(case, models, tmp_path):
    argv, needles = case(tmp_path)
    variant = "srcid"
    if "--model" in argv:
        variant = argv.pop(argv.index("--model") + 1)
        argv.remove("--model")
    if "--run" not in argv:
        argv += ["--run", models[variant]]
    argv += ["--data", tmp_path / "data", "--seeds", "1", "--epochs-cls", "1", "--epochs-loc", "1"]
    proc = subprocess.run([sys.executable, "-c", RUN_CLI, "eval", *map(str, argv)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert proc.stdout == ""


def test_encode_refuses_a_used_folder(run_dir, synth_dir, cli, capsys, tmp_path):
    (tmp_path / "old.txt").write_text("x")
    assert cli("encode", "--run", run_dir, "--data", synth_dir / "ave", "--out", tmp_path) != 0
    assert "not an empty folder" in capsys.readouterr().err
    assert cli("encode", "--run", run_dir, "--data", synth_dir / "ave", "--out", tmp_path / "new", "--splits", "dev") != 0
    assert "no split 'dev'" in capsys.readouterr().err


def test_inspect_reads_exactly_the_clips_asked_and_takes_a_data_dir(models, synth_dir, cli, capsys, tmp_path):
    """``--clips N`` reads the first N clips (a partial last batch included); ``--data DATA_DIR`` reads pretrain/."""
    base = ["inspect", "--run", models["srcid"], "--batch-size", "20", "--device", "cpu"]
    out = tmp_path / "i.json"
    assert cli(*base, "--data", synth_dir / "pretrain", "--clips", "50", "--json", out, "--plot", tmp_path / "i.png") == 0
    printed = capsys.readouterr().out
    assert f"50 clips of {synth_dir / 'pretrain'} split train\n" in printed and "reading its pretraining set" not in printed
    assert json.loads(out.read_text())["clips"] == 50
    assert cli(*base, "--data", synth_dir, "--clips", "7") == 0  # the root: pretrain/ is read, and said so
    printed = capsys.readouterr().out
    assert printed.startswith(f"srcid inspect: --data {synth_dir}: a DATA_DIR; reading its pretraining set "
                              f"{synth_dir / 'pretrain'}\n")
    assert f"7 clips of {synth_dir / 'pretrain'} split train\n" in printed
    assert cli(*base, "--data", synth_dir / "pretrain", "--split", "val", "--clips", "100") == 0  # val holds 32
    assert f"32 clips of {synth_dir / 'pretrain'} split val (--clips 100: the split holds 32)" in capsys.readouterr().out


def test_inspect_names_the_folder_it_expects(models, cli, capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    for data, state in ((tmp_path / "nowhere", "no such folder"), (tmp_path / "empty", "holds no dataset.json")):
        assert cli("inspect", "--run", models["srcid"], "--data", data, "--device", "cpu") == 2
        err = capsys.readouterr().err
        assert err == (f"srcid: error: --data {data}: {state}; expected a dataset folder holding dataset.json, or a "
                       "DATA_DIR holding pretrain/dataset.json\n")


def test_inspect_first_clips_cuts_the_last_batch_and_reads_no_further():
    from srcid.eval.commands import first_clips

    pulled = []

    class Rows(list):
        def rows(self, start, stop):
            return Rows(self[start:stop])

    def batches():
        for i in range(5):
            pulled.append(i)
            yield Rows(range(10 * i, 10 * i + 10))

    assert [len(b) for b in first_clips(batches(), 25)] == [10, 10, 5] and pulled == [0, 1, 2]
    pulled.clear()
    assert [len(b) for b in first_clips(batches(), 20)] == [10, 10] and pulled == [0, 1]
