"""The run contract (srcid.run): the trainer's command line read back as written, the launch commands, and the
defaults declared once."""
import sys
from pathlib import Path

from srcid.model import PRESETS, VARIANTS, model_config
from srcid.run import (DEFAULT_BATCH_SIZE, DEFAULT_SEED, TRAINER_MODULE, build_parser, default_ds_config,
                       default_run_config, train_argv, train_command)


def test_the_trainer_parses_back_the_command_line_that_train_argv_writes(tmp_path):
    settings = dict(variant="dcid-rvq3", preset="tiny", data=tmp_path / "data", out=tmp_path / "run", epochs=4,
                    max_steps=8, overrides=["batch_size=40", "profile=authors"], kernels="reference", resume=True,
                    quiet=True)
    args = build_parser().parse_args(train_argv(**settings))
    assert (args.model, args.preset, args.data, args.out) == ("dcid-rvq3", "tiny", tmp_path / "data", tmp_path / "run")
    assert (args.epochs, args.max_steps, args.overrides) == (4, 8, ["batch_size=40", "profile=authors"])
    assert (args.kernels, args.resume, args.quiet) == ("reference", "latest", True)
    plain = build_parser().parse_args(train_argv(variant="srcid", preset="small", data=Path("d"), out=Path("o")))
    assert (plain.epochs, plain.max_steps, plain.overrides, plain.kernels, plain.resume, plain.quiet) == (
        None, None, [], None, None, False)


def test_one_process_runs_the_installed_trainer_module(tmp_path):
    command = train_command(1, variant="srcid", preset="tiny", data=tmp_path, out=tmp_path / "run")
    assert command[:3] == [sys.executable, "-m", TRAINER_MODULE]
    assert command[3:] == train_argv(variant="srcid", preset="tiny", data=tmp_path, out=tmp_path / "run")


def test_defaults_are_declared_once():
    config = default_run_config("srcid", "tiny")
    assert config.batch_size == DEFAULT_BATCH_SIZE and config.seed == DEFAULT_SEED == model_config("tiny").seed
    parser = {a.dest: a for a in build_parser()._actions}
    assert tuple(parser["model"].choices) == tuple(VARIANTS) and tuple(parser["preset"].choices) == PRESETS
    for device in ("cpu", "cuda"):
        assert default_ds_config(device).is_file()
        assert default_ds_config(device).parent == Path(__file__).resolve().parents[1] / "srcid" / "train"
