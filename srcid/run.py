"""The run contract: what a training run is made of, where its files are, and the trainer's command line.

The trainer writes a run directory, ``srcid export``, ``srcid eval``/``encode``/``inspect`` and the study read it,
and the study starts the trainer as a subprocess. Everything these must agree on is declared here once:

* :class:`RunConfig`, its defaults, the profiles and the run-config keys that were renamed (:data:`RENAMED_KEYS`):
  :data:`DEFAULT_BATCH_SIZE`; :data:`DEFAULT_SEED`,
  :data:`PRESETS` and :data:`VARIANTS` come from the model package (the model config's own seed defaults to the
  same value, and a module of the model cannot import this one);
* the run directory's file names (the metrics logger keeps the names of its own files, imported here);
* the default DeepSpeed configs, shipped inside the package so that an installed srcid finds them;
* the ``--kernels`` flag every compute command takes;
* the trainer's command line: :func:`build_parser` and :func:`resolve_config` read it, :func:`train_command`
  writes it (with the launch prefix for one or several processes), so what the study runs is what the trainer
  parses.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import shutil
import sys
from pathlib import Path
from typing import Optional

from srcid.config import apply_overrides, from_dict, to_dict, with_absent_keys
from srcid.errors import SrcidError
from srcid.files import read_json_object
from srcid.model import DEFAULT_SEED, PRESETS, VARIANTS, ModelConfig, model_config
from srcid.model.config import ABSENT_MEANS as MODEL_ABSENT_MEANS
from srcid.ops import IMPLS as KERNEL_CHOICES
from srcid.ops import set_kernels
from srcid.train.collapse import CollapseConfig
from srcid.train.distributed import free_port
from srcid.train.metrics_log import EVENTS_FILE, METRICS_CSV
from srcid.train.warm_start import ABSENT_MEANS as WARM_START_ABSENT_MEANS
from srcid.train.warm_start import WarmStartConfig

__all__ = [
    "CHECKPOINTS_DIR", "DEFAULT_BATCH_SIZE", "DEFAULT_SEED", "EVENTS_FILE", "KERNEL_CHOICES", "METRICS_CSV",
    "MODEL_FILE", "PRESETS", "PROFILES", "RENAMED_KEYS", "RUN_CONFIG_FILE", "RunConfig", "TRAINER_MODULE",
    "TRAIN_STATE_FILE", "VARIANTS", "add_kernels_flag", "apply_profile_and_overrides", "build_parser",
    "default_ds_config", "default_run_config", "kernels_argv", "load_run_config", "resolve_config", "train_argv",
    "train_command", "use_kernels",
]

# --------------------------------------------------------------------------- the run directory

RUN_CONFIG_FILE = "run_config.json"  # the resolved RunConfig, written once by a new run; marks a run directory
MODEL_FILE = "model.safetensors"  # the exported model (with its model.json sidecar), written at the end
CHECKPOINTS_DIR = "checkpoints"  # step-N/ folders (srcid.train.checkpoint)
TRAIN_STATE_FILE = "train_state.json"  # in every checkpoint: step, epoch, warm-start and collapse state

# --------------------------------------------------------------------------- defaults

DEFAULT_BATCH_SIZE = 80  # clips per rank and micro-step: the paper's batch; the study's global batch
DS_CONFIG_DIR = Path(__file__).resolve().parent / "train"
DS_CONFIG_FILES = {"cuda": "ds_config_gpu.json", "cpu": "ds_config_cpu.json"}
TRAINER_MODULE = "srcid.train.launch"  # what `python -m` and `deepspeed --module` run

# Run-config keys that were renamed: the old name, in --set or in a saved run_config.json, is a one-line error naming
# the new one (read silently as the new key or ignored, an old command line or run would change without a word).
RENAMED_KEYS = {
    # layer 2's whole loss weight; the old name read like model.weights.mi_layer2, which scales only its CLUB term
    "warm_start.mi_layer2_weight": "warm_start.layer2_loss_weight",
}

# Profiles: named sets of run-config settings, applied before the command line's own --set items (which win).
PROFILES = {
    "default": (),
    # every choice of the authors' code that the project offers as an option (docs/METHOD.md)
    "authors": (
        "model.normalize_inputs=false", "model.quantizer.init=uniform", "model.quantizer.dead_code=steps",
        "model.quantizer.dead_code_source=active_code", "model.video_specific=head", "model.text_mask=false",
        "model.text_target=lstm", "model.layer2_detach_target=false", "model.layer2_input_norm=none",
        "model.layer2_center=false",
        "model.club.standardize_y=false", "model.club.logvar_range=1", "model.club.estimator=sampled",
        "model.cpc.lstm_layers=2", "model.weights.average_layers=false",
        "warm_start.mode=epoch", "warm_start.switch_epoch=3", "warm_start.epoch_layer2_weight=0.3",
        "warm_start.mi_rel_threshold=0",
    ),
}


def default_ds_config(device_type: str) -> Path:
    """The package's DeepSpeed config for a device type: bf16 on CUDA, fp32 otherwise."""
    return DS_CONFIG_DIR / DS_CONFIG_FILES["cuda" if device_type == "cuda" else "cpu"]


# --------------------------------------------------------------------------- the run config


@dataclasses.dataclass
class RunConfig:
    """Everything a training run is made of; ``--set key=value`` reaches every leaf."""

    variant: str = "srcid"
    preset: str = "small"
    profile: str = "default"  # a named set of settings (PROFILES), applied before --set; "authors": the authors' code
    split: str = "train"
    epochs: int = 6
    max_steps: Optional[int] = None
    batch_size: int = DEFAULT_BATCH_SIZE  # clips per rank and micro-step
    gradient_accumulation: int = 1
    zero_stage: int = 0
    lr: float = 4e-4
    grad_clip: float = 0.5
    seed: int = DEFAULT_SEED
    num_workers: int = 1
    log_every: int = 10
    checkpoint_every: int = 500
    keep_last: int = 3
    timeout_s: float = 120.0
    input_stats_clips: int = 0  # clips read to fit the input normaliser before step 1 (0: the whole split)
    centre_clips: int = 2000  # clips that set layer 2's centre after the last step (model.layer2_center; 0: the split)
    model: Optional[ModelConfig] = None
    warm_start: WarmStartConfig = dataclasses.field(default_factory=WarmStartConfig)
    collapse: CollapseConfig = dataclasses.field(default_factory=CollapseConfig)

    def validate(self) -> "RunConfig":
        if self.variant not in VARIANTS:
            raise SrcidError(f"--model {self.variant!r}: choose one of {', '.join(VARIANTS)}")
        if self.preset not in PRESETS:
            raise SrcidError(f"--preset {self.preset!r}: choose one of {', '.join(PRESETS)}")
        if self.profile not in PROFILES:
            raise SrcidError(f"config key profile={self.profile!r}: choose one of {', '.join(PROFILES)}")
        for name in ("epochs", "batch_size", "gradient_accumulation", "log_every", "checkpoint_every", "keep_last"):
            if getattr(self, name) < 1:
                raise SrcidError(f"config key {name}: must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise SrcidError(f"config key max_steps: must be >= 1, got {self.max_steps}")
        # Checkpoints fall on accumulation boundaries, so no accumulated gradient is ever lost on resume.
        if self.checkpoint_every % self.gradient_accumulation:
            raise SrcidError(f"config key checkpoint_every={self.checkpoint_every}: must be a multiple of "
                             f"gradient_accumulation={self.gradient_accumulation}")
        if self.zero_stage not in (0, 1, 2):
            raise SrcidError(f"config key zero_stage: must be 0, 1 or 2, got {self.zero_stage}")
        if self.num_workers < 0:
            raise SrcidError(f"config key num_workers: must be >= 0, got {self.num_workers}")
        if self.input_stats_clips < 0:
            raise SrcidError(f"config key input_stats_clips: must be >= 0 (0: the whole split), got {self.input_stats_clips}")
        if self.centre_clips < 0:
            raise SrcidError(f"config key centre_clips: must be >= 0 (0: the whole split), got {self.centre_clips}")
        if not (self.lr > 0 and self.grad_clip >= 0):
            raise SrcidError("config keys lr (> 0) and grad_clip (>= 0) are out of range")
        self.model.validate()
        self.warm_start.validate()
        self.collapse.validate()
        return self


def default_run_config(variant: str, preset: str) -> RunConfig:
    model = model_config(preset)
    # The shard reader already rejects NaN/Inf in every sample it reads; the model's own check
    # would cost a host synchronisation per step.
    model.check_finite = False
    return RunConfig(variant=variant, preset=preset, model=model)


def refuse_renamed_keys(keys, where: str = "") -> None:
    """A one-line error naming the new key when one of ``keys`` (dotted run-config keys) was renamed."""
    for key in keys:
        if key in RENAMED_KEYS:
            raise SrcidError(f"{where}config key {key}: renamed to {RENAMED_KEYS[key]}")


def _set_keys(overrides) -> list:
    return [item.split("=", 1)[0].strip() for item in overrides]


def _dotted_keys(data: dict, prefix: str = "") -> list:
    keys = []
    for key, value in data.items():
        keys += _dotted_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [prefix + key]
    return keys


def apply_profile_and_overrides(config: RunConfig, overrides: list) -> RunConfig:
    """``--set`` items on ``config``: a ``profile=NAME`` item first brings in that profile's settings, then every
    other item is applied in order, so an explicit setting wins over the profile's."""
    refuse_renamed_keys(_set_keys(overrides))
    profiles = [item.split("=", 1)[1].strip() for item in overrides if item.split("=", 1)[0].strip() == "profile"]
    rest = [item for item in overrides if item.split("=", 1)[0].strip() != "profile"]
    if profiles:
        name = profiles[-1]
        if name not in PROFILES:
            raise SrcidError(f"--set profile={name}: choose one of {', '.join(PROFILES)}")
        config.profile = name
        apply_overrides(config, list(PROFILES[name]))
    apply_overrides(config, rest)
    return config.validate()


def load_run_config(path: Path) -> RunConfig:
    """A :class:`RunConfig` from a run directory's ``run_config.json``.

    A key added to a config since the file was written gets the value that reproduces the file's run
    (``ABSENT_MEANS``); a key since renamed is an error naming the new one."""
    data = read_json_object(path)
    refuse_renamed_keys(_dotted_keys(data), f"{path}: ")
    config = from_dict(RunConfig, {k: v for k, v in data.items() if k not in ("model", "warm_start")}, str(path))
    config.model = from_dict(ModelConfig, with_absent_keys(data["model"], MODEL_ABSENT_MEANS), f"{path}: model")
    config.warm_start = from_dict(WarmStartConfig, with_absent_keys(data["warm_start"], WARM_START_ABSENT_MEANS),
                                  f"{path}: warm_start")
    return config


# --------------------------------------------------------------------------- the --kernels flag


def add_kernels_flag(parser: argparse.ArgumentParser) -> None:
    """The ``--kernels`` flag every compute command takes (see :mod:`srcid.ops`)."""
    parser.add_argument(
        "--kernels", choices=KERNEL_CHOICES, default=None,
        help="implementation of the hot ops (default: $SRCID_KERNELS, else auto = fused on CUDA)",
    )


def kernels_argv(choice: Optional[str]) -> list:
    """``--kernels CHOICE`` for a child command's argv (nothing without a choice: the child keeps its default)."""
    return ["--kernels", choice] if choice else []


def use_kernels(args) -> None:
    """Select the hot-op implementation a command's ``--kernels`` names (none given: leave the default)."""
    if getattr(args, "kernels", None):
        set_kernels(args.kernels)


# --------------------------------------------------------------------------- the trainer's command line


def build_parser(prog: str = "srcid train") -> argparse.ArgumentParser:
    """The trainer's flags; ``prog`` is the command the user typed (``launcher/train.py`` passes its own)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train SRCID or a DCID baseline (one process, or many through the deepspeed launcher).",
    )
    parser.add_argument("--model", choices=VARIANTS, default=None, help="method variant (default srcid)")
    parser.add_argument("--preset", choices=PRESETS, default=None,
                        help="model sizes (tiny, small: CPU; paper: GPU; default small)")
    parser.add_argument("--data", type=Path, required=True, help="pretraining dataset folder (with dataset.json)")
    parser.add_argument("--out", type=Path, required=True, help="run directory (checkpoints, logs, exported model)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (micro-batches; a multiple of gradient_accumulation)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs over the training split (default 6)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                        help="continue the run in --out from its newest intact checkpoint (a corrupt newer one is "
                             "skipped, with a warning), or from the checkpoint named (step-00001234 or 1234; an "
                             "error if it is corrupt)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the run already in --out and start a new one (without it, a new run refuses a "
                             "folder that is not empty)")
    add_kernels_flag(parser)
    parser.add_argument("--deepspeed_config", type=Path, default=None,
                        help=f"DeepSpeed JSON config (default: the package's {DS_CONFIG_FILES['cuda']} on CUDA, "
                             f"{DS_CONFIG_FILES['cpu']} otherwise); the run config sets its micro batch, "
                             "accumulation, ZeRO stage, lr and clipping")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any run-config key, e.g. --set batch_size=40 --set model.quantizer.codebook_size=512 "
                             "--set warm_start.mode=epoch (an unknown key lists the valid ones); --set profile=authors "
                             "selects every choice of the authors' code at once")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def resolve_config(args) -> RunConfig:
    """The run config: saved one on resume (flags may not change it), else defaults + flags + overrides."""
    config_path = args.out / RUN_CONFIG_FILE
    if args.resume and getattr(args, "overwrite", False):
        raise SrcidError("--resume continues the run in --out, --overwrite deletes it: give one of them")
    if args.resume:
        if not config_path.is_file():
            raise SrcidError(f"--resume: {config_path} not found: {args.out} is not a run directory")
        config = load_run_config(config_path)
        for flag, given, saved in (("--model", args.model, config.variant), ("--preset", args.preset, config.preset)):
            if given is not None and given != saved:
                raise SrcidError(f"--resume: {args.out} is a {flag} {saved} run; {flag} {given} would change it")
        # The same command line may be repeated with --resume; it may not change the run.
        refuse_renamed_keys(_set_keys(args.overrides))
        changed = [item.split("=", 1)[0] for item in args.overrides
                   if to_dict(apply_overrides(copy.deepcopy(config), [item])) != to_dict(config)]
        if changed:
            raise SrcidError(f"--resume continues the saved run config ({config_path}); --set would change {', '.join(changed)}")
        if args.max_steps is not None:
            config.max_steps = args.max_steps
        if args.epochs is not None:
            config.epochs = args.epochs
        return config.validate()
    config = default_run_config(args.model or "srcid", args.preset or "small")
    if args.max_steps is not None:
        config.max_steps = args.max_steps
    if args.epochs is not None:
        config.epochs = args.epochs
    return apply_profile_and_overrides(config, args.overrides)


def train_argv(*, variant: str, preset: str, data: Path, out: Path, epochs: Optional[int] = None,
               max_steps: Optional[int] = None, overrides=(), kernels: Optional[str] = None, resume: bool = False,
               quiet: bool = False) -> list:
    """The trainer's arguments for these settings: what :func:`build_parser` reads back into the same values."""
    argv = ["--model", variant, "--preset", preset, "--data", str(data), "--out", str(out)]
    if epochs is not None:
        argv += ["--epochs", str(epochs)]
    if quiet:
        argv.append("--quiet")
    if max_steps is not None:
        argv += ["--max-steps", str(max_steps)]
    for item in overrides:
        argv += ["--set", item]
    argv += kernels_argv(kernels)
    if resume:
        argv.append("--resume")
    return argv


def deepspeed_runner() -> str:
    """The ``deepspeed`` command: the one installed beside this interpreter, else the one on PATH."""
    beside = Path(sys.executable).parent / "deepspeed"
    found = str(beside) if beside.is_file() else shutil.which("deepspeed")
    if not found:
        raise SrcidError("--processes > 1 needs the deepspeed launcher, found neither beside python nor on PATH")
    return found


def launch_prefix(processes: int) -> list:
    """How to start the trainer as installed (no checkout needed): this interpreter on :data:`TRAINER_MODULE` for
    one process, the deepspeed runner with ``--module`` on a free local port for several."""
    if processes == 1:
        return [sys.executable, "-m", TRAINER_MODULE]
    return [deepspeed_runner(), "--num_gpus", str(processes), "--master_port", str(free_port()), "--module",
            TRAINER_MODULE]


def train_command(processes: int = 1, **settings) -> list:
    """The whole command that trains with ``settings`` (the keywords of :func:`train_argv`) on ``processes``
    processes."""
    return launch_prefix(processes) + train_argv(**settings)
