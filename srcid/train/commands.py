"""``srcid train`` (one process; many through ``deepspeed launcher/train.py``) and ``srcid export``."""
from __future__ import annotations

from pathlib import Path

from srcid.run import CHECKPOINTS_DIR, RUN_CONFIG_FILE, build_parser
from srcid.train.trainer import export_run, main


def _train(args) -> int:
    return main(getattr(args, "extra_args", []))


def _export(args) -> int:
    path = export_run(args.run, args.out, overwrite=args.overwrite)
    print(f"wrote {path} and {path.with_suffix('.json')}")
    return 0


def register(sub) -> None:
    trainer_parser = build_parser()
    p = sub.add_parser(
        "train", help="train in this process (for several processes: deepspeed launcher/train.py ...)",
        description=trainer_parser.description + " Same flags as launcher/train.py.",
        add_help=False,
    )
    p.set_defaults(func=_train, passes_extra_args=True)

    p = sub.add_parser("export", help="write a run's inference weights as safetensors + JSON")
    p.add_argument("run", type=Path, help=f"run directory (with {CHECKPOINTS_DIR}/ and {RUN_CONFIG_FILE})")
    p.add_argument("--out", type=Path, required=True, help="output file, ending in .safetensors (a .json sidecar is written beside it)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file and its sidecar")
    p.set_defaults(func=_export)
