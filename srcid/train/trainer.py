"""The distributed trainer: DeepSpeed engine, two-stage schedule, checkpoints, logs.

Entry point of ``deepspeed launcher/train.py`` and ``deepspeed --module
srcid.train.launch`` (and of ``python launcher/train.py``, ``python -m
srcid.train.launch`` and ``srcid train`` as one process); the run contract
it follows (config, files, command line) is :mod:`srcid.run`. Per step, on
every rank:

1. fetch the rank's batch (the reader gives every rank the same number of
   steps per epoch) and agree that no rank failed to read it;
2. forward through the engine (the quantizers' EMA statistics are summed
   across ranks before each update, so codebooks stay identical), fit the
   CLUB nets for k inner steps, build the total loss with layer 2's weight
   from the warm-start schedule;
3. ``engine.backward`` and ``engine.step`` (gradient averaging, clipping,
   ZeRO stage 0/1/2);
4. every ``log_every`` steps: average the loss terms across ranks (the only
   host synchronisation of the loop), log them, feed the layer-1 MI estimate
   to the warm-start schedule; every ``checkpoint_every`` steps and at the
   end: an atomic checkpoint.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from srcid.config import to_dict
from srcid.data.manifest import MANIFEST_NAME, load_manifest
from srcid.data.reader import ShardLoader
from srcid.data.shard_format import check_shard_files
from srcid.errors import CorruptFileError, SrcidError, check_writable_folder, os_error_line, os_error_reason
from srcid.files import read_json_object, write_json_atomic
from srcid.model.club import build_mi_fitter
from srcid.model.export import _weights_path, export_model
from srcid.model.quantizers import CodebookQuantizer
from srcid.model.variants import build_model, build_model_from_manifest
from srcid.run import (CHECKPOINTS_DIR, MODEL_FILE, RUN_CONFIG_FILE, TRAIN_STATE_FILE, RunConfig, build_parser,
                       default_ds_config, load_run_config, resolve_config, use_kernels)
from srcid.train import distributed as dist_helpers
from srcid.train import final_codes
from srcid.train import metrics_log  # as a module: tests replace its plot_metrics
from srcid.train.checkpoint import (CheckpointManager, checkpoint_step, is_complete, load_engine, load_module_state,
                                    load_rng_state, load_tensors, rng_state_path, save_engine, save_rng_state,
                                    save_tensors, verify_checkpoint)
from srcid.train.collapse import CollapseMonitor
from srcid.train.step import compute_loss
from srcid.train.warm_start import WarmStart

CLUB_STATE_FILE = "club.pt"  # in every checkpoint: the CLUB nets and their optimizer


def learned_codebook_sizes(model) -> dict:
    """``{layer number: codebook size}`` of the layers with a learned codebook (VQ, RVQ; FSQ's grid has none)."""
    return {k + 1: q.num_codes for k, q in enumerate(model.quantizers()) if isinstance(q, CodebookQuantizer)}


def engine_config(config: RunConfig, ds_config_path: Path) -> dict:
    """The DeepSpeed config of a run: the JSON file with every key the run config owns set from the run config
    (micro batch = ``batch_size``, accumulation, ZeRO stage, lr, clipping), so the run config is their one source."""
    return dist_helpers.load_ds_config(ds_config_path, zero_stage=config.zero_stage, micro_batch_size=config.batch_size,
                                       gradient_accumulation_steps=config.gradient_accumulation, lr=config.lr,
                                       grad_clip=config.grad_clip)


class Trainer:
    """Owns the engine, the CLUB fitter, the reader, the schedule, checkpoints and logs of one run."""

    def __init__(self, config: RunConfig, data_dir: Path, run_dir: Path, *, resume,
                 ds_config_path: Optional[Path] = None, progress: bool = True, overwrite: bool = False):
        """``resume``: False/None (a new run), True or ``"latest"`` (the newest intact checkpoint), or a
        checkpoint's name (``step-00001234``, ``1234`` or its path). ``overwrite``: clear a run already in
        ``run_dir`` first (a new run refuses a folder that is not empty otherwise)."""
        import deepspeed  # here, not at the top: `srcid export` and code that only reads runs need not load it

        resume = "latest" if resume is True else (resume or None)
        self.config, self.data_dir, self.run_dir = config, Path(data_dir), Path(run_dir)
        self.dist = dist_helpers
        self.rank, self.world_size, self.local_rank, self.device = dist_helpers.init_distributed(timeout_s=config.timeout_s)
        self.is_main = self.rank == 0
        self.progress = progress and self.is_main
        self.gather = dist_helpers.BatchGather()
        if self.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            # Share the cores between the ranks of this machine instead of oversubscribing them.
            local_ranks = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_ranks)))
        # Rank 0 checks the data folder, then checks (and with --overwrite clears) the run directory before
        # anything is read or written, so no run folder is made for data that is not there; every rank learns
        # the outcome in the same collective.
        error = None
        if self.is_main:
            try:
                check_data_folder(self.data_dir, config.split)
                prepare_run_dir(self.run_dir, resume=resume is not None, overwrite=overwrite)
            except SrcidError as exc:
                error = exc
        dist_helpers.stop_if_any_rank_failed(error)
        self.checkpoints = CheckpointManager(
            self.run_dir, keep_last=config.keep_last, rank=self.rank, world_size=self.world_size,
            barrier=dist_helpers.barrier,
        )
        self._resume_from, self._resume_info = None, None
        if resume is not None:
            self._resume_from = self._choose_checkpoint(resume)

        # Same initial weights and codebooks on every rank, then per-rank streams (dropout).
        dist_helpers.seed_everything(config.seed, 0)
        self.loader = ShardLoader(
            self.data_dir, config.split, batch_size=config.batch_size, rank=self.rank, world_size=self.world_size,
            num_workers=config.num_workers, seed=config.seed, shuffle=True, tail="merge",
        )
        self.manifest = self.loader.manifest
        model = build_model_from_manifest(config.variant, config.model, self.manifest)
        self.input_stats = None
        if not resume and config.model.normalize_inputs:
            self.input_stats = self._fit_input_stats(model)
        self.mi_fitter = build_mi_fitter(model)
        self.mi_fitter.estimator.to(self.device)
        dist_helpers.seed_everything(config.seed, self.rank)

        if ds_config_path is None:
            ds_config_path = default_ds_config(self.device.type)
        ds_config = engine_config(config, ds_config_path)
        self.bf16 = bool(ds_config.get("bf16", {}).get("enabled", False))
        try:
            self.engine, _, _, _ = deepspeed.initialize(
                model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config,
            )
        except (ValueError, KeyError, TypeError, AssertionError) as exc:
            message = " ".join(str(exc).split())[:300]
            raise SrcidError(f"{ds_config_path}: DeepSpeed rejected the config: {message}") from None
        self.model = self.engine.module
        if self.world_size > 1:
            self.model.set_reduce_stats(dist_helpers.all_reduce_sum_)
            self.model.set_batch_gather(self.gather)

        self.monitor = CollapseMonitor(config.collapse, codebook_sizes=learned_codebook_sizes(self.model))
        self.warm = WarmStart(config.warm_start)
        if config.variant != "srcid":
            self.warm = None  # one-layer variants have no second stage
        self.step = 0
        self.epoch = 0
        self.step_in_epoch = 0
        if resume:
            self._resume()
        elif self.is_main:

            write_json_atomic(self.run_dir / RUN_CONFIG_FILE, to_dict(config), sort_keys=True)
        dist_helpers.barrier()
        self.logger = metrics_log.MetricsLogger(self.run_dir, enabled=self.is_main, resume_step=self.step if resume else None)
        if self._resume_info is not None:
            self.logger.event(self.step, "resume", self._resume_info)
        if self.input_stats is not None:
            self.logger.event(0, "input_stats", self.input_stats)

    # -- state -------------------------------------------------------------------------------
    def layer2_weight(self) -> float:
        return self.warm.layer2_weight if self.warm is not None else 0.0

    def _train_state(self) -> dict:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "world_size": self.world_size,
            "warm_start": self.warm.state_dict() if self.warm is not None else None,
            "input_shapes": model_input_shapes(self.manifest),
            "collapse": self.monitor.state_dict(),
        }

    def _write_checkpoint(self, directory: Path) -> None:
        save_engine(self.engine, directory)
        save_rng_state(rng_state_path(directory, self.rank))
        if self.is_main:
            save_tensors(directory / CLUB_STATE_FILE, self.mi_fitter.state_dict())
            write_json_atomic(directory / TRAIN_STATE_FILE, self._train_state(), indent=1, sort_keys=True, allow_nan=True)

    def save_checkpoint(self) -> Path:
        return self.checkpoints.save(self.step, self._write_checkpoint)

    def _resume(self) -> None:
        latest = self._resume_from
        state = read_json_object(latest / TRAIN_STATE_FILE)
        missing = sorted({"step", "epoch", "step_in_epoch", "world_size", "warm_start"} - set(state))
        if missing:
            raise SrcidError(f"{latest / TRAIN_STATE_FILE}: missing key(s) {', '.join(missing)}")
        if state["world_size"] != self.world_size:
            raise SrcidError(
                f"--resume: {latest} was written by {state['world_size']} processes, this run has {self.world_size}; "
                "resume with the same number of processes"
            )
        load_engine(self.engine, latest)
        self.mi_fitter.load_state_dict(load_tensors(latest / CLUB_STATE_FILE))
        load_rng_state(rng_state_path(latest, self.rank))
        self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        if self.warm is not None and state["warm_start"] is not None:
            self.warm.load_state_dict(state["warm_start"])
        self.monitor.load_state_dict(state.get("collapse") or {})

    def _named_checkpoint(self, name: str) -> Path:
        """The checkpoint ``--resume NAME`` names: ``step-00001234``, ``1234`` or a path to it."""
        text = str(name)
        if text.isdigit():
            path = self.checkpoints.path_for(int(text))
        elif "/" not in text and os.sep not in text:
            path = self.checkpoints.directory / text
        else:
            path = Path(text)
        complete = ", ".join(p.name for p in self.checkpoints.checkpoints()) or "none"
        if path.resolve().parent != self.checkpoints.directory.resolve() or not is_complete(path):
            raise SrcidError(f"--resume {name}: not a complete checkpoint of {self.run_dir} (complete checkpoints in "
                             f"{self.checkpoints.directory}: {complete})")
        return path

    def _choose_checkpoint(self, resume: str) -> Path:
        """The checkpoint to resume from, verified against the SHA-256 sums its ``COMPLETE`` records.

        ``"latest"``: the newest intact one; newer corrupt ones are set aside as ``step-N.corrupt`` and one
        warning line says so. A named checkpoint that is corrupt is an error; one older than the newest is
        resumed, and the newer ones are set aside as ``step-N.superseded`` (never loaded again). Every rank
        takes part (each hashes a share of the files) and reaches the same choice.
        """
        def reduce(codes):
            return self.dist.all_reduce_sum_(codes.to(self.device)).cpu()

        def verify(path):
            return verify_checkpoint(path, rank=self.rank, world_size=self.world_size, reduce=reduce)

        complete = self.checkpoints.checkpoints()
        corrupt = []
        if resume == "latest":
            if not complete:
                raise SrcidError(f"--resume: no complete checkpoint in {self.checkpoints.directory}; start over "
                                 "with --overwrite")
            chosen = None
            for path in reversed(complete):
                try:
                    verified = verify(path)
                except CorruptFileError as exc:
                    corrupt.append((path, str(exc)))
                    continue
                chosen = path
                break
            if chosen is None:
                raise SrcidError(f"--resume: every checkpoint in {self.checkpoints.directory} is corrupt "
                                 f"(newest: {corrupt[0][1]})")
        else:
            chosen = self._named_checkpoint(resume)
            try:
                verified = verify(chosen)
            except CorruptFileError as exc:
                raise CorruptFileError(f"--resume {resume}: {exc}") from None
        newer = [p for p in complete if checkpoint_step(p) > checkpoint_step(chosen)]
        self.dist.barrier()  # every rank has listed and verified the checkpoints before any is renamed
        if self.is_main:
            bad = {p for p, _ in corrupt}
            for path in newer:
                try:
                    _set_aside(path, "corrupt" if path in bad else "superseded")
                except OSError as exc:  # housekeeping: the run resumes all the same; a later save replaces it
                    print(f"srcid: warning: could not rename {path} aside: {exc.strerror or exc}", file=sys.stderr)
            rel = f"{self.checkpoints.directory.name}/{chosen.name}"
            if corrupt:
                names = ", ".join(p.name for p, _ in corrupt)
                print(f"srcid: warning: {corrupt[0][1]}; resuming from {rel}, the newest intact checkpoint "
                      f"(set aside as *.corrupt: {names})", file=sys.stderr)
            elif newer:
                print(f"srcid: resuming from {rel}; the newer checkpoints are set aside as *.superseded: "
                      f"{', '.join(p.name for p in newer)}", file=sys.stderr)
            if not verified:
                print(f"srcid: note: {rel} records no SHA-256 sums (written by an older srcid); resuming from it "
                      "unverified", file=sys.stderr)
        self.dist.barrier()
        self._resume_info = {"checkpoint": chosen.name, "verified": verified,
                             "corrupt": [message for _, message in corrupt],
                             "set_aside": [p.name for p in newer]}
        return chosen

    def _fit_input_stats(self, model) -> dict:
        """Fit the model's input normaliser on the training split (or its first ``input_stats_clips`` clips of
        epoch 0), every rank reading its own part; the moments are summed across ranks. Returns a summary."""
        steps = self.loader.steps_per_epoch()
        clips = self.config.input_stats_clips
        if clips:
            steps = min(steps, max(1, math.ceil(clips / (self.config.batch_size * self.world_size))))

        def reduce(flat):
            flat.copy_(self.dist.all_reduce_sum_(flat.to(self.device)).cpu())

        bar = tqdm(total=steps, disable=not self.progress, desc="input statistics", unit="step", dynamic_ncols=True)
        read = torch.zeros(1, dtype=torch.float64)

        def counted(batches):
            for batch in batches:
                read.add_(len(batch))
                bar.update(1)
                yield batch

        model.fit_input_stats(counted(self._batches(self.loader.epoch(0), limit=steps)), reduce=reduce)
        bar.close()
        reduce(read)
        return {"clips": int(read.item()), **model.normalizer.summary()}

    def _calibrate_centres(self) -> None:
        """After the last step, layer 2's centre (``model.layer2_center``) takes the plain mean of its features
        over the first ``centre_clips`` clips of the training split under the final weights, in evaluation mode,
        summed across ranks (srcid/model/centre.py says why the running mean is not enough)."""
        if not self.config.model.layer2_center:
            return
        steps = self._first_clips_steps()
        batches = (self._device_batch(b) for b in self._batches(self.loader.epoch(0), limit=steps))
        moved = self.model.calibrate_centres(batches, reduce=self._reduce_sum)
        self.logger.event(self.step, "centre_calibration", {"steps": steps, "moved": moved})

    def _first_clips_steps(self) -> int:
        """Steps that read the first ``centre_clips`` clips of the training split (all of it when 0)."""
        steps = self.loader.steps_per_epoch()
        if self.config.centre_clips:
            steps = min(steps, max(1, math.ceil(self.config.centre_clips / (self.config.batch_size * self.world_size))))
        return steps

    def _reduce_sum(self, tensors: list) -> list:
        return [self.dist.all_reduce_sum_(t.to(self.device)) for t in tensors]

    def _final_code_use(self) -> None:
        """Codes per layer and modality on the first ``centre_clips`` training clips in evaluation mode (the
        per-step counts include dropout noise; srcid/train/final_codes.py), and the class read back from them on
        held-out clips where the clips carry classes: the ``final_code_use`` event, console lines, and a
        ``collapse`` event and warning for a layer and modality at or below the collapse bound."""
        read = torch.zeros(1, dtype=torch.float64, device=self.device)

        def counted(batches):
            for batch in batches:
                read.add_(len(batch))
                yield self._device_batch(batch)

        batches = counted(self._batches(self.loader.epoch(0), limit=self._first_clips_steps()))
        use = final_codes.evaluation_code_use(self.model, batches, reduce=self._reduce_sum,
                                              classes=len(self.loader.manifest.classes))
        codes = use.codes
        clips = int(self._reduce_sum([read])[0].item())
        found = final_codes.collapsed(codes, self.monitor.codes_bound) if self.config.collapse.enabled else []
        self.logger.event(self.step, "final_code_use", {"clips": clips, "codes": codes,
                                                        "collapsed": [f"L{k}/{m}" for k, m, _, _ in found],
                                                        "class_from_codes": use.class_from_codes,
                                                        "class_most_frequent": use.most_frequent})
        for k, m, value, bound in found:
            message = (f"warning: layer {k} {m} uses {value:.0f} code(s) on {clips} training clips in evaluation "
                       f"mode (<= {bound:.3g}) at the end of training")
            self.logger.event(self.step, "collapse", {"kind": "codebook_at_end", "layer": k, "modality": m,
                                                      "value": value, "bound": bound, "message": message})
            if self.is_main:
                print(message, file=sys.stderr, flush=True)
        if self.is_main:
            print(final_codes.summary_line(codes, clips), flush=True)
            line = final_codes.class_line(use)
            if line is not None:
                print(line, flush=True)

    def _device_batch(self, batch):
        batch = batch.to(self.device, non_blocking=True)
        if self.bf16:
            batch = dataclasses.replace(batch, features={k: v.to(torch.bfloat16) for k, v in batch.features.items()})
        return batch

    # -- the loop ----------------------------------------------------------------------------
    def _batches(self, source=None, limit=None):
        """The rank's batches from the current position (or of ``source``, at most ``limit``); read errors are
        agreed on by all ranks."""
        iterator = iter(source if source is not None else self.loader.epoch(self.epoch, start_step=self.step_in_epoch))
        count = 0
        while limit is None or count < limit:
            count += 1
            error = None
            try:
                batch = next(iterator)
            except StopIteration:
                batch = None
            except SrcidError as exc:
                batch, error = None, exc
            sizes = self.dist.stop_if_any_rank_failed(error, len(batch) if batch is not None else 0)
            if batch is None or not all(sizes):
                if any(sizes):
                    raise SrcidError(f"rank {self.rank}: ranks disagree on the epoch's length (batch sizes {sizes})")
                return
            self.gather.sizes = sizes
            yield batch

    def _forward_loss(self, batch):
        batch = self._device_batch(batch)
        return compute_loss(self.model, self.mi_fitter, batch, self.layer2_weight(), forward=self.engine)

    def _log(self, terms: dict, clips: int, elapsed: float) -> dict:
        scalars = {k: v for k, v in terms.items() if torch.is_tensor(v) or isinstance(v, (int, float))}
        averaged = self.dist.all_reduce_mean(scalars)
        for name, info in self.monitor.observe(self.step, averaged):
            self.logger.event(self.step, name, info)
            if self.is_main:
                print(info["message"], file=sys.stderr)
        averaged["lr"] = self.engine.get_lr()[0]
        averaged["clips_per_s"] = clips * self.world_size / max(elapsed, 1e-9)
        averaged["layer2_weight"] = self.layer2_weight()
        if self.warm is not None:
            mi_keys = [k for k in averaged if k.startswith("L1/mi/")]
            if mi_keys:
                was_on = self.warm.switched
                self.warm.observe(self.step, self.epoch, sum(averaged[k] for k in mi_keys) / len(mi_keys))
                self._report_switch(was_on)
        self.logger.log(self.step, averaged)
        return averaged

    def _report_switch(self, was_on: bool) -> None:
        """Log the warm-start switch (step, MI, reason) the moment it happens."""
        if self.warm.switched and not was_on and self.config.warm_start.mode != "off":
            record = self.warm.switch_record
            self.logger.event(self.step, "warm_start_switch", record)
            if self.is_main:
                print(f"layer 2 switched on at step {record['step']} (epoch {record['epoch']}): {record['reason']}",
                      file=sys.stderr)

    def train(self) -> Path:
        config = self.config
        steps_per_epoch = self.loader.steps_per_epoch()
        total = steps_per_epoch * config.epochs
        if config.max_steps is not None:
            total = min(total, config.max_steps)
        # Every micro-batch's gradient is applied: the run ends on an accumulation boundary.
        total -= total % config.gradient_accumulation
        if total == 0:
            raise SrcidError(f"the run has fewer steps than gradient_accumulation={config.gradient_accumulation} "
                             f"({steps_per_epoch} steps per epoch, epochs={config.epochs}, max_steps={config.max_steps})")
        bar = tqdm(total=total, initial=min(self.step, total), disable=not self.progress, desc="train", unit="step",
                   dynamic_ncols=True)
        self.engine.train()
        window_clips, window_start = 0, time.perf_counter()
        finished = self.step >= total
        while not finished and self.epoch < config.epochs:
            if self.warm is not None and self.step_in_epoch == 0:  # a resumed epoch has had its start already
                was_on = self.warm.switched
                self.warm.start_epoch(self.step, self.epoch)
                self._report_switch(was_on)
            for batch in self._batches():
                total_loss, terms = self._forward_loss(batch)
                self.engine.backward(total_loss)
                self.engine.step()
                self.step += 1
                self.step_in_epoch += 1
                window_clips += len(batch)
                bar.update(1)
                if self.step % config.log_every == 0 or self.step == total:
                    now = time.perf_counter()
                    averaged = self._log({"loss": total_loss.detach(), **terms}, window_clips, now - window_start)
                    window_clips, window_start = 0, now
                    bar.set_postfix(loss=f"{averaged['loss']:.3f}", l2=f"{self.layer2_weight():g}")
                if self.step >= total:
                    finished = True
                    break
                if self.step % config.checkpoint_every == 0:
                    self.save_checkpoint()
            else:
                self.epoch += 1
                self.step_in_epoch = 0
        bar.close()
        self._calibrate_centres()
        self._final_code_use()
        self.verify_replicas()
        path = self.save_checkpoint()
        self.logger.close()
        if self.is_main:
            self.export()
            metrics_log.plot_metrics(self.run_dir)
        return path

    def verify_replicas(self) -> bool:
        """Check that every rank holds bitwise the same parameters and buffers (codebooks, EMA state).

        One small collective; the result is logged as the ``replica_check`` event. A mismatch is an error.
        """
        digest = state_digest(self.model.state_dict())
        table = torch.zeros(self.world_size, dtype=torch.int64, device=self.device)
        table[self.rank] = digest
        self.dist.all_reduce_sum_(table)
        digests = table.tolist()
        identical = len(set(digests)) == 1
        self.logger.event(self.step, "replica_check", {"identical": identical, "digests": digests})
        if not identical:
            raise SrcidError(f"model replicas diverged across ranks at step {self.step} (state digests {digests})")
        return identical

    def export(self, path: Optional[Path] = None) -> Path:
        path = path or self.run_dir / MODEL_FILE
        export_model(
            self.model, variant=self.config.variant, config=self.config.model,
            input_shapes=model_input_shapes(self.manifest), path=path,
            extra={"run_dir": str(self.run_dir), "step": self.step, "epoch": self.epoch},
        )
        return path

    def close(self, ok: bool = True) -> None:
        self.dist.shutdown(synchronize=ok)


def _set_aside(path: Path, why: str) -> Path:
    """Rename a checkpoint directory to ``step-N.<why>`` (``-2``, ``-3``... if taken): kept, never loaded."""
    target = path.with_name(f"{path.name}.{why}")
    number = 2
    while target.exists():
        target = path.with_name(f"{path.name}.{why}-{number}")
        number += 1
    os.replace(path, target)
    return target


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` holds a training run (its ``run_config.json`` or a ``checkpoints/`` folder)."""
    return (path / RUN_CONFIG_FILE).is_file() or (path / CHECKPOINTS_DIR).is_dir()


def check_data_folder(data_dir: Path, split: str) -> None:
    """``--data`` is a dataset folder with a valid manifest, the split and its shard files (rank 0, before
    ``--out`` is created or touched)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        state = "not a folder" if data_dir.exists() else "no such folder"
        raise SrcidError(f"--data {data_dir}: {state} (the pretraining dataset folder, holding {MANIFEST_NAME})")
    if not (data_dir / MANIFEST_NAME).is_file() and (data_dir / "pretrain" / MANIFEST_NAME).is_file():
        raise SrcidError(f"--data {data_dir}: holds no {MANIFEST_NAME}; the pretraining dataset is "
                         f"{data_dir / 'pretrain'}: pass --data {data_dir / 'pretrain'}")
    manifest = load_manifest(data_dir)
    manifest.shard_paths(split)  # names the splits when there is no such split
    check_shard_files(manifest, split)


def prepare_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Check the run directory before a run reads or writes anything (rank 0 only).

    A new run needs a new or empty folder; an existing run is continued with
    ``--resume`` or deleted first with ``--overwrite`` (which clears only a
    run directory, never another folder). The folder must be writable.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise SrcidError(f"--out {run_dir}: exists and is not a folder")
    if not resume and run_dir.is_dir() and any(run_dir.iterdir()):
        if not is_run_dir(run_dir):
            raise SrcidError(f"--out {run_dir}: exists, is not empty and is not a run directory (no "
                             f"{RUN_CONFIG_FILE}); choose a new or empty folder")
        if not overwrite:
            raise SrcidError(f"--out {run_dir}: already holds a run; continue it with --resume, or delete it and "
                             "start a new one with --overwrite")
        clear_run_dir(run_dir)
    check_writable_folder(run_dir, "--out")


def clear_run_dir(run_dir: Path) -> None:
    """Delete everything in a run directory, ``run_config.json`` last (an interrupted clear is still a run)."""
    entries = sorted(run_dir.iterdir(), key=lambda p: p.name == RUN_CONFIG_FILE)
    try:
        for entry in entries:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    except OSError as exc:
        raise SrcidError(f"--overwrite: cannot clear {run_dir}: {exc.filename or run_dir}: "
                         f"{os_error_reason(exc)}") from None


def state_digest(state: dict) -> int:
    """A 62-bit digest of the exact bytes of a state dict's tensors (in key order)."""
    h = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        h.update(key.encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "little") >> 2


def export_run(run_dir: Path, out: Path, overwrite: bool = False) -> Path:
    """Inference weights of a run's latest checkpoint as safetensors + JSON (``srcid export``).

    The output folder is checked for writing first; the checkpoint is verified against the SHA-256 sums its
    ``COMPLETE`` records (a corrupt file is a one-line error naming it; no fallback to an older checkpoint)."""
    run_dir = Path(run_dir)
    out = _weights_path(out)
    if not overwrite:
        for path in (out, out.with_suffix(".json")):
            if path.exists():
                raise SrcidError(f"--out {out}: {path.name} exists; pass --overwrite to replace it")
    check_writable_folder(out.parent, f"--out {out}: its folder")
    config_path = run_dir / RUN_CONFIG_FILE
    if not config_path.is_file():
        raise SrcidError(f"{run_dir}: not a run directory (no {RUN_CONFIG_FILE})")
    config = load_run_config(config_path)
    latest = CheckpointManager(run_dir).latest()
    if latest is None:
        raise SrcidError(f"{run_dir}: no complete checkpoint under {run_dir / CHECKPOINTS_DIR}")
    verify_checkpoint(latest)  # a corrupt file is one line naming it; a checkpoint without sums loads unverified
    state = read_json_object(latest / TRAIN_STATE_FILE)
    model = build_model(config.variant, config.model, state["input_shapes"])
    try:
        model.load_state_dict(load_module_state(latest))
    except RuntimeError as exc:
        raise SrcidError(f"{latest}: the checkpoint does not fit {RUN_CONFIG_FILE}: {str(exc).splitlines()[0]}") from None
    return export_model(model, variant=config.variant, config=config.model, input_shapes=state["input_shapes"],
                        path=out, extra={"run_dir": str(run_dir), "checkpoint": str(latest), "step": state["step"],
                                         "epoch": state["epoch"]})


def model_input_shapes(manifest) -> dict:
    return {m: tuple(spec.shape) for m, spec in manifest.modalities.items()}


def main(argv=None, prog: str = "srcid train") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    trainer = None
    try:
        use_kernels(args)
        config = resolve_config(args)
        trainer = Trainer(config, args.data, args.out, resume=args.resume, ds_config_path=args.deepspeed_config,
                          progress=not args.quiet, overwrite=args.overwrite)
        trainer.train()
        if trainer.is_main:
            print(f"run directory: {args.out.resolve()}")
            print(f"exported model: {(args.out / MODEL_FILE).resolve()}")
        trainer.close(ok=True)
        return 0
    except SrcidError as exc:
        print(f"srcid: error: {exc}", file=sys.stderr)
        _stop(trainer, ok=_raised_on_every_rank(exc))
        return exc.exit_code
    except OSError as exc:  # a write that failed after the checks (a full disk): one line naming the path
        print(f"srcid: error: {os_error_line(exc)}", file=sys.stderr)
        _stop(trainer, ok=False)
        return 1
    except RuntimeError as exc:  # a collective DeepSpeed or autograd ran failed: a peer rank died or hung
        failure = dist_helpers.collective_failure(exc)
        if failure is None:
            raise  # not a failed collective: a bug, whose traceback is kept
        print(f"srcid: error: {failure}", file=sys.stderr)
        _stop(trainer, ok=False)
        return failure.exit_code


def _raised_on_every_rank(exc: BaseException) -> bool:
    return dist_helpers.raised_on_every_rank(exc)


def _stop(trainer, ok: bool) -> None:
    """Tear the process group down after an error, also one started by a Trainer that failed to build."""
    if trainer is not None:
        trainer.close(ok=ok)
        return
    dist_helpers.shutdown(synchronize=ok)
