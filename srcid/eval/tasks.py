"""The paper's downstream tasks on a frozen model, from dataset folders to result tables.

A task is prepared first (:func:`prepare`: task folders, splits,
modalities, labels and class sets are checked and the features encoded,
so bad input fails before any head trains), then run (:func:`run_probe`,
:func:`run_retrieval`). :func:`evaluate` does both for a list of tasks and
returns the JSON-ready report; :func:`result_tables` builds the paper's
Tables I-III from it.

Directions: ``V->A`` trains a head on video and tests it on audio, ``A->V``
the reverse; ``V->V`` and ``A->A`` are the same-modality rows (Table I's
``m -> m``). Protocols (``docs/EVALUATION.md``):

* ``default``: the head after the last epoch, tested on held-out splits.
* ``authors``: every head keeps its best epoch (selected on the test data,
  as the authors' evaluation does), AVE's cross-modal heads are tested on
  the ``train`` split of the other modality, and localization heads halve
  their learning rate after epochs 10, 20 and 30.
* ``val``: for choosing model settings without touching a test split. Each
  head trains on the fit part of its train split and is tested on the
  held-out part of the corresponding train split of the other side (a clip
  is held out when the SHA-1 of its key is 0 mod :data:`VAL_HELD_OUT_EVERY`,
  the same clips for every modality); retrieval runs on the pretraining
  set's ``val`` split (``DATA_DIR/pretrain``) or is skipped. Heads as in
  ``default``.

Localization targets get a background column (a segment without any event)
unless ``background=False``: it is counted in AVVP's precision like any
class ("25 + background"), and left out of AVE -> AVVP's F1, which is taken
over the shared classes.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from srcid.data.manifest import MANIFEST_NAME, Manifest, load_manifest
from srcid.errors import SrcidError
from srcid.eval.features import FeatureEncoder, SplitFeatures, SplitScan, check_model_input, scan_split
from srcid.eval.metrics import retrieval_report
from srcid.eval.probe import (HEAD_BATCH_SIZE, evaluate_classification, evaluate_localization, run_seeds, seed_list,
                              train_head)
from srcid.eval.tables import AVVP_F1, table1, table2, table3

TASKS = ("ave", "avvp", "ave-avvp", "ucf-vgg", "retrieval")
TASK_FOLDERS = {"ave": "ave", "avvp": "avvp", "ave-avvp": "ave_avvp", "ucf-vgg": "ucf_vgg", "retrieval": "retrieval"}
TABLE_METRIC = {"ave": "accuracy", "avvp": "precision", "ave-avvp": "f1", "ucf-vgg": "accuracy"}
PROTOCOLS = ("default", "authors", "val")
AUTHORS_LOC_MILESTONES = (10, 20, 30)
MODALITY = {"A": "audio", "V": "video"}
CROSS = ("V->A", "A->V")
SAME = ("V->V", "A->A")
UCF_VGG_SPLITS = {"ucf": ("video", "ucf_train", "ucf_test"), "vgg": ("audio", "vgg_train", "vgg_test")}
RETRIEVAL_SPLIT = "test"
VAL_HELD_OUT_EVERY = 5  # --protocol val holds out 1 clip in 5 (about 20%): those whose SHA-1 of the key is 0 mod 5
VAL_FIT, VAL_HELD_OUT = "fit", "held-out"  # the two parts of a train split under --protocol val
VAL_RETRIEVAL_FOLDER, VAL_RETRIEVAL_SPLIT = "pretrain", "val"  # retrieval under --protocol val
RETRIEVAL_PAIRS = {"video-text": ("video", "V"), "audio-text": ("audio", "A")}
METHOD_NAMES = {"srcid": "SRCID", "dcid": "DCID(VQ)", "dcid-fsq": "DCID(FSQ)", "dcid-rvq": "DCID(RVQ)",
                "dcid-rvq2": "DCID(RVQ-2)", "dcid-rvq3": "DCID(RVQ-3)", "dcid-rvq4": "DCID(RVQ-4)"}


@dataclasses.dataclass
class EvalSettings:
    """How heads are trained and selected (the method notes' values by default)."""

    protocol: str = "default"
    seeds: list = dataclasses.field(default_factory=lambda: seed_list(3))
    epochs_cls: int = 30
    epochs_loc: int = 50
    background: bool = True
    batch_size: int = HEAD_BATCH_SIZE
    lr: float = 4e-4
    grad_clip: float = 0.5
    hidden: int = 256
    device: str = "cpu"  # where heads train
    progress: bool = False

    def validate(self) -> "EvalSettings":
        if self.protocol not in PROTOCOLS:
            raise SrcidError(f"--protocol {self.protocol}: choose one of {', '.join(PROTOCOLS)}")
        if not self.seeds:
            raise SrcidError("--seeds: need at least 1")
        if self.epochs_cls < 1 or self.epochs_loc < 1:
            raise SrcidError(f"--epochs-cls {self.epochs_cls} / --epochs-loc {self.epochs_loc}: need at least 1 epoch")
        return self

    @property
    def keep(self) -> str:
        return "best" if self.protocol == "authors" else "last"


@dataclasses.dataclass
class Probe:
    """One head experiment: a table cell (task and direction)."""

    task: str
    direction: str
    kind: str  # "classification" or "localization"
    train: SplitFeatures
    test: SplitFeatures
    train_targets: torch.Tensor  # [N] class indices or [N, T, C] 0/1
    test_targets: torch.Tensor
    num_classes: int
    metric: str  # the metric the table shows and "best" epochs are selected by
    exclude_classes: tuple = ()
    note: str = ""


@dataclasses.dataclass
class RetrievalSet:
    """Zero-shot retrieval between grouped items of one modality and captions."""

    name: str  # "video-text" or "audio-text"
    short: str  # "V" or "A"
    items: SplitFeatures
    text: SplitFeatures
    groups: list  # per clip, the index of its item (clips sharing a recording share an item)


class TaskSkipped(Exception):
    """A task that the protocol cannot run on the data given (not an error): its reason is printed instead."""


def val_part(key: str) -> str:
    """The part of its split a clip is in under ``--protocol val``: ``"held-out"`` or ``"fit"``.

    A function of the clip's key only (not of shard order, modality or model).
    """
    digest = int(hashlib.sha1(str(key).encode("utf-8")).hexdigest(), 16)
    return VAL_HELD_OUT if digest % VAL_HELD_OUT_EVERY == 0 else VAL_FIT


def task_folders(protocol: str) -> dict:
    """``{task: folder under DATA_DIR}`` a protocol reads (``val``: retrieval reads the pretraining set)."""
    folders = dict(TASK_FOLDERS)
    if protocol == "val":
        folders["retrieval"] = VAL_RETRIEVAL_FOLDER
    return folders


# --------------------------------------------------------------------------- checks and reading


class TaskData:
    """The task folders under DATA_DIR, read on demand: manifests, scans and features (all cached)."""

    def __init__(self, data_dir, encoder: FeatureEncoder, protocol: str = "default"):
        self.data_dir, self.encoder, self.protocol = Path(data_dir), encoder, protocol
        self.folders = task_folders(protocol)
        self._manifests: dict = {}
        self._scans: dict = {}
        self._parts: dict = {}

    def folder_path(self, task: str) -> Path:
        """Where ``task``'s folder is under this protocol (whether or not it exists)."""
        return self.data_dir / self.folders[task]

    def folder(self, task: str) -> Path:
        folder = self.folder_path(task)
        if not folder.is_dir():
            raise SrcidError(f"{folder}: missing task folder, which --task {task} reads "
                             f"(DATA_DIR holds {', '.join(f + '/' for f in TASK_FOLDERS.values())})")
        return folder

    def manifest(self, task: str) -> Manifest:
        if task not in self._manifests:
            self._manifests[task] = load_manifest(self.folder(task))
        return self._manifests[task]

    def scan(self, task: str, split: str) -> SplitScan:
        key = (task, split)
        if key not in self._scans:
            self._scans[key] = scan_split(self.folder(task), split, needed_by=f"--task {task}")
        return self._scans[key]

    def check(self, task: str, split: str, modality: str, needs: Optional[str]) -> SplitScan:
        """Check that every clip of ``split`` carries ``modality`` and the labels ``needs``.

        ``needs``: ``"label"`` (clip labels), ``"segments"`` (per-segment
        labels of ``modality``) or ``None``.
        """
        manifest = self.manifest(task)
        check_model_input(self.encoder.model, manifest, modality, f"--task {task} (split {split})")
        scan = self.scan(task, split)
        _require(scan, task, lambda k: modality in scan.carried[k], f"carry no {modality} ({modality}.npy)")
        if needs == "label":
            _require(scan, task, lambda k: scan.metas[k].get("label") is not None, "have no clip label (meta.json label)")
        elif needs == "segments":
            _require(scan, task, lambda k: modality in (scan.metas[k].get("segments") or {}),
                     f"have no per-segment {modality} labels (meta.json segments.{modality})")
        return scan

    def part_keys(self, task: str, split: str, part: str) -> list:
        """The keys of the clips of ``split`` in ``part`` (:func:`val_part`), in shard order; an error when none is."""
        scan = self.scan(task, split)
        keys = [k for k in scan.keys if val_part(k) == part]
        if not keys:
            raise SrcidError(f"{scan.where()}: none of its {len(scan)} clips falls in the {part} part, which --task "
                             f"{task} --protocol val needs (a clip is held out when the SHA-1 of its key is 0 mod "
                             f"{VAL_HELD_OUT_EVERY}; the rest is the fit part)")
        return keys

    def features(self, task: str, split: str, modality: str, needs: Optional[str], *, digests: bool = False,
                 part: Optional[str] = None) -> SplitFeatures:
        """The encoded ``modality`` of ``split``, after :meth:`check`; with ``part``, only that part's clips."""
        features = self.encoder.split(self.check(task, split, modality, needs), modality, digests=digests)
        if part is None:
            return features
        key = (task, split, modality, digests, part)
        if key not in self._parts:
            keys = set(self.part_keys(task, split, part))
            self._parts[key] = features.subset([i for i, k in enumerate(features.keys) if k in keys], part)
        return self._parts[key]


def _require(scan: SplitScan, task: str, predicate, what: str) -> None:
    missing = scan.lacking(predicate)
    if missing:
        raise SrcidError(f"{scan.where()}: {len(missing)} of {len(scan)} clips {what}, which --task {task} needs "
                         f"(first: {missing[0]})")


def _classes_used(scan: SplitScan, modalities, keys=None) -> set:
    """Class indices a split's clips (or those of ``keys``) use: clip labels and per-segment labels of ``modalities``."""
    used = set()
    for meta in (scan.metas.values() if keys is None else (scan.metas[k] for k in keys)):
        if meta.get("label") is not None:
            used.add(meta["label"])
        for m in modalities:
            for step in (meta.get("segments") or {}).get(m, []):
                used.update(step)
    return used


def _names(manifest: Manifest, indices) -> str:
    return ", ".join(repr(manifest.classes[i]) if 0 <= i < len(manifest.classes) else str(i) for i in sorted(indices))


def localization_targets(features: SplitFeatures, background: bool) -> torch.Tensor:
    """``[N, T, C]`` segment labels, plus a background column (no event in the segment) when asked."""
    targets = features.segments
    if background:
        targets = torch.cat([targets, (targets.sum(-1, keepdim=True) == 0).to(targets.dtype)], dim=-1)
    return targets


# --------------------------------------------------------------------------- preparing the tasks


def _split_pair(direction: str) -> tuple:
    return MODALITY[direction[0]], MODALITY[direction[-1]]


def _train_split_of(task: str, split: str) -> str:
    """The train split that stands in for ``split`` under ``--protocol val`` (a train split stands for itself)."""
    if task == "ucf-vgg":
        return {test: train for _, train, test in UCF_VGG_SPLITS.values()}.get(split, split)
    return "train"


def _protocol_plan(task: str, plan: dict, settings: EvalSettings) -> dict:
    """``{direction: ((split, modality, part), (split, modality, part))}``: ``plan`` as the protocol reads it.

    ``part`` is ``None`` (every clip of the split) except under ``val``,
    where the head trains on the fit part of its train split and is tested
    on the held-out part of the train split corresponding to its test split.
    """
    if settings.protocol != "val":
        return {d: ((*train, None), (*test, None)) for d, (train, test) in plan.items()}
    return {d: ((train[0], train[1], VAL_FIT), (_train_split_of(task, test[0]), test[1], VAL_HELD_OUT))
            for d, (train, test) in plan.items()}


def _reads(plan: dict) -> list:
    return list(dict.fromkeys(read for pair in plan.values() for read in pair))


def _val_note(train: tuple, test: tuple) -> str:
    return (f"--protocol val: trained on the {train[2]} part of split {train[0]}, tested on the {test[2]} part of "
            f"split {test[0]} (1 clip in {VAL_HELD_OUT_EVERY} held out by key hash)")


def _check_all(data: TaskData, task: str, reads, needs: str) -> None:
    """Check every ``(split, modality, part)`` a task reads before any of them is encoded."""
    for split, modality, part in reads:
        data.check(task, split, modality, needs)
        if part is not None:
            data.part_keys(task, split, part)


def _read_all(data: TaskData, task: str, reads, needs: str) -> dict:
    """``{(split, modality, part): features}`` of every read, all checked first."""
    _check_all(data, task, reads, needs)
    return {(split, modality, part): data.features(task, split, modality, needs, part=part)
            for split, modality, part in dict.fromkeys(reads)}


def _ave_plan(settings: EvalSettings) -> dict:
    """``{direction: ((train split, modality), (test split, modality))}`` of AVE under the protocol."""
    plan = {}
    for direction in CROSS + SAME:
        source, target = _split_pair(direction)
        test_split = "train" if source != target and settings.protocol == "authors" else "test"
        plan[direction] = (("train", source), (test_split, target))
    return plan


def prepare_ave(data: TaskData, settings: EvalSettings) -> list:
    manifest = data.manifest("ave")
    plan = _protocol_plan("ave", _ave_plan(settings), settings)
    feats = _read_all(data, "ave", _reads(plan), "label")
    probes = []
    for direction, (train, test) in plan.items():
        if test[2] is not None:
            note = _val_note(train, test)
        else:
            note = "tested on the train split of the other modality (authors' protocol)" if test[0] == "train" else ""
        probes.append(Probe("ave", direction, "classification", feats[train], feats[test], feats[train].labels,
                            feats[test].labels, manifest.num_classes, "accuracy", note=note))
    return probes


def _localization_probe(task: str, direction: str, train: SplitFeatures, test: SplitFeatures, manifest: Manifest,
                        settings: EvalSettings, metric: str, exclude_background: bool, note: str = "") -> Probe:
    classes = manifest.num_classes + (1 if settings.background else 0)
    exclude = (manifest.num_classes,) if settings.background and exclude_background else ()
    return Probe(task, direction, "localization", train, test, localization_targets(train, settings.background),
                 localization_targets(test, settings.background), classes, metric, exclude_classes=exclude, note=note)


def _train_test_plan(directions) -> dict:
    return {d: (("train", _split_pair(d)[0]), ("test", _split_pair(d)[1])) for d in directions}


def prepare_avvp(data: TaskData, settings: EvalSettings) -> list:
    manifest = data.manifest("avvp")
    plan = _protocol_plan("avvp", _train_test_plan(CROSS + SAME), settings)
    feats = _read_all(data, "avvp", _reads(plan), "segments")
    return [_localization_probe("avvp", direction, feats[train], feats[test], manifest, settings, "precision", False,
                                _val_note(train, test) if test[2] is not None else "")
            for direction, (train, test) in plan.items()]


def _check_val_classes(data: TaskData, task: str, split: str, modalities) -> None:
    """Under ``--protocol val``: the classes the held-out part of ``split`` uses are all used by its fit part."""
    scan, manifest = data.scan(task, split), data.manifest(task)
    fit = _classes_used(scan, modalities, data.part_keys(task, split, VAL_FIT))
    held_out = _classes_used(scan, modalities, data.part_keys(task, split, VAL_HELD_OUT))
    if held_out - fit:
        raise SrcidError(f"{scan.where()}: under --protocol val its held-out part uses {_names(manifest, held_out - fit)}, "
                         f"which no clip of its fit part uses; --task {task} needs the held-out classes to be "
                         f"ones the heads train on")


def prepare_ave_avvp(data: TaskData, settings: EvalSettings) -> list:
    manifest = data.manifest("ave-avvp")
    plan = _protocol_plan("ave-avvp", _train_test_plan(CROSS), settings)
    reads = _reads(plan)
    _check_all(data, "ave-avvp", reads, "segments")
    modalities = ("audio", "video")
    if settings.protocol == "val":  # the test split is not read: the held-out part stands in for it
        _check_val_classes(data, "ave-avvp", "train", modalities)
    else:
        trained = _classes_used(data.scan("ave-avvp", "train"), modalities)
        tested = _classes_used(data.scan("ave-avvp", "test"), modalities)
        if trained != tested:
            where = Path(manifest.path) / MANIFEST_NAME
            parts = []
            if tested - trained:
                parts.append(f"only the test split uses {_names(manifest, tested - trained)}")
            if trained - tested:
                parts.append(f"only the train split uses {_names(manifest, trained - tested)}")
            raise SrcidError(f"{where}: the test classes must be the shared classes the train split covers: "
                             f"{'; '.join(parts)}")
    feats = _read_all(data, "ave-avvp", reads, "segments")
    return [_localization_probe("ave-avvp", direction, feats[train], feats[test], manifest, settings, "f1", True,
                                _val_note(train, test) if test[2] is not None else "")
            for direction, (train, test) in plan.items()]


def prepare_ucf_vgg(data: TaskData, settings: EvalSettings) -> list:
    manifest = data.manifest("ucf-vgg")
    video, ucf_train, ucf_test = UCF_VGG_SPLITS["ucf"]
    audio, vgg_train, vgg_test = UCF_VGG_SPLITS["vgg"]
    plan = {"V->A": ((ucf_train, video), (vgg_test, audio)), "A->V": ((vgg_train, audio), (ucf_test, video)),
            "V->V": ((ucf_train, video), (ucf_test, video)), "A->A": ((vgg_train, audio), (vgg_test, audio))}
    plan = _protocol_plan("ucf-vgg", plan, settings)
    reads = _reads(plan)
    _check_all(data, "ucf-vgg", reads, "label")
    val = settings.protocol == "val"  # the test splits are not read: compare the train splits' classes
    read_splits = {source: (train,) if val else (train, test) for source, (_, train, test) in UCF_VGG_SPLITS.items()}
    used = {source: set().union(*(_classes_used(data.scan("ucf-vgg", split), ()) for split in splits))
            for source, splits in read_splits.items()}
    if used["ucf"] != used["vgg"]:
        where = Path(manifest.path) / MANIFEST_NAME
        label = {source: splits[0] if val else f"{source}_*" for source, splits in read_splits.items()}
        parts = []
        if used["ucf"] - used["vgg"]:
            parts.append(f"only {label['ucf']} clips use {_names(manifest, used['ucf'] - used['vgg'])}")
        if used["vgg"] - used["ucf"]:
            parts.append(f"only {label['vgg']} clips use {_names(manifest, used['vgg'] - used['ucf'])}")
        raise SrcidError(f"{where}: the class lists of the two sources differ: {'; '.join(parts)}")
    feats = _read_all(data, "ucf-vgg", reads, "label")
    return [Probe("ucf-vgg", direction, "classification", feats[train], feats[test], feats[train].labels,
                  feats[test].labels, manifest.num_classes, "accuracy", note=_val_note(train, test) if val else "")
            for direction, (train, test) in plan.items()]


def item_groups(features: SplitFeatures) -> list:
    """Per clip, its item index: clips with the same ``source`` and identical raw features are one item
    (an imported Clotho audio with its five captions)."""
    seen: dict = {}
    groups = []
    for meta, digest in zip(features.metas, features.digests):
        key = (str(meta.get("source")), digest)
        groups.append(seen.setdefault(key, len(seen)))
    return groups


def _val_retrieval_skip(data: TaskData) -> Optional[str]:
    """Why retrieval cannot run under ``--protocol val`` (``None``: it can)."""
    folder = data.folder_path("retrieval")
    if not (folder / MANIFEST_NAME).is_file():
        return f"{folder} holds no dataset"
    manifest = data.manifest("retrieval")
    if VAL_RETRIEVAL_SPLIT not in manifest.splits:
        return f"{folder} has no split {VAL_RETRIEVAL_SPLIT} (splits: {', '.join(manifest.splits)})"
    carried = data.scan("retrieval", VAL_RETRIEVAL_SPLIT).modalities()
    if "text" not in carried or not any(m in carried for m, _ in RETRIEVAL_PAIRS.values()):
        return (f"{folder}: the clips of split {VAL_RETRIEVAL_SPLIT} do not all carry text and one of video and audio "
                f"(all carry: {', '.join(carried) or 'nothing'})")
    return None


def prepare_retrieval(data: TaskData, settings: EvalSettings) -> list:
    split = RETRIEVAL_SPLIT
    if settings.protocol == "val":
        split = VAL_RETRIEVAL_SPLIT
        reason = _val_retrieval_skip(data)
        if reason is not None:
            raise TaskSkipped(f"retrieval skipped under --protocol val, which runs it zero-shot on split "
                              f"{VAL_RETRIEVAL_SPLIT} of DATA_DIR/{VAL_RETRIEVAL_FOLDER}/ (never the test data): {reason}")
    manifest = data.manifest("retrieval")
    where = Path(manifest.path) / MANIFEST_NAME
    if "text" not in manifest.modalities:
        raise SrcidError(f"{where}: declares no text modality, which --task retrieval needs "
                         f"(declared: {', '.join(manifest.modalities)})")
    pairs = [name for name, (m, _) in RETRIEVAL_PAIRS.items() if m in manifest.modalities]
    if settings.protocol == "val":  # the pretraining set: the pairs its val clips carry
        carried = data.scan("retrieval", split).modalities()
        pairs = [name for name in pairs if RETRIEVAL_PAIRS[name][0] in carried]
    if not pairs:
        raise SrcidError(f"{where}: declares neither video nor audio, one of which --task retrieval pairs with text")
    for name in pairs:
        data.check("retrieval", split, RETRIEVAL_PAIRS[name][0], None)
        data.check("retrieval", split, "text", None)
    sets = []
    for name in pairs:
        modality, short = RETRIEVAL_PAIRS[name]
        items = data.features("retrieval", split, modality, None, digests=True)
        text = data.features("retrieval", split, "text", None)
        sets.append(RetrievalSet(name, short, items, text, item_groups(items)))
    return sets


PREPARE = {"ave": prepare_ave, "avvp": prepare_avvp, "ave-avvp": prepare_ave_avvp, "ucf-vgg": prepare_ucf_vgg,
           "retrieval": prepare_retrieval}


def prepare(task: str, data: TaskData, settings: EvalSettings) -> list:
    """The probes (or retrieval sets) of ``task``, every input checked and every feature encoded."""
    if task not in PREPARE:
        raise SrcidError(f"--task {task}: choose one of {', '.join(TASKS)}, all")
    if data.folders != task_folders(settings.protocol):
        raise SrcidError(f"the task data was opened for --protocol {data.protocol}, whose folders are not those "
                         f"--protocol {settings.protocol} reads")
    return PREPARE[task](data, settings)


# --------------------------------------------------------------------------- running


def _evaluate(probe: Probe, head, test_x: torch.Tensor) -> dict:
    if probe.kind == "classification":
        return evaluate_classification(head, test_x, probe.test_targets)
    return evaluate_localization(head, test_x, probe.test_targets, exclude_classes=probe.exclude_classes)


def run_probe(probe: Probe, settings: EvalSettings) -> dict:
    """Train and test the probe's head once per seed; the JSON-ready result with mean and spread."""
    localization = probe.kind == "localization"
    device = torch.device(settings.device)
    train_x, test_x = probe.train.x.to(device), probe.test.x.to(device)
    epochs = settings.epochs_loc if localization else settings.epochs_cls
    milestones = AUTHORS_LOC_MILESTONES if localization and settings.protocol == "authors" else ()
    selected = []

    def experiment(seed: int) -> dict:
        trained = train_head(
            probe.kind, train_x, probe.train_targets, epochs=epochs, seed=seed, batch_size=settings.batch_size,
            lr=settings.lr, grad_clip=settings.grad_clip, num_classes=None if localization else probe.num_classes,
            hidden=settings.hidden, lr_milestones=milestones, progress=settings.progress,
            eval_fn=(lambda head: _evaluate(probe, head, test_x)) if settings.keep == "best" else None,
            keep=settings.keep, best_by=probe.metric, desc=f"{probe.task} {probe.direction} seed {seed}",
        )
        selected.append(trained.selected_epoch)
        return _evaluate(probe, trained.head, test_x)

    result = run_seeds(experiment, settings.seeds)
    return {
        "task": probe.task,
        "direction": probe.direction,
        "head": probe.kind,
        "train": probe.train.describe(),
        "test": probe.test.describe(),
        "classes": probe.num_classes,
        "excluded_classes": list(probe.exclude_classes),
        "epochs": epochs,
        "lr_milestones": list(milestones),
        "keep": settings.keep,
        "selected_epochs": selected,
        "metric": probe.metric,
        "note": probe.note,
        "seeds": result["seeds"],
        "runs": result["runs"],
        "metrics": result["metrics"],
    }


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[Na, Nb]`` cosine similarities of the rows of ``a`` and ``b`` (float64)."""
    a = torch.nn.functional.normalize(a.double(), dim=-1)
    b = torch.nn.functional.normalize(b.double(), dim=-1)
    return a @ b.T


def run_retrieval(rset: RetrievalSet) -> dict:
    """Zero-shot retrieval: cosine similarity of time-pooled features, R@1/5/10 both ways and their mean."""
    pooled = rset.items.pooled()
    first: dict = {}
    for clip, group in enumerate(rset.groups):
        first.setdefault(group, clip)
    count = len(first)
    items = pooled[[first[g] for g in range(count)]]
    sim = cosine_similarity(items, rset.text.pooled())
    report = retrieval_report(sim, [(g, j) for j, g in enumerate(rset.groups)], names=(rset.short, "T"))
    return {"items": count, "captions": len(rset.text), "data": rset.items.describe(), **report}


# --------------------------------------------------------------------------- the whole evaluation


def expand_tasks(task: str) -> tuple:
    """``--task`` as a tuple of tasks (``all``: every task)."""
    if task == "all":
        return TASKS
    if task not in TASKS:
        raise SrcidError(f"--task {task}: choose one of {', '.join(TASKS)}, all")
    return (task,)


def method_name(variant: str, layers: tuple, model_layers: int) -> str:
    """The row name: the paper's method name, ``(only1)`` when a two-layer model is read at layer 1 only."""
    name = METHOD_NAMES.get(variant, variant)
    return f"{name}(only1)" if model_layers > 1 and tuple(layers) == (1,) else name


def evaluate(data_dir, encoder: FeatureEncoder, tasks, settings: EvalSettings) -> dict:
    """Prepare every task (all checks first), then run them.

    Returns ``{"tasks": {task: results}, "skipped": {task: reason}}``: a task
    the protocol cannot run on the data (retrieval under ``val`` without
    ``DATA_DIR/pretrain`` split ``val``) is skipped, not an error.
    """
    settings.validate()
    data = TaskData(data_dir, encoder, settings.protocol)
    prepared, skipped = {}, {}
    for task in tasks:
        try:
            prepared[task] = prepare(task, data, settings)
        except TaskSkipped as skip:
            skipped[task] = str(skip)
    results: dict = {}
    probes = [p for task in prepared if task != "retrieval" for p in prepared[task]]
    bar = tqdm(probes, desc="heads", unit="head", disable=not settings.progress)
    for probe in bar:
        bar.set_postfix_str(f"{probe.task} {probe.direction}")
        task = results.setdefault(probe.task, {"metric": TABLE_METRIC[probe.task], "experiments": {}})
        task["experiments"][probe.direction] = run_probe(probe, settings)
    if "retrieval" in prepared:
        results["retrieval"] = {rset.name: run_retrieval(rset) for rset in prepared["retrieval"]}
    return {"tasks": {task: results[task] for task in tasks if task in prepared}, "skipped": skipped}


def result_tables(method: str, results: dict, seeds) -> dict:
    """Tables II, I and III (as :mod:`srcid.eval.tables` builds them) of one method's results.

    Tables II and I also get AVVP's F1 (:data:`srcid.eval.tables.AVVP_F1`)
    beside the paper's columns, not counted in Avg.
    """
    cross, same = {}, {}
    for task, entry in results.items():
        if task == "retrieval":
            continue
        metric = entry["metric"]
        for direction, result in entry["experiments"].items():
            row = cross if direction in CROSS else same
            row.setdefault(task, {})[direction] = result["metrics"][metric]
            if task == "avvp" and "f1" in result["metrics"]:
                row.setdefault(AVVP_F1, {})[direction] = result["metrics"]["f1"]
    tables = {}
    if cross or same:
        tables["table2"] = table2({method: cross}, seeds)
        tables["table1"] = table1({method: cross}, {method: same} if same else None, seeds)
    if "retrieval" in results:
        tables["table3"] = table3({method: {name: r["mean"] for name, r in results["retrieval"].items()}})
    return tables
