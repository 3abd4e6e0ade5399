"""``srcid study``: train and evaluate the paper's comparisons (Tables I-III, Fig. 3) with one command."""
from __future__ import annotations

import shlex
from pathlib import Path

from srcid.errors import SrcidError
from srcid.run import (DEFAULT_BATCH_SIZE, DEFAULT_SEED, PRESETS, add_kernels_flag, apply_profile_and_overrides,
                       default_run_config)
from srcid.study.cells import CELLS_DIR, Settings, rank_batch
from srcid.study.grid import build_grid, plan_for, select, train_seed_list, with_train_seeds
from srcid.study.report import PLOT_FILES, RESULTS_FILE, TABLES_FILE, write_report
from srcid.study.runner import Runner, prepare_data


def _positive(name: str, value) -> None:
    if value is not None and value < 1:
        raise SrcidError(f"{name} {value}: must be at least 1")


def _command_line(args) -> str:
    """The invocation as a canonical ``srcid study`` command (recorded in results.json)."""
    words = ["srcid", "study", "--preset", args.preset, "--out", str(args.out)]
    if args.data is not None:
        words += ["--data", str(args.data)]
    for pattern in args.only or []:
        words += ["--only", pattern]
    for flag, value in (("--processes", args.processes), ("--seeds", args.seeds), ("--train-seeds", args.train_seeds),
                        ("--max-steps", args.max_steps), ("--kernels", args.kernels)):
        if value is not None:
            words += [flag, str(value)]
    for item in args.overrides:
        words += ["--set", item]
    return shlex.join(words)


# run-config keys the study sets itself, per cell or from its own flags
STUDY_KEYS = {"variant": "the cell", "preset": "--preset", "epochs": "the preset's plan", "max_steps": "--max-steps",
              "batch_size": "--processes", "log_every": "the preset's plan", "seed": "--train-seeds",
              "model.seed": "--train-seeds"}


def check_overrides(overrides: list, preset: str) -> list:
    """``--set`` items for every cell's training: each a valid ``KEY=VALUE`` of the trainer, none the study sets."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if "=" not in item or not key:
            raise SrcidError(f"--set {item!r}: expected KEY=VALUE")
        if key in STUDY_KEYS:
            raise SrcidError(f"--set {item}: {key} is set by the study ({STUDY_KEYS[key]}), not by --set")
    for variant in ("srcid", "dcid"):
        try:
            apply_profile_and_overrides(default_run_config(variant, preset), list(overrides)).validate()
        except SrcidError as error:
            raise SrcidError(f"--set: {error}") from None
    return list(overrides)


def _study(args) -> int:
    plan = plan_for(args.preset)
    overrides = check_overrides(args.overrides, plan.preset)
    for name in ("--seeds", "--train-seeds", "--max-steps", "--processes"):
        _positive(name, getattr(args, name[2:].replace("-", "_")))
    if args.out.exists() and not args.out.is_dir():
        raise SrcidError(f"--out {args.out}: is a file; name a folder for the study")
    train_seeds = train_seed_list(args.train_seeds or 1)
    grid = with_train_seeds(build_grid(plan), train_seeds)
    selected = select(grid, args.only)
    processes = args.processes or 1
    rank_batch(plan, processes)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(args.data, out, plan.preset, lambda line: print(line, flush=True))
    settings = Settings(plan=plan, out=out, data=data, seeds=args.seeds or plan.seeds, max_steps=args.max_steps,
                        processes=processes, kernels=args.kernels, command=_command_line(args), train_seeds=train_seeds,
                        overrides=overrides)

    outcomes = Runner(settings, lambda line: print(line, flush=True)).run(selected)
    failed = [o for o in outcomes if o.status == "failed"]
    write_report(settings, grid, [o.name for o in failed])
    print(f"wrote {settings.out / TABLES_FILE}, {settings.out / RESULTS_FILE} and "
          f"{', '.join(PLOT_FILES.values())}", flush=True)
    if failed:
        details = "; ".join(f"{o.name} ({o.error})" for o in failed)
        raise SrcidError(f"{len(failed)} of {len(selected)} cells failed: {details} "
                         f"(cell folders under {settings.out / CELLS_DIR})")
    return 0


def register(sub) -> None:
    """Add ``study`` to the ``srcid`` command line."""
    p = sub.add_parser(
        "study", help="train and evaluate the paper's comparisons (Tables I-III, Fig. 3)",
        description="Train every model the paper compares, evaluate each on every downstream task, and write "
                    "Tables I-III, Fig. 3 and training curves into STUDY_DIR (see docs/STUDY.md). Finished cells "
                    "are skipped, interrupted trainings resumed.",
    )
    p.add_argument("--preset", required=True, metavar="{" + ",".join(PRESETS) + "}",
                   help="model sizes, training length and head epochs (tiny: tests; small: 2 CPU cores; paper: GPU)")
    p.add_argument("--data", type=Path, default=None, metavar="DATA_DIR",
                   help="folder with pretrain/, ave/, avvp/, ave_avvp/, ucf_vgg/, retrieval/ "
                        "(default: STUDY_DIR/data, synthesized for the preset when missing)")
    p.add_argument("--out", type=Path, required=True, metavar="STUDY_DIR", help="the study folder (cells, tables, plots)")
    p.add_argument("--only", action="append", default=None, metavar="PATTERN",
                   help="run only the cells whose name matches: a glob (dcid-*) or a regular expression (rvq[23]); "
                        "repeatable")
    p.add_argument("--processes", type=int, default=None, metavar="N",
                   help="training processes per cell through deepspeed (default 1); the global batch stays "
                        f"{DEFAULT_BATCH_SIZE}")
    p.add_argument("--seeds", type=int, default=None, metavar="S", help="head seeds per evaluation (default: the preset's)")
    p.add_argument("--train-seeds", type=int, default=None, metavar="T",
                   help=f"train every cell with T training seeds ({DEFAULT_SEED}, 1, 2, ...; repeats are named "
                        "<cell>-seed<S>); the tables pool the T x S runs (default 1)")
    p.add_argument("--max-steps", type=int, default=None, metavar="N",
                   help="stop every training after N steps (default: the preset's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a trainer setting for every cell, before the cell's own (e.g. --set profile=authors); "
                        "repeatable")
    add_kernels_flag(p)
    p.set_defaults(func=_study)
