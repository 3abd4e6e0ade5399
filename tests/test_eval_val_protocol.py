"""``srcid eval --protocol val``: heads fit on part of each train split and tested on its held-out rest, never a test split."""
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import srcid.cli
import srcid.eval.tasks as tasks_module
from helpers_model import TINY_SHAPES, tiny_model
from srcid.data.shards import DatasetWriter
from srcid.errors import SrcidError
from srcid.eval.features import FeatureEncoder, SplitFeatures, scan_split
from srcid.eval.tasks import (PROTOCOLS, TASKS, VAL_FIT, VAL_HELD_OUT, VAL_HELD_OUT_EVERY, EvalSettings, TaskData,
                              evaluate, prepare, result_tables, val_part)
from srcid.model.export import export_model

TEST_SPLITS = {"ave": ("test",), "avvp": ("test",), "ave_avvp": ("test",), "ucf_vgg": ("ucf_test", "vgg_test")}
TRAIN_SPLIT_OF = {"test": "train", "ucf_test": "ucf_train", "vgg_test": "vgg_train"}
AV_TASKS = ("ave", "avvp", "ave-avvp", "ucf-vgg")

pytestmark = pytest.mark.usefixtures("one_thread")


def settings(protocol="val"):
    return EvalSettings(protocol=protocol, seeds=[43], epochs_cls=1, epochs_loc=1)


@pytest.fixture(scope="module")
def encoder():
    return FeatureEncoder(tiny_model().eval(), (1, 2), batch_size=64)


@pytest.fixture(scope="module")
def no_test_data(synth_dir, tmp_path_factory):
    """The synthetic task folders without a single test shard, and without the retrieval folder (test data only)."""
    out = tmp_path_factory.mktemp("no-test") / "data"
    shutil.copytree(synth_dir, out)
    for folder, splits in TEST_SPLITS.items():
        for split in splits:
            shards = sorted((out / folder).glob(f"{split}-*.tar"))
            assert shards
            for shard in shards:
                shard.unlink()
    shutil.rmtree(out / "retrieval")
    return out


# --------------------------------------------------------------------------- the split of a split


def test_held_out_part_is_a_fixed_fifth_by_key():
    keys = [f"clip{i:05d}" for i in range(3000)]
    parts = [val_part(k) for k in keys]
    assert set(parts) == {VAL_FIT, VAL_HELD_OUT}
    assert parts == [val_part(k) for k in reversed(keys)][::-1]  # a function of the key alone
    for key, part in zip(keys, parts):
        held = int(hashlib.sha1(key.encode()).hexdigest(), 16) % VAL_HELD_OUT_EVERY == 0
        assert part == (VAL_HELD_OUT if held else VAL_FIT)
    assert 0.17 < parts.count(VAL_HELD_OUT) / len(keys) < 0.23
    assert "val" in PROTOCOLS and EvalSettings(protocol="val").validate().keep == "last"


def test_subset_selects_rows_of_every_field():
    n = 5
    features = SplitFeatures(
        folder=Path("f"), split="train", modality="audio", keys=[f"k{i}" for i in range(n)],
        x=torch.arange(n * 2 * 3, dtype=torch.float32).reshape(n, 2, 3), mask=torch.rand(n, 2) > 0.5,
        labels=torch.arange(n), segments=torch.rand(n, 2, 4), digests=[f"d{i}" for i in range(n)],
        metas=[{"i": i} for i in range(n)],
    )
    part = features.subset([3, 0], "held-out")
    assert part.keys == ["k3", "k0"] and part.digests == ["d3", "d0"] and part.metas == [{"i": 3}, {"i": 0}]
    for name in ("x", "mask", "labels", "segments"):
        assert torch.equal(getattr(part, name), getattr(features, name)[[3, 0]])
    assert part.describe() == {"dataset": "f", "split": "train", "modality": "audio", "clips": 2, "part": "held-out"}
    assert "part" not in features.describe() and len(features) == n  # the original is untouched
    bare = SplitFeatures(folder=Path("f"), split="s", modality="text", keys=["a", "b"], x=torch.zeros(2, 1, 1),
                         mask=torch.ones(2, 1, dtype=torch.bool), labels=torch.zeros(2), segments=None, digests=[],
                         metas=[{}, {}])
    assert bare.subset([1]).segments is None and bare.subset([1]).digests == [] and bare.subset([1]).part is None


# --------------------------------------------------------------------------- what val reads


def test_val_reads_only_train_splits_and_tests_on_held_out_clips(no_test_data, encoder, monkeypatch):
    scanned = []
    real_scan = tasks_module.scan_split

    def spy(folder, split, **kwargs):
        scanned.append((Path(folder).name, split))
        return real_scan(folder, split, **kwargs)

    monkeypatch.setattr(tasks_module, "scan_split", spy)
    data = TaskData(no_test_data, encoder, "val")
    for task in AV_TASKS:
        for probe in prepare(task, data, settings()):
            train, test = probe.train, probe.test
            assert train.modality == tasks_module.MODALITY[probe.direction[0]]
            assert test.modality == tasks_module.MODALITY[probe.direction[-1]]
            assert train.split in TRAIN_SPLIT_OF.values() and test.split in TRAIN_SPLIT_OF.values()
            assert train.part == VAL_FIT and test.part == VAL_HELD_OUT
            assert all(val_part(k) == VAL_FIT for k in train.keys)
            assert all(val_part(k) == VAL_HELD_OUT for k in test.keys)
            assert not set(train.keys) & set(test.keys)  # never tested on a clip whose other modality it trained on
            # the test part is every held-out clip of the train split standing in for the test split
            scan = scan_split(test.folder, test.split, needed_by="test")
            assert test.keys == [k for k in scan.keys if val_part(k) == VAL_HELD_OUT]
            train_scan = scan_split(train.folder, train.split, needed_by="test")
            assert train.keys == [k for k in train_scan.keys if val_part(k) == VAL_FIT]
            assert 0.1 < len(test) / len(scan) < 0.35
            assert probe.test_targets.shape[0] == len(test) and probe.train_targets.shape[0] == len(train)
            assert "--protocol val" in probe.note
            if task == "ucf-vgg" and probe.direction == "V->A":
                assert (train.split, test.split) == ("ucf_train", "vgg_train")
            if task == "ucf-vgg" and probe.direction == "A->V":
                assert (train.split, test.split) == ("vgg_train", "ucf_train")
    assert scanned and {split for _, split in scanned} <= {"train", "ucf_train", "vgg_train"}


def test_val_runs_end_to_end_where_default_cannot(no_test_data, encoder):
    report = evaluate(no_test_data, encoder, TASKS, settings())
    assert list(report["tasks"]) == list(TASKS)  # retrieval too: it reads pretrain/val
    assert report["skipped"] == {}
    experiments = report["tasks"]["ave"]["experiments"]["V->A"]
    assert experiments["train"]["part"] == "fit" and experiments["test"]["part"] == "held-out"
    assert experiments["test"]["split"] == "train" and experiments["test"]["modality"] == "audio"
    for name, entry in report["tasks"]["retrieval"].items():
        assert entry["data"]["dataset"] == str(no_test_data / "pretrain") and entry["data"]["split"] == "val"
        assert entry["captions"] == 32
    tables = result_tables("SRCID", report["tasks"], [43])
    assert set(tables) == {"table2", "table1", "table3"}
    with pytest.raises(SrcidError, match="test"):
        evaluate(no_test_data, encoder, ("ave",), settings("default"))


def test_default_protocol_reads_whole_splits(synth_dir, encoder):
    probes = prepare("ave", TaskData(synth_dir, encoder), settings("default"))
    for probe in probes:
        assert probe.train.part is None and probe.test.part is None and probe.test.split == "test"
        assert "part" not in probe.test.describe() and probe.note == ""
    with pytest.raises(SrcidError, match="opened for --protocol default"):
        prepare("ave", TaskData(synth_dir, encoder), settings("val"))


def test_retrieval_under_val_is_skipped_without_pretrain_val(no_test_data, encoder, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "ave").symlink_to(no_test_data / "ave", target_is_directory=True)
    report = evaluate(data, encoder, ("ave", "retrieval"), settings())
    assert list(report["tasks"]) == ["ave"]
    assert "retrieval" in report["skipped"] and "pretrain" in report["skipped"]["retrieval"]
    assert "table3" not in result_tables("SRCID", report["tasks"], [43])
    with pytest.raises(SrcidError, match="missing task folder"):  # the other protocols still need retrieval/
        evaluate(data, encoder, ("retrieval",), settings("default"))

    # through the command line: the note is printed, the tables leave retrieval out, the file name says val
    run = tmp_path / "run"
    model = tiny_model().eval()
    export_model(model, variant="srcid", config=model.config, input_shapes=TINY_SHAPES, path=run / "model.safetensors",
                 extra={"step": 0})
    assert srcid.cli.main(["eval", "--run", str(run), "--data", str(data), "--task", "retrieval", "--protocol", "val",
                           "--seeds", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "protocol val" in out and "Note: retrieval skipped under --protocol val" in out and "Table III" not in out
    written = json.loads((run / "eval-val-layers1-2-retrieval.json").read_text())
    assert written["protocol"] == "val" and written["tasks_run"] == [] and "retrieval" in written["tasks_skipped"]
    assert written["results"] == {} and written["tables"] == {}


# --------------------------------------------------------------------------- bad input


def keys_in(part, count, prefix="clip"):
    """``count`` clip keys that fall in ``part``."""
    keys = (f"{prefix}{i}" for i in range(10_000))
    return [k for k in keys if val_part(k) == part][:count]


def write_av(folder, clips_by_split, classes=("c0", "c1", "c2")):
    """A task folder of audio-video clips: ``clips_by_split[split]`` lists ``(key, label, segment class)``."""
    rng = np.random.default_rng(0)
    modalities = {m: (list(TINY_SHAPES[m]), "float32") for m in ("audio", "video")}
    with DatasetWriter(folder, name=Path(folder).name, modalities=modalities, classes=list(classes),
                       tasks=["classification"]) as writer:
        for split, clips in clips_by_split.items():
            for key, label, segment in clips:
                features = {m: rng.standard_normal(TINY_SHAPES[m]).astype(np.float32) for m in ("audio", "video")}
                writer.write(split, key, features, {"label": label, "segments": {m: [[segment]] * 10 for m in ("audio", "video")}})


@pytest.mark.parametrize("empty", [VAL_HELD_OUT, VAL_FIT])
def test_an_empty_part_names_the_folder_and_split(tmp_path, encoder, empty):
    full = VAL_FIT if empty == VAL_HELD_OUT else VAL_HELD_OUT
    write_av(tmp_path / "ave", {"train": [(k, 1, 1) for k in keys_in(full, 4)], "test": [("t0", 1, 1)]})
    with pytest.raises(SrcidError) as error:
        prepare("ave", TaskData(tmp_path, encoder, "val"), settings())
    message = str(error.value)
    assert str(tmp_path / "ave") in message and "split train" in message and f"the {empty} part" in message
    assert "--protocol val" in message


def test_ave_avvp_held_out_classes_must_be_trained_on(tmp_path, encoder):
    clips = [(k, 1, 1) for k in keys_in(VAL_FIT, 6)] + [(k, 1, 1) for k in keys_in(VAL_HELD_OUT, 2)]
    clips[-1] = (clips[-1][0], 2, 2)  # a held-out clip of a class no fit clip has
    write_av(tmp_path / "ave_avvp", {"train": clips, "test": [("t0", 1, 1)]})
    with pytest.raises(SrcidError) as error:
        prepare("ave-avvp", TaskData(tmp_path, encoder, "val"), settings())
    message = str(error.value)
    assert str(tmp_path / "ave_avvp") in message and "split train" in message and "held-out part uses 'c2'" in message
    # the default protocol's check (test classes = train classes) is not what val applies: it passes here
    clips[-1] = (clips[-1][0], 1, 1)
    shutil.rmtree(tmp_path / "ave_avvp")
    write_av(tmp_path / "ave_avvp", {"train": clips, "test": [("t0", 2, 2)]})
    probes = prepare("ave-avvp", TaskData(tmp_path, encoder, "val"), settings())
    assert [p.test.part for p in probes] == [VAL_HELD_OUT, VAL_HELD_OUT]
