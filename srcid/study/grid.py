"""The study's grid: the training runs (cells) behind Tables I-III and Fig. 3, and the per-preset plan.

A cell is one training run plus its evaluations. The grid of a preset:

* ``srcid``: SRCID at the preset's codebook size with CLUB in both layers;
  evaluated with layers 1,2 (SRCID) and layer 1 (SRCID(only1)). Tables II
  and III, and the reference point of both Fig. 3 panels.
* ``dcid-vq``, ``dcid-fsq``, ``dcid-rvq2``, ``dcid-rvq3``, ``dcid-rvq4``:
  the DCID quantizer baselines (Table I; ``dcid-vq`` is also DCID in
  Tables II and III).
* ``srcid-no-club-l1``, ``srcid-no-club-l2``: SRCID without the CLUB loss
  in layer 1 / layer 2 (Fig. 3, CLUB ablation).
* ``srcid-codebook-<size>``: SRCID at other codebook sizes (Fig. 3,
  codebook-size ablation).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import re
from typing import Optional

from srcid.errors import SrcidError
from srcid.model import model_config
from srcid.run import DEFAULT_BATCH_SIZE, DEFAULT_SEED, PRESETS

CODEBOOK_KEY = "model.quantizer.codebook_size"
# Per-layer factors on the CLUB MI loss weight (the effective weight of layer k is weights.mi x this factor).
CLUB_LAYER_KEYS = {1: "model.weights.mi_layer1", 2: "model.weights.mi_layer2"}
LAYERS_FULL = "1,2"
LAYERS_ONLY1 = "1"
QUANTIZER_BASELINES = (
    ("dcid-vq", "dcid", "DCID(VQ)"),
    ("dcid-fsq", "dcid-fsq", "DCID(FSQ)"),
    ("dcid-rvq2", "dcid-rvq2", "DCID(RVQ-2)"),
    ("dcid-rvq3", "dcid-rvq3", "DCID(RVQ-3)"),
    ("dcid-rvq4", "dcid-rvq4", "DCID(RVQ-4)"),
)
CLUB_SETTINGS = {"both": "CLUB in both layers", 1: "no CLUB in layer 1", 2: "no CLUB in layer 2"}
TRAIN_SEED_KEYS = ("seed", "model.seed")  # what a training seed sets: weights, data order, the model's own draws


@dataclasses.dataclass(frozen=True)
class Plan:
    """How long each cell trains and how it is evaluated, for one preset."""

    preset: str
    epochs: int  # epochs over the pretraining split
    max_steps: Optional[int]  # optimizer steps, when it stops before the epochs run out
    log_every: int  # steps between metric rows (the MI curves' resolution)
    seeds: int  # head seeds per evaluation
    epochs_cls: int  # classification head epochs
    epochs_loc: int  # localization head epochs
    codebook_factors: tuple  # Fig. 3 sizes, as multiples of the preset's codebook size
    # clips per optimizer step over all processes: the trainer's default batch (the paper's), whatever the processes
    global_batch: int = DEFAULT_BATCH_SIZE


PLANS = {
    # Test-suite smoke run: 8 steps (224 clips, batch 80: 2 steps per epoch), so the
    # warm-start fallback (epoch 3, step 6) happens inside the run.
    "tiny": Plan("tiny", epochs=4, max_steps=8, log_every=1, seeds=1, epochs_cls=2, epochs_loc=2,
                 codebook_factors=(0.5, 1.0, 2.0)),
    # About 80 minutes on 2 CPU cores (docs/STUDY.md has the arithmetic): 20 epochs = 900 steps per cell.
    "small": Plan("small", epochs=20, max_steps=None, log_every=10, seeds=3, epochs_cls=30, epochs_loc=50,
                  codebook_factors=(0.25, 0.5, 1.0, 1.5, 2.0)),
    # The paper's schedule: 6 epochs, batch 80, heads 30/50 epochs.
    "paper": Plan("paper", epochs=6, max_steps=None, log_every=10, seeds=3, epochs_cls=30, epochs_loc=50,
                  codebook_factors=(0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)),
}


@dataclasses.dataclass(frozen=True)
class Cell:
    """One training run and its evaluations."""

    name: str
    variant: str  # the trainer's --model
    label: str  # what the cell stands for in tables and plots
    overrides: tuple = ()  # the trainer's --set KEY=VALUE items specific to this cell
    layers: tuple = (LAYERS_ONLY1,)  # one evaluation per entry: "1" or "1,2"
    codebook_size: int = 0
    club: object = "both"  # "both", or the layer (1 or 2) whose CLUB loss is off
    train_seed: int = DEFAULT_SEED
    base: str = ""  # the cell this one repeats with another training seed ("": itself)

    @property
    def group(self) -> str:
        """The name its results are pooled under: the cell trained with the default seed."""
        return self.base or self.name


def plan_for(preset: str) -> Plan:
    if preset not in PLANS:
        raise SrcidError(f"--preset {preset!r}: choose one of {', '.join(PRESETS)}")
    return PLANS[preset]


def codebook_sizes(plan: Plan, default_size: int) -> tuple:
    """Fig. 3's codebook sizes: the plan's factors times the preset's size, rounded, distinct, ascending."""
    sizes = sorted({max(2, int(round(f * default_size))) for f in plan.codebook_factors} | {default_size})
    return tuple(sizes)


def preset_codebook_size(preset: str) -> int:
    """The codebook size of ``preset``'s model (the ``srcid`` cell's; Fig. 3's sizes are multiples of it)."""
    return model_config(preset).quantizer.codebook_size


def build_grid(plan: Plan, default_size: Optional[int] = None) -> list:
    """Every cell of ``plan``'s study, most important first; ``default_size``: the preset's codebook size unless
    given. Only the codebook-size cells set the size (to another one); every other cell trains the preset's."""
    if default_size is None:
        default_size = preset_codebook_size(plan.preset)
    cells = [Cell("srcid", "srcid", "SRCID", layers=(LAYERS_FULL, LAYERS_ONLY1), codebook_size=default_size)]
    for name, variant, label in QUANTIZER_BASELINES:
        cells.append(Cell(name, variant, label, codebook_size=default_size))
    for layer in (1, 2):
        cells.append(Cell(f"srcid-no-club-l{layer}", "srcid", CLUB_SETTINGS[layer],
                          overrides=(f"{CLUB_LAYER_KEYS[layer]}=0",), layers=(LAYERS_FULL,),
                          codebook_size=default_size, club=layer))
    for size in codebook_sizes(plan, default_size):
        if size != default_size:
            cells.append(Cell(f"srcid-codebook-{size}", "srcid", f"codebook {size}", overrides=(f"{CODEBOOK_KEY}={size}",),
                              layers=(LAYERS_FULL,), codebook_size=size))
    return cells


def train_seed_list(count: int) -> list:
    """``count`` training seeds: the trainer's default (:data:`srcid.run.DEFAULT_SEED`), then 1, 2, ..."""
    return [DEFAULT_SEED] + list(range(1, count))


def with_train_seeds(cells: list, seeds: list) -> list:
    """Each cell, then its repeats with the other training seeds (``<name>-seed<S>``), in grid order.

    A repeat adds ``--set seed=S --set model.seed=S`` to the cell's overrides.
    """
    out = []
    for cell in cells:
        out.append(cell)
        for seed in seeds[1:]:
            out.append(dataclasses.replace(
                cell, name=f"{cell.name}-seed{seed}", train_seed=seed, base=cell.name,
                overrides=cell.overrides + tuple(f"{key}={seed}" for key in TRAIN_SEED_KEYS)))
    return out


def _regex(pattern: str):
    try:
        return re.compile(pattern)
    except re.error:
        return None


def matches(name: str, pattern: str) -> bool:
    """Whether a cell name matches ``pattern``: a glob on the whole name, or a regular expression found in it."""
    if fnmatch.fnmatchcase(name, pattern):
        return True
    regex = _regex(pattern)
    return regex is not None and regex.search(name) is not None


def select(cells: list, patterns) -> list:
    """The cells matching any of ``patterns`` (all cells when there is none); each pattern must match one.

    A repeat with another training seed also matches through the name of the cell it repeats.
    """
    if not patterns:
        return list(cells)
    hit = lambda cell, p: matches(cell.name, p) or (cell.base and matches(cell.base, p))  # noqa: E731
    for pattern in patterns:
        if not any(hit(cell, pattern) for cell in cells):
            names = [cell.name for cell in cells]
            raise SrcidError(f"--only {pattern!r} matches no cell; the cells are {', '.join(names)}")
    return [cell for cell in cells if any(hit(cell, p) for p in patterns)]
