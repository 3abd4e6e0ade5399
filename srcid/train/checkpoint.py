"""Checkpoints: written atomically, the last n kept, resumed exactly, loaded without unpickling code.

Layout of a run directory::

    run_dir/checkpoints/
        step-00001234/        complete checkpoints (each holds a COMPLETE file)
        latest                the name of the newest complete checkpoint
        .tmp-step-00001240/   a checkpoint being written (never loaded)

:class:`CheckpointManager` writes each checkpoint into ``.tmp-step-N`` and
renames it to ``step-N`` only once every rank has finished its part, so a
crash or a full disk never leaves a half-written checkpoint under a final
name. ``COMPLETE`` records the SHA-256 of every file of the checkpoint
(hashed in parallel, each rank a share of the files, once all ranks have
written theirs); :func:`verify_checkpoint` checks them before a checkpoint
is used (``--resume``, ``srcid export``) and names a corrupt file in one
line. Checkpoints written before the hashes were recorded load unverified.
The rest of the module saves and restores the state that DeepSpeed
does not hold: RNG states (per rank), small JSON state (step, epoch,
position in the epoch, warm-start state, config) and plain tensor files.
Every load is ``torch.load(weights_only=True)``: only tensors and plain
containers are read back, never arbitrary pickled objects (DeepSpeed's own
loader is run under a forced ``weights_only`` with a short allowlist of
DeepSpeed data classes, see :func:`load_engine`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from srcid.errors import CorruptFileError, SrcidError
from srcid.files import fsync_path, write_atomic
from srcid.run import CHECKPOINTS_DIR

COMPLETE_FILE = "COMPLETE"
LATEST_FILE = "latest"
ENGINE_TAG = "engine"
_FINAL_RE = re.compile(r"^step-(\d+)$")
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
_MARKER_RE = re.compile(r"^\.rank-\d+\.done$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
HASH_CHUNK = 1 << 20


def _one_line(error: BaseException, limit: int = 400) -> str:
    text = " ".join(str(error).split())
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _load_error(error: BaseException) -> str:
    """One line for a failed load; names the refused global of a weights-only load."""
    match = re.search(r"unsupported (?:global: )?GLOBAL ([\w.]+)", str(error), re.IGNORECASE)
    if match:
        return f"refused to unpickle {match.group(1)} (only tensors and plain containers are loaded)"
    return _one_line(error)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(Path(folder))


def file_sha256(path) -> str:
    """SHA-256 (hex) of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(HASH_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


# Test hook, used only by tests/test_reliability_faults.py: SRCID_TEST_CHECKPOINT_PAUSE=STEP:STAGE:FILE makes the
# save of checkpoint STEP stop at STAGE (one of PAUSE_STAGES), create FILE and sleep, so that a test can kill the
# process at exactly that point of the write. Unset (always, outside that test) it costs one dictionary lookup.
TEST_PAUSE_ENV = "SRCID_TEST_CHECKPOINT_PAUSE"
PAUSE_STAGES = (
    "created",     # rank 0 made .tmp-step-N, nothing written into it
    "hashed",      # every rank's files are in .tmp-step-N, the done-markers hold their sums, no COMPLETE
    "marked",      # COMPLETE is written inside .tmp-step-N, not renamed
    "renamed",     # renamed to step-N, the latest pointer not updated, nothing pruned
    "discarding",  # an old checkpoint (pruned or replaced) renamed to .trash-step-M, not yet deleted
)


def _test_pause(step: int, stage: str) -> None:
    spec = os.environ.get(TEST_PAUSE_ENV)
    if not spec:
        return
    want_step, want_stage, flag = spec.split(":", 2)
    if int(want_step) == step and want_stage == stage:
        Path(flag).write_text(f"{step}:{stage}\n")
        time.sleep(600)  # the test kills the process here


def checkpoint_name(step: int) -> str:
    """Directory name of the checkpoint of ``step``: ``step-00001234``."""
    return f"step-{step:08d}"


def checkpoint_step(path) -> int:
    """The step a checkpoint directory belongs to (from its name)."""
    match = _FINAL_RE.match(Path(path).name)
    if not match:
        raise SrcidError(f"{path}: not a checkpoint directory (expected a name like step-00001234)")
    return int(match.group(1))


def is_complete(path) -> bool:
    """Whether ``path`` is a finished checkpoint directory."""
    path = Path(path)
    return _FINAL_RE.match(path.name) is not None and (path / COMPLETE_FILE).is_file()


def checkpoint_files(directory) -> list[str]:
    """The files of a checkpoint directory (relative POSIX paths, sorted), without ``COMPLETE`` and rank markers."""
    directory = Path(directory)
    found = []
    for folder, _, files in os.walk(directory):
        for name in files:
            path = Path(folder) / name
            rel = path.relative_to(directory).as_posix()
            if rel == COMPLETE_FILE or (Path(folder) == directory and _MARKER_RE.match(name)):
                continue
            found.append(rel)
    return sorted(found)


def _corrupt(directory: Path, name: str, problem: str) -> CorruptFileError:
    """``RUN: checkpoints/step-N/NAME PROBLEM``: the file named relative to the run directory."""
    directory = Path(directory)
    if directory.parent.name == CHECKPOINTS_DIR:
        run, rel = directory.parent.parent, f"{CHECKPOINTS_DIR}/{directory.name}/{name}"
    else:
        run, rel = directory.parent, f"{directory.name}/{name}"
    return CorruptFileError(f"{run}: {rel} {problem}")


def recorded_hashes(directory) -> dict | None:
    """``{relative path: SHA-256}`` from a checkpoint's ``COMPLETE``; None for a checkpoint written without them."""
    directory = Path(directory)
    path = directory / COMPLETE_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SrcidError(f"{directory}: not a complete checkpoint (no {COMPLETE_FILE})") from None
    except (OSError, ValueError) as exc:
        raise _corrupt(directory, COMPLETE_FILE, f"is corrupt (not a readable completion marker: {_one_line(exc)})") from None
    if not isinstance(info, dict):
        raise _corrupt(directory, COMPLETE_FILE, "is corrupt (not a JSON object)")
    hashes = info.get("sha256")
    if hashes is None:
        return None
    if not isinstance(hashes, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and _SHA256_RE.match(v) for k, v in hashes.items()):
        raise _corrupt(directory, COMPLETE_FILE, "is corrupt (its sha256 entry is not a map of file to SHA-256)")
    for name in hashes:
        if name.startswith("/") or ".." in Path(name).parts:
            raise _corrupt(directory, COMPLETE_FILE, f"is corrupt (names a file outside the checkpoint: {name!r})")
    return hashes


_MISSING, _UNREADABLE = -1, -2


def verify_checkpoint(directory, *, rank: int = 0, world_size: int = 1,
                      reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> bool:
    """Check every file of a checkpoint against the SHA-256 recorded in its ``COMPLETE``.

    Returns True when verified, False for a checkpoint written without hashes
    (loaded unverified). A mismatch, a missing or an unreadable file raises a
    one-line :class:`CorruptFileError` naming the file relative to the run
    directory, with the expected and found hash prefixes. With several ranks,
    each hashes a share of the files and ``reduce`` (a sum over ranks of an
    int64 tensor, e.g. an all-reduce) shares the results, so every rank
    reaches the same verdict; every rank must call it.
    """
    directory = Path(directory)
    hashes = recorded_hashes(directory)
    if hashes is None:
        return False
    names = sorted(hashes)
    codes = torch.zeros(len(names), dtype=torch.int64)
    for i in range(rank, len(names), world_size):
        try:
            actual = file_sha256(directory / names[i])
        except FileNotFoundError:
            codes[i] = _MISSING
            continue
        except OSError:
            codes[i] = _UNREADABLE
            continue
        # 0: intact; otherwise 1 + the first 48 bits of the hash found (shared in the same sum)
        codes[i] = 0 if actual == hashes[names[i]] else 1 + int(actual[:12], 16)
    if reduce is not None and world_size > 1:
        codes = reduce(codes)
    for name, code in zip(names, codes.tolist()):
        if code == 0:
            continue
        if code == _MISSING:
            raise _corrupt(directory, name, f"is missing (the checkpoint's {COMPLETE_FILE} lists it)")
        if code == _UNREADABLE:
            raise _corrupt(directory, name, "cannot be read")
        raise _corrupt(directory, name, f"is corrupt (SHA-256 expected {hashes[name][:12]}, found {code - 1:012x})")
    return True


class CheckpointManager:
    """Atomic checkpoints in ``run_dir/checkpoints``, keeping the newest ``keep_last``.

    Multi-rank protocol: every rank constructs the manager with its ``rank``,
    the ``world_size`` and a ``barrier`` callable (e.g.
    ``torch.distributed.barrier``), and every rank calls :meth:`save` with the
    same step. Then

    1. rank 0 removes stale temporary directories of crashed saves and
       creates ``.tmp-step-N``; barrier;
    2. every rank runs ``write_fn(tmp_dir)`` (e.g. DeepSpeed's
       ``save_checkpoint``, which writes per-rank ZeRO shards, plus the
       rank's RNG file); barrier;
    3. every rank whose write succeeded hashes its share of all the files
       (file ``i`` of the sorted list goes to rank ``i mod world_size``)
       and writes the sums into its per-rank done-marker; barrier;
    4. rank 0 checks that all ``world_size`` markers are there, merges
       their sums (hashing any file no rank listed), fsyncs the tree,
       writes ``COMPLETE`` with every file's SHA-256, renames to
       ``step-N``, updates ``latest`` and prunes old checkpoints; if a
       marker is missing it deletes the temporary directory instead;
       barrier;
    5. every rank checks that ``step-N/COMPLETE`` exists: all ranks return
       the same final path, or all raise :class:`SrcidError`.

    Ranks do not exchange the directory name: it is a function of the step.
    A rank whose ``write_fn`` fails still takes part in the barriers and
    raises afterwards, so no rank waits forever. The checkpoint directory
    must be on a file system all ranks see (as for DeepSpeed's own
    checkpoints). Only one run may write to a ``run_dir`` at a time.
    """

    def __init__(self, run_dir, keep_last: int = 3, *, rank: int = 0, world_size: int = 1,
                 barrier: Callable[[], object] | None = None):
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise SrcidError(f"checkpoint keep_last must be an int >= 1, got {keep_last!r}")
        if not 0 <= rank < world_size:
            raise SrcidError(f"checkpoint manager: rank {rank} is outside world size {world_size}")
        if world_size > 1 and barrier is None:
            raise SrcidError("checkpoint manager: a barrier callable is needed when world_size > 1")
        self.run_dir = Path(run_dir)
        self.directory = self.run_dir / CHECKPOINTS_DIR
        self.keep_last = keep_last
        self.rank, self.world_size = rank, world_size
        self._barrier = barrier if barrier is not None else (lambda: None)
        self._saving = -1  # the step being saved (for the test hook in _discard)

    def path_for(self, step: int) -> Path:
        """Final directory of the checkpoint of ``step``."""
        return self.directory / checkpoint_name(step)

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if p.is_dir() and is_complete(p)]
        return sorted(found, key=checkpoint_step)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None; temporary and incomplete directories are ignored."""
        found = self.checkpoints()
        return found[-1] if found else None

    def _marker(self, rank: int) -> str:
        return f".rank-{rank:05d}.done"

    def _clean_stale(self) -> None:
        for entry in self.directory.iterdir():
            if entry.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)) or (
                    entry.name.startswith(f".{LATEST_FILE}.tmp-")):
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)

    def _discard(self, path: Path) -> None:
        """Rename to a trash name (atomic, so it never looks complete), then delete."""
        trash = path.with_name(f"{_TRASH_PREFIX}{path.name}")
        if trash.exists():
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(path, trash)
        _test_pause(self._saving, "discarding")
        shutil.rmtree(trash, ignore_errors=True)

    def _write_hashes(self, tmp: Path) -> None:
        """Hash this rank's share of the checkpoint's files into its done-marker (after every rank wrote)."""
        share = checkpoint_files(tmp)[self.rank::self.world_size]
        hashes = {name: file_sha256(tmp / name) for name in share}
        with open(tmp / self._marker(self.rank), "w", encoding="utf-8") as handle:
            handle.write(json.dumps(hashes))
            handle.flush()
            os.fsync(handle.fileno())

    def _commit(self, step: int, tmp: Path, final: Path) -> None:
        hashes = {}
        for rank in range(self.world_size):
            marker = tmp / self._marker(rank)
            hashes.update(json.loads(marker.read_text(encoding="utf-8")))
            marker.unlink()
        for name in checkpoint_files(tmp):
            if name not in hashes:  # a file another rank's listing did not show yet (a lagging shared file system)
                hashes[name] = file_sha256(tmp / name)
        _fsync_tree(tmp)
        info = {"step": step, "world_size": self.world_size, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "sha256": dict(sorted(hashes.items()))}
        write_atomic(tmp / COMPLETE_FILE, json.dumps(info) + "\n", sync_folder=True)
        _test_pause(step, "marked")
        if final.exists():
            self._discard(final)
        os.replace(tmp, final)
        fsync_path(self.directory)
        _test_pause(step, "renamed")
        # The checkpoint is complete from here on; the pointer and the pruning
        # are housekeeping, so their failure is a warning, not a failed save.
        try:
            write_atomic(self.directory / LATEST_FILE, final.name + "\n", sync_folder=True)
            for old in self.checkpoints()[:-self.keep_last]:
                self._discard(old)
        except (OSError, SrcidError) as exc:
            warnings.warn(f"checkpoint {final} is complete, but updating {self.directory / LATEST_FILE} "
                          f"or removing old checkpoints failed: {_one_line(exc)}", stacklevel=3)

    def save(self, step: int, write_fn: Callable[[Path], object]) -> Path:
        """Write the checkpoint of ``step`` through ``write_fn(tmp_dir)``; return its final path.

        On failure the previous checkpoints are untouched and every rank
        raises a one-line :class:`SrcidError` naming the directory.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise SrcidError(f"checkpoint step must be a non-negative int, got {step!r}")
        final = self.path_for(step)
        tmp = self.directory / f"{_TMP_PREFIX}{final.name}"
        self._saving = step
        previous = self.latest()
        error: BaseException | None = None
        if self.rank == 0:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                self._clean_stale()
                tmp.mkdir()
            except OSError as exc:
                error = exc
        self._barrier()
        _test_pause(step, "created")
        if error is None:
            try:
                if not tmp.is_dir():
                    raise FileNotFoundError(f"temporary directory {tmp} is missing (rank 0 could not create it)")
                write_fn(tmp)
            except Exception as exc:  # reported below as one line, with the cause chained
                error = exc
        self._barrier()
        if error is None:  # every rank's files are written: each hashes its share into its done-marker
            try:
                self._write_hashes(tmp)
            except Exception as exc:
                error = exc
        self._barrier()
        _test_pause(step, "hashed")
        if self.rank == 0:
            missing = [r for r in range(self.world_size) if not (tmp / self._marker(r)).exists()]
            try:
                if missing or error is not None:
                    if tmp.exists():
                        shutil.rmtree(tmp, ignore_errors=True)
                else:
                    self._commit(step, tmp, final)
            except (OSError, ValueError) as exc:
                error = error or exc
                shutil.rmtree(tmp, ignore_errors=True)
        self._barrier()
        kept = f"; the previous checkpoint {previous} is kept" if previous else ""
        if error is not None:
            raise SrcidError(f"could not write checkpoint {tmp} (rank {self.rank}): "
                             f"{_one_line(error)}{kept}") from error
        if not is_complete(final):
            raise SrcidError(f"checkpoint {final} was not completed: another rank failed to write its part "
                             f"(see its error){kept}")
        return final


# ---------------------------------------------------------------- tensors and JSON

def save_tensors(path, obj) -> None:
    """``torch.save`` a structure of tensors and plain values to ``path`` atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_tensors(path, map_location="cpu"):
    """Load a :func:`save_tensors` file with ``weights_only=True`` (no arbitrary objects)."""
    path = Path(path)
    if not path.is_file():
        raise SrcidError(f"{path}: file not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise SrcidError(f"{path}: cannot load: {_load_error(exc)}") from None


# ---------------------------------------------------------------- RNG states

def capture_rng_state(generators: dict[str, torch.Generator] | None = None) -> dict:
    """Python, numpy, torch CPU/CUDA and the given generators' states as tensors and plain values."""
    version, internal, gauss_next = random.getstate()
    bit_generator, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "numpy": {"bit_generator": str(bit_generator), "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {name: gen.get_state() for name, gen in (generators or {}).items()},
    }
    return state


def restore_rng_state(state: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    """Restore what :func:`capture_rng_state` captured (the same generator names must be given)."""
    expected = {"python", "numpy", "torch", "cuda", "generators"}
    if not isinstance(state, dict) or set(state) != expected:
        raise SrcidError(f"RNG state: expected keys {sorted(expected)}, got "
                         f"{sorted(state) if isinstance(state, dict) else type(state).__name__}")
    generators = generators or {}
    saved_names, names = sorted(state["generators"]), sorted(generators)
    if saved_names != names:
        raise SrcidError(f"RNG state: saved generators {saved_names}, given {names}")
    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if state["cuda"] and len(state["cuda"]) != cuda_count:
        raise SrcidError(f"RNG state: saved with {len(state['cuda'])} CUDA device(s), this process sees {cuda_count}")
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((npy["bit_generator"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, gen in generators.items():
        gen.set_state(state["generators"][name])


def rng_state_path(directory, rank: int) -> Path:
    """Per-rank RNG file inside a checkpoint directory."""
    return Path(directory) / f"rng-rank{rank:05d}.pt"


def save_rng_state(path, generators: dict[str, torch.Generator] | None = None) -> None:
    """Capture the RNG states and write them to ``path``."""
    save_tensors(path, capture_rng_state(generators))


def load_rng_state(path, generators: dict[str, torch.Generator] | None = None) -> None:
    """Read RNG states from ``path`` (``weights_only``) and restore them."""
    state = load_tensors(path)
    try:
        restore_rng_state(state, generators)
    except SrcidError as exc:
        raise SrcidError(f"{path}: {exc}") from None
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise SrcidError(f"{path}: malformed RNG state: {_one_line(exc)}") from None


# ---------------------------------------------------------------- DeepSpeed engine state

def deepspeed_safe_globals() -> list:
    """DeepSpeed data classes that its ZeRO checkpoints pickle (plain data, no code on load)."""
    # deepspeed here, not at the top: `srcid export` and the run contract import this module without an engine
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def _forced_weights_only(allowed: list):
    """Make every ``torch.load`` inside the block ``weights_only=True``, with ``allowed`` globals."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def save_engine(engine, directory) -> None:
    """Write a DeepSpeed engine's state (module, optimizer, ZeRO shards) into ``directory``.

    Every rank must call it (DeepSpeed synchronises inside); meant for the
    ``write_fn`` of :meth:`CheckpointManager.save`.
    """
    engine.save_checkpoint(str(directory), tag=ENGINE_TAG, save_latest=False)


def load_module_state(directory) -> dict:
    """The model's state dict from :func:`save_engine`'s files, without a DeepSpeed engine.

    Reads ``engine/mp_rank_00_model_states.pt`` (the full module state under
    ZeRO stages 0-2) with ``weights_only`` loading.
    """
    path = Path(directory) / ENGINE_TAG / "mp_rank_00_model_states.pt"
    if not path.is_file():
        raise SrcidError(f"{path}: missing: not a complete srcid checkpoint")
    try:
        with _forced_weights_only(deepspeed_safe_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SrcidError(f"{path}: cannot read the model state: {_load_error(exc)}") from None
    if not isinstance(state, dict) or not isinstance(state.get("module"), dict):
        raise SrcidError(f"{path}: no 'module' state dict in the checkpoint")
    return state["module"]


def load_engine(engine, directory, **kwargs) -> dict:
    """Load :func:`save_engine`'s state into ``engine``; returns DeepSpeed's client state.

    DeepSpeed's loader calls ``torch.load(weights_only=False)``; here it
    runs with ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` set, so only tensors, plain
    containers and :func:`deepspeed_safe_globals` are accepted. ``kwargs``
    go to ``engine.load_checkpoint`` (e.g. ``load_optimizer_states``).
    """
    directory = Path(directory)
    if not (directory / ENGINE_TAG).is_dir():
        raise SrcidError(f"{directory}: no DeepSpeed engine state (missing {ENGINE_TAG}/)")
    try:
        with _forced_weights_only(deepspeed_safe_globals()):
            path, client_state = engine.load_checkpoint(str(directory), tag=ENGINE_TAG, **kwargs)
    except SrcidError:
        raise
    except Exception as exc:
        raise SrcidError(f"{directory}: cannot load the DeepSpeed engine state: {_load_error(exc)}") from None
    if path is None:
        raise SrcidError(f"{directory}: DeepSpeed found no engine state to load under {ENGINE_TAG}/")
    return client_state or {}
