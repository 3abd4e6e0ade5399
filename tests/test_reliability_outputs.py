"""No silent overwrite and one-line write failures, for every command that writes (docs/RELIABILITY.md).

* A new training run refuses a folder that holds a run (or anything else) unless ``--resume`` or
  ``--overwrite``; ``--overwrite`` clears a run directory, never another folder.
* ``srcid eval``, ``inspect`` and ``export`` refuse an existing output file before any work unless ``--overwrite``;
  with it the file is replaced atomically.
* ``train``, ``export``, ``eval``, ``encode``, ``inspect``, ``data import`` and ``data synth`` check that they can
  write their output before the long work, and a failed write is one line naming the path.
"""
import errno
import json
import os
import stat

import pytest
import torch

import srcid.cli
from srcid.data.manifest import load_manifest
from srcid.errors import SrcidError
from srcid.model import build_model_from_manifest, model_config
from srcid.model.export import export_model
from srcid.run import RUN_CONFIG_FILE
from srcid.train.trainer import prepare_run_dir
from helpers_training import train_in_process as train

TRAIN_ARGS = ["--model", "srcid", "--preset", "tiny", "--max-steps", "2", "--quiet", "--set", "batch_size=8",
              "--set", "num_workers=0", "--set", "log_every=1", "--set", "input_stats_clips=16"]
EVAL_ARGS = ["--task", "ave", "--seeds", "1", "--epochs-cls", "1", "--epochs-loc", "1", "--batch-size", "64"]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0




@pytest.fixture
def cli():
    return lambda *argv: srcid.cli.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def model_dir(synth_dir, tmp_path_factory):
    """A run directory holding an exported (untrained) tiny SRCID model."""
    run = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    config = model_config("tiny")
    model = build_model_from_manifest("srcid", config, load_manifest(synth_dir / "pretrain"))
    export_model(model, variant="srcid", config=config, input_shapes=model.input_shapes, path=run / "model.safetensors",
                 extra={"step": 0})
    return run


def error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "[WARNING]" not in line]
    assert len(err) == 1, err
    assert err[0].startswith("srcid: error: ") and "Traceback" not in err[0]
    return err[0]


# ------------------------------------------------------------------------------------------- training runs


def fake_run(folder):
    (folder / "checkpoints" / "step-00000004").mkdir(parents=True)
    (folder / "checkpoints" / "step-00000004" / "COMPLETE").write_text("{}")
    (folder / RUN_CONFIG_FILE).write_text("{}")
    (folder / "metrics.csv").write_text("step,loss\n4,99.0\n")
    (folder / "events.jsonl").write_text('{"step": 4, "name": "old", "info": {}, "time": "x"}\n')
    return folder


def test_a_new_run_refuses_a_used_folder_and_overwrite_starts_over(synth_dir, tmp_path, monkeypatch, capsys):
    data = synth_dir / "pretrain"
    run = fake_run(tmp_path / "run")
    assert train(monkeypatch, "--data", data, "--out", run, *TRAIN_ARGS) == 2
    line = error_line(capsys)
    assert f"--out {run}: already holds a run" in line and "--resume" in line and "--overwrite" in line
    assert (run / "metrics.csv").read_text() == "step,loss\n4,99.0\n"  # untouched
    assert train(monkeypatch, "--data", data, "--out", run, *TRAIN_ARGS, "--resume", "--overwrite") == 2
    assert "give one of them" in error_line(capsys)

    torch.set_num_threads(1)
    assert train(monkeypatch, "--data", data, "--out", run, *TRAIN_ARGS, "--overwrite") == 0
    capsys.readouterr()
    assert not (run / "checkpoints" / "step-00000004").exists()
    assert [row.split(",")[0] for row in (run / "metrics.csv").read_text().splitlines()] == ["step", "1", "2"]
    assert "old" not in (run / "events.jsonl").read_text()
    assert json.loads((run / RUN_CONFIG_FILE).read_text())["preset"] == "tiny"


def test_overwrite_clears_only_a_run_directory(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "thesis.tex").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(SrcidError, match="is not a run directory"):
            prepare_run_dir(other, resume=False, overwrite=overwrite)
    assert (other / "thesis.tex").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    prepare_run_dir(tmp_path / "empty", resume=False, overwrite=False)  # an empty folder is a new run's
    prepare_run_dir(tmp_path / "new" / "run", resume=False, overwrite=False)
    assert (tmp_path / "new" / "run").is_dir() and not any((tmp_path / "new" / "run").iterdir())
    (tmp_path / "file").write_text("x")
    with pytest.raises(SrcidError, match="exists and is not a folder"):
        prepare_run_dir(tmp_path / "file", resume=False, overwrite=True)


# ------------------------------------------------------------------------------------------- evaluation output


def test_eval_refuses_an_existing_json_and_overwrite_replaces_it_atomically(model_dir, synth_dir, cli, capsys, tmp_path,
                                                                            monkeypatch):
    out = tmp_path / "eval.json"
    out.write_text('{"old": true}\n')
    import srcid.eval.tasks

    monkeypatch.setattr(srcid.eval.tasks, "evaluate", never("evaluating"))
    assert cli("eval", "--run", model_dir, "--data", synth_dir, *EVAL_ARGS, "--out", out) == 2
    assert f"--out {out}: exists; pass --overwrite to replace it" in error_line(capsys)
    assert out.read_text() == '{"old": true}\n'
    monkeypatch.undo()

    assert cli("eval", "--run", model_dir, "--data", synth_dir, *EVAL_ARGS, "--out", out, "--overwrite") == 0
    first = json.loads(out.read_text())
    assert first["command"] == "eval" and "old" not in first
    capsys.readouterr()

    # the disk fills while the new JSON is written (srcid.files writes it): one line naming the file, the previous
    # JSON intact
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("srcid.files.os.fsync", full)
    assert cli("eval", "--run", model_dir, "--data", synth_dir, *EVAL_ARGS, "--out", out, "--overwrite") == 2
    line = error_line(capsys)
    assert f"{out}: cannot write: No space left on device" in line
    assert json.loads(out.read_text()) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]


def test_inspect_and_export_refuse_existing_outputs(model_dir, synth_dir, cli, capsys, tmp_path):
    report = tmp_path / "inspect.json"
    report.write_text("{}")
    assert cli("inspect", "--run", model_dir, "--data", synth_dir / "pretrain", "--json", report) == 2
    assert f"--json {report}: exists; pass --overwrite to replace it" in error_line(capsys)
    assert report.read_text() == "{}"
    weights = tmp_path / "exported.safetensors"
    weights.with_suffix(".json").write_text("{}")  # the sidecar alone is enough to refuse
    assert cli("export", str(tmp_path / "no-run"), "--out", weights) == 2
    assert f"--out {weights}: exported.json exists; pass --overwrite to replace it" in error_line(capsys)
    assert weights.with_suffix(".json").read_text() == "{}"


# ------------------------------------------------------------------------------------------- write failures


def unwritable(tmp_path, how, monkeypatch):
    """A folder path no command can write: under a read-only folder, or under a plain file.

    Root ignores permissions: there the read-only folder is simulated by making ``os.mkdir`` inside it fail
    with EACCES, as it does for everyone else."""
    if how == "read-only folder":
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
        if IS_ROOT:
            real_mkdir = os.mkdir

            def mkdir(path, *args, **kwargs):
                if os.path.dirname(os.path.abspath(path)) == str(folder):
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
                return real_mkdir(path, *args, **kwargs)

            monkeypatch.setattr(os, "mkdir", mkdir)
        return folder / "out"
    (tmp_path / "a-file").write_text("x")
    return tmp_path / "a-file" / "out"


@pytest.fixture(params=["read-only folder", "under a file"])
def bad(request, tmp_path, monkeypatch):
    path = unwritable(tmp_path, request.param, monkeypatch)
    yield path
    if request.param == "read-only folder":
        path.parent.chmod(0o755)


def never(what):
    def fail(*args, **kwargs):
        pytest.fail(f"{what} ran although the output cannot be written")
    return fail


def test_train_fails_before_reading_data(bad, synth_dir, monkeypatch, capsys):
    import srcid.data.reader

    monkeypatch.setattr(srcid.data.reader.ShardLoader, "__init__", never("reading the data"))
    assert train(monkeypatch, "--data", synth_dir / "pretrain", "--out", bad / "run", *TRAIN_ARGS) == 2
    assert f"--out {bad / 'run'}: cannot write there" in error_line(capsys)


def test_export_fails_before_loading(bad, tmp_path, cli, capsys, monkeypatch):
    import srcid.train.checkpoint

    monkeypatch.setattr(srcid.train.checkpoint, "load_module_state", never("loading the checkpoint"))
    assert cli("export", tmp_path, "--out", bad / "model.safetensors") == 2
    assert f"--out {bad / 'model.safetensors'}: its folder {bad}: cannot write there" in error_line(capsys)


def test_eval_fails_before_evaluating(bad, model_dir, synth_dir, cli, capsys, monkeypatch):
    import srcid.eval.tasks

    monkeypatch.setattr(srcid.eval.tasks, "evaluate", never("the evaluation"))
    assert cli("eval", "--run", model_dir, "--data", synth_dir, *EVAL_ARGS, "--out", bad / "eval.json") == 2
    assert f"--out {bad / 'eval.json'}: its folder {bad}: cannot write there" in error_line(capsys)


def test_encode_and_inspect_fail_before_encoding(bad, model_dir, synth_dir, cli, capsys, monkeypatch):
    import srcid.eval.features
    import srcid.eval.representations

    monkeypatch.setattr(srcid.eval.features, "scan_split", never("encoding"))
    assert cli("encode", "--run", model_dir, "--data", synth_dir / "ave", "--out", bad / "codes") == 2
    assert f"--out {bad / 'codes'}: cannot write there" in error_line(capsys)
    monkeypatch.setattr(srcid.eval.representations, "representation_stats", never("the inspection"))
    assert cli("inspect", "--run", model_dir, "--data", synth_dir / "pretrain", "--json", bad / "i.json") == 2
    assert f"--json {bad / 'i.json'}: its folder {bad}: cannot write there" in error_line(capsys)


def test_data_import_and_synth_fail_before_reading(bad, tmp_path, cli, capsys, monkeypatch):
    import srcid.data.importers
    import srcid.data.synth

    monkeypatch.setitem(srcid.data.importers.LAYOUTS, "ave", never("the import"))
    (tmp_path / "src").mkdir()
    assert cli("data", "import", "ave", "--src", tmp_path / "src", "--out", bad / "ave") == 2
    assert f"--out {bad / 'ave'}: its folder {bad}: cannot write there" in error_line(capsys)
    monkeypatch.setattr(srcid.data.synth, "synthesize", never("the synthesis"))
    assert cli("data", "synth", "--preset", "tiny", "--out", bad / "synth") == 2
    assert f"--out {bad / 'synth'}: cannot write there" in error_line(capsys)


def test_a_full_disk_while_exporting_is_one_line(model_dir, tmp_path, monkeypatch):
    from srcid.model.export import load_model

    model, _ = load_model(model_dir / "model.safetensors")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("srcid.files.os.fsync", full)  # srcid.files writes the export
    with pytest.raises(SrcidError) as caught:
        export_model(model, variant="srcid", config=model.config, input_shapes=model.input_shapes,
                     path=tmp_path / "m.safetensors")
    assert str(caught.value) == f"{tmp_path / 'm.safetensors'}: cannot write: No space left on device"
    assert list(tmp_path.iterdir()) == []


def test_an_os_error_that_escapes_a_command_is_one_line(cli, capsys, monkeypatch):
    import srcid.data.commands

    def denied(args):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/data/somewhere/file.tar")

    monkeypatch.setattr(srcid.data.commands, "_check", denied)
    assert cli("data", "check", "/data/somewhere") == 1
    assert error_line(capsys) == "srcid: error: /data/somewhere/file.tar: Permission denied"
