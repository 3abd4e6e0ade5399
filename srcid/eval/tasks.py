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

Localization targets get a background column (a segment without any event)
unless ``background=False``: it is counted in AVVP's precision like any
class ("25 + background"), and left out of AVE -> AVVP's F1, which is taken
over the shared classes.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from srcid.data.manifest import MANIFEST_NAME, Manifest, load_manifest
from srcid.errors import SrcidError
from srcid.eval.features import FeatureEncoder, SplitFeatures, SplitScan, check_model_input, scan_split
from srcid.eval.metrics import retrieval_report
from srcid.eval.probe import evaluate_classification, evaluate_localization, run_seeds, seed_list, train_head
from srcid.eval.tables import table1, table2, table3

TASKS = ("ave", "avvp", "ave-avvp", "ucf-vgg", "retrieval")
TASK_FOLDERS = {"ave": "ave", "avvp": "avvp", "ave-avvp": "ave_avvp", "ucf-vgg": "ucf_vgg", "retrieval": "retrieval"}
TABLE_METRIC = {"ave": "accuracy", "avvp": "precision", "ave-avvp": "f1", "ucf-vgg": "accuracy"}
PROTOCOLS = ("default", "authors")
AUTHORS_LOC_MILESTONES = (10, 20, 30)
MODALITY = {"A": "audio", "V": "video"}
CROSS = ("V->A", "A->V")
SAME = ("V->V", "A->A")
UCF_VGG_SPLITS = {"ucf": ("video", "ucf_train", "ucf_test"), "vgg": ("audio", "vgg_train", "vgg_test")}
RETRIEVAL_SPLIT = "test"
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
    batch_size: int = 80
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


# --------------------------------------------------------------------------- checks and reading


class TaskData:
    """The task folders under DATA_DIR, read on demand: manifests, scans and features (all cached)."""

    def __init__(self, data_dir, encoder: FeatureEncoder):
        self.data_dir, self.encoder = Path(data_dir), encoder
        self._manifests: dict = {}
        self._scans: dict = {}

    def folder(self, task: str) -> Path:
        folder = self.data_dir / TASK_FOLDERS[task]
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

    def features(self, task: str, split: str, modality: str, needs: Optional[str], *, digests: bool = False) -> SplitFeatures:
        """The encoded ``modality`` of ``split``, after :meth:`check`."""
        return self.encoder.split(self.check(task, split, modality, needs), modality, digests=digests)


def _require(scan: SplitScan, task: str, predicate, what: str) -> None:
    missing = scan.lacking(predicate)
    if missing:
        raise SrcidError(f"{scan.where()}: {len(missing)} of {len(scan)} clips {what}, which --task {task} needs "
                         f"(first: {missing[0]})")


def _classes_used(scan: SplitScan, modalities) -> set:
    """Class indices a split's clips use: clip labels and per-segment labels of ``modalities``."""
    used = set()
    for meta in scan.metas.values():
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


def _check_all(data: TaskData, task: str, reads, needs: str) -> None:
    """Check every ``(split, modality)`` a task reads before any of them is encoded."""
    for split, modality in reads:
        data.check(task, split, modality, needs)


def _read_all(data: TaskData, task: str, reads, needs: str) -> dict:
    """``{(split, modality): features}`` of every read, all checked first."""
    _check_all(data, task, reads, needs)
    return {read: data.features(task, *read, needs) for read in dict.fromkeys(reads)}


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
    plan = _ave_plan(settings)
    feats = _read_all(data, "ave", [read for pair in plan.values() for read in pair], "label")
    probes = []
    for direction, (train, test) in plan.items():
        note = "tested on the train split of the other modality (authors' protocol)" if test[0] == "train" else ""
        probes.append(Probe("ave", direction, "classification", feats[train], feats[test], feats[train].labels,
                            feats[test].labels, manifest.num_classes, "accuracy", note=note))
    return probes


def _localization_probe(task: str, direction: str, train: SplitFeatures, test: SplitFeatures, manifest: Manifest,
                        settings: EvalSettings, metric: str, exclude_background: bool) -> Probe:
    classes = manifest.num_classes + (1 if settings.background else 0)
    exclude = (manifest.num_classes,) if settings.background and exclude_background else ()
    return Probe(task, direction, "localization", train, test, localization_targets(train, settings.background),
                 localization_targets(test, settings.background), classes, metric, exclude_classes=exclude)


def _train_test_plan(directions) -> dict:
    return {d: (("train", _split_pair(d)[0]), ("test", _split_pair(d)[1])) for d in directions}


def prepare_avvp(data: TaskData, settings: EvalSettings) -> list:
    manifest = data.manifest("avvp")
    plan = _train_test_plan(CROSS + SAME)
    feats = _read_all(data, "avvp", [read for pair in plan.values() for read in pair], "segments")
    return [_localization_probe("avvp", direction, feats[train], feats[test], manifest, settings, "precision", False)
            for direction, (train, test) in plan.items()]


def prepare_ave_avvp(data: TaskData, settings: EvalSettings) -> list:
    manifest = data.manifest("ave-avvp")
    plan = _train_test_plan(CROSS)
    reads = [read for pair in plan.values() for read in pair]
    _check_all(data, "ave-avvp", reads, "segments")
    modalities = ("audio", "video")
    trained = _classes_used(data.scan("ave-avvp", "train"), modalities)
    tested = _classes_used(data.scan("ave-avvp", "test"), modalities)
    if trained != tested:
        where = Path(manifest.path) / MANIFEST_NAME
        parts = []
        if tested - trained:
            parts.append(f"only the test split uses {_names(manifest, tested - trained)}")
        if trained - tested:
            parts.append(f"only the train split uses {_names(manifest, trained - tested)}")
        raise SrcidError(f"{where}: the test classes must be the shared classes the train split covers: {'; '.join(parts)}")
    feats = _read_all(data, "ave-avvp", reads, "segments")
    return [_localization_probe("ave-avvp", direction, feats[train], feats[test], manifest, settings, "f1", True)
            for direction, (train, test) in plan.items()]


def prepare_ucf_vgg(data: TaskData, settings: EvalSettings) -> list:
    manifest = data.manifest("ucf-vgg")
    video, ucf_train, ucf_test = UCF_VGG_SPLITS["ucf"]
    audio, vgg_train, vgg_test = UCF_VGG_SPLITS["vgg"]
    plan = {"V->A": ((ucf_train, video), (vgg_test, audio)), "A->V": ((vgg_train, audio), (ucf_test, video)),
            "V->V": ((ucf_train, video), (ucf_test, video)), "A->A": ((vgg_train, audio), (vgg_test, audio))}
    reads = [read for pair in plan.values() for read in pair]
    _check_all(data, "ucf-vgg", reads, "label")
    used = {source: _classes_used(data.scan("ucf-vgg", train), ()) | _classes_used(data.scan("ucf-vgg", test), ())
            for source, (_, train, test) in UCF_VGG_SPLITS.items()}
    if used["ucf"] != used["vgg"]:
        where = Path(manifest.path) / MANIFEST_NAME
        parts = []
        if used["ucf"] - used["vgg"]:
            parts.append(f"only ucf_* clips use {_names(manifest, used['ucf'] - used['vgg'])}")
        if used["vgg"] - used["ucf"]:
            parts.append(f"only vgg_* clips use {_names(manifest, used['vgg'] - used['ucf'])}")
        raise SrcidError(f"{where}: the class lists of the two sources differ: {'; '.join(parts)}")
    feats = _read_all(data, "ucf-vgg", reads, "label")
    return [Probe("ucf-vgg", direction, "classification", feats[train], feats[test], feats[train].labels,
                  feats[test].labels, manifest.num_classes, "accuracy")
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


def prepare_retrieval(data: TaskData, settings: EvalSettings) -> list:
    manifest = data.manifest("retrieval")
    where = Path(manifest.path) / MANIFEST_NAME
    if "text" not in manifest.modalities:
        raise SrcidError(f"{where}: declares no text modality, which --task retrieval needs "
                         f"(declared: {', '.join(manifest.modalities)})")
    pairs = [name for name, (m, _) in RETRIEVAL_PAIRS.items() if m in manifest.modalities]
    if not pairs:
        raise SrcidError(f"{where}: declares neither video nor audio, one of which --task retrieval pairs with text")
    for name in pairs:
        data.check("retrieval", RETRIEVAL_SPLIT, RETRIEVAL_PAIRS[name][0], None)
        data.check("retrieval", RETRIEVAL_SPLIT, "text", None)
    sets = []
    for name in pairs:
        modality, short = RETRIEVAL_PAIRS[name]
        items = data.features("retrieval", RETRIEVAL_SPLIT, modality, None, digests=True)
        text = data.features("retrieval", RETRIEVAL_SPLIT, "text", None)
        sets.append(RetrievalSet(name, short, items, text, item_groups(items)))
    return sets


PREPARE = {"ave": prepare_ave, "avvp": prepare_avvp, "ave-avvp": prepare_ave_avvp, "ucf-vgg": prepare_ucf_vgg,
           "retrieval": prepare_retrieval}


def prepare(task: str, data: TaskData, settings: EvalSettings) -> list:
    """The probes (or retrieval sets) of ``task``, every input checked and every feature encoded."""
    if task not in PREPARE:
        raise SrcidError(f"--task {task}: choose one of {', '.join(TASKS)}, all")
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
    """Prepare every task (all checks first), then run them; ``{"tasks": {task: results}}``."""
    settings.validate()
    data = TaskData(data_dir, encoder)
    prepared = {task: prepare(task, data, settings) for task in tasks}
    results: dict = {}
    probes = [p for task in tasks if task != "retrieval" for p in prepared[task]]
    bar = tqdm(probes, desc="heads", unit="head", disable=not settings.progress)
    for probe in bar:
        bar.set_postfix_str(f"{probe.task} {probe.direction}")
        task = results.setdefault(probe.task, {"metric": TABLE_METRIC[probe.task], "experiments": {}})
        task["experiments"][probe.direction] = run_probe(probe, settings)
    if "retrieval" in prepared:
        results["retrieval"] = {rset.name: run_retrieval(rset) for rset in prepared["retrieval"]}
    return {"tasks": {task: results[task] for task in tasks}}


def result_tables(method: str, results: dict, seeds) -> dict:
    """Tables II, I and III (as :mod:`srcid.eval.tables` builds them) of one method's results."""
    cross, same = {}, {}
    for task, entry in results.items():
        if task == "retrieval":
            continue
        metric = entry["metric"]
        for direction, result in entry["experiments"].items():
            (cross if direction in CROSS else same).setdefault(task, {})[direction] = result["metrics"][metric]
    tables = {}
    if cross or same:
        tables["table2"] = table2({method: cross}, seeds)
        tables["table1"] = table1({method: cross}, {method: same} if same else None, seeds)
    if "retrieval" in results:
        tables["table3"] = table3({method: {name: r["mean"] for name, r in results["retrieval"].items()}})
    return tables
