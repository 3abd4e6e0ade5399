"""``srcid data ...``: synthesize, check and import feature datasets."""
from __future__ import annotations

import sys
from pathlib import Path

from srcid.data.check import check_path
from srcid.data.importers import LAYOUTS, run_importer
from srcid.data.synth import check_out_folder, synthesize
from srcid.errors import check_writable_folder


def _synth(args) -> int:
    check_out_folder(args.out, args.overwrite)  # a folder that is not empty is refused without --overwrite
    check_writable_folder(args.out, "--out")  # before any clip is rendered
    written = synthesize(args.preset, args.out, seed=args.seed, style=args.style, overwrite=args.overwrite)
    for path in written:
        print(f"wrote {path}")
    return 0


def _check(args) -> int:
    reports = check_path(args.path, skip_bad=args.skip_bad, workers=args.workers)
    for report in reports:
        for warning in report.warnings:
            print(f"srcid: warning: {warning}", file=sys.stderr)
        print(report.summary())
    return 0


def _import(args) -> int:
    manifest_paths = run_importer(args.layout, args.src, args.out, max_samples_per_shard=args.shard_size,
                                  overwrite=args.overwrite)
    for path in manifest_paths:
        print(f"wrote {path}")
    return 0


def register(sub) -> None:
    data = sub.add_parser("data", help="synthesize, check and import feature datasets")
    data_sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    p = data_sub.add_parser("synth", help="write the synthetic default datasets (no download)")
    p.add_argument("--preset", choices=("tiny", "small", "paper"), default="small")
    p.add_argument("--out", type=Path, required=True,
                   help="folder that receives pretrain/, ave/, avvp/, ave_avvp/, ucf_vgg/, retrieval/ (new or empty; "
                        "the datasets appear there only once all six are written)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an --out folder that is not empty (the old content is deleted, no stale shard is "
                        "kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--style", choices=("standard", "realistic"), default="standard",
                   help="standard: standardized features, easy classes; realistic: the scales, offsets, sparsity and "
                        "harder classes of real pre-extracted features (docs/SYNTHETIC-DATA.md)")
    p.set_defaults(func=_synth)

    p = data_sub.add_parser("check", help="validate a dataset (or a folder of datasets) against its manifest")
    p.add_argument("path", type=Path, help="a dataset folder (with dataset.json) or a folder of them")
    p.add_argument("--skip-bad", action="store_true", help="skip bad samples instead of failing, and report how many")
    p.add_argument("--workers", type=int, default=0, help="worker processes (0 = read in this process)")
    p.set_defaults(func=_check)

    p = data_sub.add_parser("import", help="convert an original feature layout into feature shards")
    p.add_argument("layout", choices=sorted(LAYOUTS))
    p.add_argument("--src", type=Path, required=True, help="the original dataset's root folder")
    p.add_argument("--out", type=Path, required=True,
                   help="the dataset folder to write (new or empty; it appears only once the import is complete)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an --out folder that is not empty (the old content is deleted, no stale shard is kept)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.set_defaults(func=_import)
