"""``srcid eval`` (every downstream task of the paper), ``srcid encode`` (a dataset's codes as shards) and
``srcid inspect`` (a collapse check of a model's representations)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

from srcid import __version__
from srcid.data.manifest import MANIFEST_NAME, load_manifest
from srcid.data.reader import ShardLoader
from srcid.errors import SrcidError, check_writable_folder
from srcid.eval.features import FeatureEncoder, check_model_input, encode_dataset, open_model, parse_layers
from srcid.eval.probe import seed_list
from srcid.eval import representations
from srcid.eval import tasks as eval_tasks
from srcid.eval.representations import COLLAPSE_CODES, LIVE_REL, flag_summary, plot_code_usage
from srcid.eval.representations import to_markdown as representations_markdown
from srcid.eval.tables import to_markdown as tables_markdown
from srcid.eval.tasks import PROTOCOLS, TASKS, EvalSettings, expand_tasks, method_name, result_tables
from srcid.files import write_json_atomic
from srcid.run import add_kernels_flag

DATA_FOLDERS = "ave/, avvp/, ave_avvp/, ucf_vgg/, retrieval/"
PROTOCOL_DESCRIPTIONS = {
    "default": "held-out test splits; the head after the last epoch",
    "authors": "the authors' choices: best epoch selected on the test data; AVE cross-modal heads tested on the "
               "train split of the other modality; localization lr halved after epochs 10, 20, 30",
    "val": "for choosing model settings, no test split read: heads train on the fit part of their train split and "
           "are tested on the held-out part (1 clip in 5 by key hash) of the other side's train split; the head "
           "after the last epoch; retrieval on DATA_DIR/pretrain split val (skipped without it)",
}


def _layers_tag(layers) -> str:
    return "-".join(str(k) for k in layers)


def default_output(run: Path, weights: Path, protocol: str, layers, task: str) -> Path:
    """``RUN_DIR/eval-<protocol>-layers<1 or 1-2>.json`` (``-<task>`` added when one task ran)."""
    run_dir = run if run.is_dir() else weights.parent
    suffix = "" if task == "all" else f"-{task}"
    return run_dir / f"eval-{protocol}-layers{_layers_tag(layers)}{suffix}.json"


def _check_output_file(flag: str, path: Path, overwrite: bool) -> None:
    """Before any long work: ``path`` is not a folder, does not exist yet unless ``overwrite`` (an output of an
    earlier command is never replaced silently), and its folder exists (or is created) and is writable."""
    if path.is_dir():
        raise SrcidError(f"{flag} {path}: is a folder; name the file to write")
    if path.exists() and not overwrite:
        raise SrcidError(f"{flag} {path}: exists; pass --overwrite to replace it")
    check_writable_folder(path.parent, f"{flag} {path}: its folder")


def _positive(name: str, value: int) -> int:
    if value < 1:
        raise SrcidError(f"{name} {value}: must be at least 1")
    return value


def _eval(args) -> int:

    for name in ("--seeds", "--epochs-cls", "--epochs-loc", "--batch-size"):
        _positive(name, getattr(args, name[2:].replace("-", "_")))
    tasks = expand_tasks(args.task)
    model, info, weights = open_model(args.run, args.device)
    layers = parse_layers(args.layers, model)
    out = args.out or default_output(args.run, weights, args.protocol, layers, args.task)
    _check_output_file("--out", out, args.overwrite)  # before the heads train, not after
    encoder = FeatureEncoder(model, layers, batch_size=args.batch_size)
    settings = EvalSettings(protocol=args.protocol, seeds=seed_list(args.seeds), epochs_cls=args.epochs_cls,
                            epochs_loc=args.epochs_loc, background=not args.no_background, device=str(encoder.device),
                            progress=sys.stderr.isatty()).validate()
    report = eval_tasks.evaluate(args.data, encoder, tasks, settings)  # through the module: tests stub it there

    method = method_name(model.variant, layers, len(model.layers))
    tables = result_tables(method, report["tasks"], settings.seeds)
    step = info["extra"].get("step")
    header = (f"srcid eval: {weights} ({model.variant}{'' if step is None else f', step {step}'}), "
              f"layers {','.join(map(str, layers))}, protocol {args.protocol} ({PROTOCOL_DESCRIPTIONS[args.protocol]}), "
              f"seeds {', '.join(map(str, settings.seeds))}")
    header += "".join(f"\nNote: {reason}" for reason in report["skipped"].values())
    markdown = header + "\n\n" + "\n".join(tables_markdown(table) for table in tables.values())
    print(markdown)
    write_json_atomic(out, {
        "srcid_version": __version__,
        "command": "eval",
        "model": {"path": str(weights), "variant": model.variant, "step": step, "extra": info["extra"],
                  "layers": len(model.layers)},
        "data": str(args.data),
        "tasks_run": list(report["tasks"]),
        "tasks_skipped": report["skipped"],
        "protocol": args.protocol,
        "protocol_description": PROTOCOL_DESCRIPTIONS[args.protocol],
        "layers": list(layers),
        "feature_dim": encoder.feature_dim,
        "method": method,
        "seeds": settings.seeds,
        "epochs": {"classification": settings.epochs_cls, "localization": settings.epochs_loc},
        "head_training": {"batch_size": settings.batch_size, "lr": settings.lr, "grad_clip": settings.grad_clip,
                          "hidden": settings.hidden, "keep": settings.keep},
        "background_column": settings.background,
        "device": str(encoder.device),
        "results": report["tasks"],
        "tables": tables,
        "markdown": markdown,
    })
    print(f"wrote {out}")
    return 0


def _encode(args) -> int:

    _positive("--batch-size", args.batch_size)
    model, info, _ = open_model(args.run, args.device)
    layers = parse_layers(args.layers, model)
    splits = None
    if args.splits is not None:
        splits = [s.strip() for s in args.splits.split(",") if s.strip()]
        if not splits:
            raise SrcidError(f"--splits {args.splits!r}: name at least one split")
    manifest = encode_dataset(model, info, args.data, args.out, layers=layers, splits=splits, batch_size=args.batch_size)
    summary = ", ".join(f"{name} {info.samples} clips" for name, info in manifest.splits.items())
    shapes = ", ".join(f"{m} [{', '.join('S' if s is None else str(s) for s in spec.shape)}]"
                       for m, spec in manifest.modalities.items())
    print(f"wrote {Path(args.out) / 'dataset.json'}: {summary}; codes of layers {','.join(map(str, layers))} as {shapes}")
    return 0


def _positive_number(name: str, value) -> float:
    if value is None or not math.isfinite(value) or value <= 0:
        raise SrcidError(f"{name} {value}: must be a positive number")
    return value


def default_plot(json_path: Path) -> Path:
    """The code-usage PNG beside an ``srcid inspect`` JSON: ``FILE.json`` -> ``FILE-codes.png``."""
    return json_path.with_name(f"{json_path.stem}-codes.png")


INSPECT_DEFAULT_FOLDER = "pretrain"  # the dataset srcid inspect reads under a DATA_DIR (as srcid data synth writes)


def inspect_dataset(data: Path) -> tuple:
    """``(dataset folder, note)`` for ``srcid inspect --data``: a dataset folder (holding dataset.json) itself,
    or ``DATA_DIR/pretrain`` under a DATA_DIR (as ``srcid eval --data`` takes), with a note saying so."""

    data = Path(data)
    if (data / MANIFEST_NAME).is_file():
        return data, None
    chosen = data / INSPECT_DEFAULT_FOLDER
    if (chosen / MANIFEST_NAME).is_file():
        return chosen, f"--data {data}: a DATA_DIR; reading its pretraining set {chosen}"
    state = "no such folder" if not data.exists() else ("not a folder" if not data.is_dir() else f"holds no {MANIFEST_NAME}")
    raise SrcidError(f"--data {data}: {state}; expected a dataset folder holding {MANIFEST_NAME}, or a DATA_DIR "
                     f"holding {INSPECT_DEFAULT_FOLDER}/{MANIFEST_NAME}")


def first_clips(batches, clips: int):
    """The first ``clips`` clips of ``batches``, the batch that reaches the count cut to it; nothing more is read."""
    taken = 0
    if clips < 1:
        return
    for batch in batches:
        if taken + len(batch) > clips:
            batch = batch.rows(0, clips - taken)
        taken += len(batch)
        yield batch
        if taken >= clips:
            return


def _inspect(args) -> int:

    _positive("--clips", args.clips)
    _positive("--batch-size", args.batch_size)
    _positive("--collapse-codes", args.collapse_codes)
    if args.live_std is not None and args.live_rel is not None:
        raise SrcidError(f"--live-std {args.live_std} and --live-rel {args.live_rel}: give one (--live-std is an "
                         "absolute threshold that replaces the relative one)")
    if args.live_std is not None:
        _positive_number("--live-std", args.live_std)
    live_rel = LIVE_REL if args.live_rel is None else _positive_number("--live-rel", args.live_rel)
    if args.json is not None and args.json.is_dir():
        raise SrcidError(f"--json {args.json}: is a folder; name the JSON file to write")
    plot = args.plot if args.plot is not None else (None if args.json is None else default_plot(args.json))
    if plot is not None and plot.is_dir():
        raise SrcidError(f"--plot {plot}: is a folder; name the PNG file to write")
    if plot is not None and args.json is not None and plot.resolve() == args.json.resolve():
        raise SrcidError(f"--plot {plot}: the same file as --json")
    for flag, path in (("--json", args.json), ("--plot", plot)):
        if path is not None:
            _check_output_file(flag, path, args.overwrite)
    data, note = inspect_dataset(args.data)
    model, info, weights = open_model(args.run, args.device)
    device = next(model.parameters()).device
    manifest = load_manifest(data)
    manifest.shard_paths(args.split)  # names the splits when there is no such split
    for m in model.input_shapes:
        check_model_input(model, manifest, m, "srcid inspect")
    if note:
        print(f"srcid inspect: {note}")
    available = manifest.splits[args.split].samples
    clips = min(args.clips, available)
    # the first `clips` clips in shard order: batches of --batch-size, the last one cut to the count
    loader = ShardLoader(data, args.split, batch_size=min(args.batch_size, max(clips, 1)), shuffle=False,
                         modalities=tuple(model.input_shapes), tail="merge")
    counted = []

    def batches():
        for batch in first_clips(loader.epoch(0), clips):
            counted.append(len(batch))
            yield batch.to(device)

    stats = representations.representation_stats(model, batches(), live_rel=live_rel, live_std=args.live_std,
                                                  collapse_codes=args.collapse_codes)
    step = info["extra"].get("step")
    read = sum(counted)
    short = "" if read >= args.clips else f" (--clips {args.clips}: the split holds {available})"
    header = (f"srcid inspect: {weights} ({model.variant}{'' if step is None else f', step {step}'}), "
              f"{read} clips of {data} split {args.split}{short}")
    print(header + "\n")
    print(representations_markdown(stats, live_rel, args.live_std))
    flags = flag_summary(stats, live_rel=live_rel, live_std=args.live_std, collapse_codes=args.collapse_codes)
    if flags:
        print("\n" + "\n".join(flags))
    if plot is not None:
        plot_code_usage(stats, plot, title=header)
        print(f"wrote {plot}")
    if args.json is not None:
        write_json_atomic(args.json, {
            "command": "inspect", "model": {"path": str(weights), "variant": model.variant, "step": step},
            "data": str(data), "split": args.split, "clips": read,
            "live_std": args.live_std, "live_rel": None if args.live_std is not None else live_rel,
            "collapse_codes": args.collapse_codes, "plot": None if plot is None else str(plot),
            "flagged": [{"layer": s.layer, "modality": s.modality, "flags": s.flags} for s in stats if s.flags],
            "stats": [s.to_json() for s in stats],
        })
        print(f"wrote {args.json}")
    return 0


def register(sub) -> None:
    """Add ``eval``, ``encode`` and ``inspect`` to the ``srcid`` command line."""

    p = sub.add_parser(
        "eval", help="the paper's downstream tasks on a frozen model (Tables I-III)",
        description="Train heads on a frozen model's quantized features and report the paper's tables "
                    f"(DATA_DIR holds {DATA_FOLDERS}).",
    )
    p.add_argument("--run", type=Path, required=True, metavar="RUN_OR_MODEL", help="a run directory holding model.safetensors, or an exported *.safetensors file")
    p.add_argument("--data", type=Path, required=True, metavar="DATA_DIR", help=f"DATA_DIR with the task folders {DATA_FOLDERS} (--protocol val: pretrain/ instead of retrieval/)")
    p.add_argument("--task", choices=TASKS + ("all",), required=True)
    p.add_argument("--layers", default=None, metavar="1|1,2", help="1 (layer 1 only, the paper's 'only1') or 1,2 (default: every layer of the model)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="default",
                   help="default: held-out test splits, last epoch; authors: the authors' choices; val: for choosing "
                        "model settings, never reads a test split: heads train on part of each train split and are "
                        "tested on its held-out rest (1 clip in 5), retrieval on DATA_DIR/pretrain split val "
                        "(see docs/EVALUATION.md)")
    p.add_argument("--seeds", type=int, default=3, metavar="N", help="head seeds (43, 44, ...); results give mean and spread")
    p.add_argument("--epochs-cls", type=int, default=30, metavar="N", help="epochs of classification heads")
    p.add_argument("--epochs-loc", type=int, default=50, metavar="N", help="epochs of localization heads")
    p.add_argument("--out", type=Path, default=None, metavar="FILE.json", help="JSON file (default: RUN_DIR/eval-<protocol>-layers<1|1-2>.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing JSON file (else refused before any work)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--no-background", action="store_true", help="no background column in localization targets")
    p.add_argument("--batch-size", type=int, default=256, metavar="N", help="clips per encoding batch")
    add_kernels_flag(p)
    p.set_defaults(func=_eval)

    p = sub.add_parser(
        "encode", help="write a dataset's discrete codes as shards",
        description="Encode every clip of a dataset with a frozen model and write its code indices per layer "
                    "and time step as a new dataset (float32 [T, columns] per modality, meta.json kept).",
    )
    p.add_argument("--run", type=Path, required=True, metavar="RUN_OR_MODEL", help="a run directory holding model.safetensors, or an exported *.safetensors file")
    p.add_argument("--data", type=Path, required=True, metavar="DATASET_DIR", help="the dataset folder to encode")
    p.add_argument("--out", type=Path, required=True, metavar="OUT_DIR", help="an empty or new folder for the codes")
    p.add_argument("--layers", default=None, metavar="1|1,2", help="1 or 1,2 (default: every layer of the model)")
    p.add_argument("--splits", default=None, metavar="SPLIT,...", help="comma-separated splits (default: all)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--batch-size", type=int, default=256, metavar="N", help="clips per encoding batch")
    add_kernels_flag(p)
    p.set_defaults(func=_encode)


    p = sub.add_parser(
        "inspect", help="a collapse check: code usage, specific-output spread, dead units and reconstruction per layer and modality",
        description="Run a frozen model over clips of a dataset and report, per layer and modality, the codes used "
                    "(flagging a collapsed codebook), how much the specific output varies (a dead one carries nothing "
                    "and gives layer 2 nothing), the hidden ReLU units feeding it that never fire, and the "
                    "reconstruction error absolute and relative to the target's variance; on labelled clips, the class "
                    "read back on held-out steps from the codes and from the general features they quantize; "
                    "optionally a PNG of each code-usage histogram.",
    )
    p.add_argument("--run", type=Path, required=True, metavar="RUN_OR_MODEL", help="a run directory holding model.safetensors, or an exported *.safetensors file")
    p.add_argument("--data", type=Path, required=True, metavar="DATASET_DIR",
                   help="a dataset carrying every modality of the model (a folder holding dataset.json), or a DATA_DIR "
                        "holding pretrain/ (then its pretraining set is read, as the output says)")
    p.add_argument("--split", default="train", help="split to read (default: train)")
    p.add_argument("--clips", type=int, default=800, metavar="N",
                   help="clips to read, the first N in shard order (default: 800; the whole split when it holds fewer)")
    p.add_argument("--batch-size", type=int, default=200, metavar="N", help="clips per batch")
    p.add_argument("--collapse-codes", type=int, default=COLLAPSE_CODES, metavar="N",
                   help=f"flag a collapsed codebook where at most N distinct codes are used (default {COLLAPSE_CODES})")
    p.add_argument("--live-rel", type=float, default=None, metavar="R",
                   help="a specific-output dimension is live when its std exceeds R times the mean per-feature std "
                        f"of the layer's reconstruction target (default {LIVE_REL:g})")
    p.add_argument("--live-std", type=float, default=None, metavar="S",
                   help="instead of --live-rel: an absolute threshold, live when the std exceeds S")
    p.add_argument("--json", type=Path, default=None, metavar="FILE.json", help="also write the numbers as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace existing --json / --plot files (else refused before any work)")
    p.add_argument("--plot", type=Path, default=None, metavar="FILE.png",
                   help="write the code-usage histograms as a PNG (default with --json: FILE-codes.png beside it; "
                        "without --json: none)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    add_kernels_flag(p)
    p.set_defaults(func=_inspect)
