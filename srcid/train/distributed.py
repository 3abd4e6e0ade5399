"""Process-group helpers for the DeepSpeed trainer: start, reduce, fail together, stop, seed.

Fault propagation has three layers:

1. A data error on one rank. Every step, at the same point on every rank
   (after fetching the batch, before the forward pass), the trainer calls
   :func:`stop_if_any_rank_failed`: a
   one-element all-reduce of "did this rank fail". The failing rank raises
   its own error, the others raise a one-line :class:`SrcidError` naming
   it, and all exit at the same step. It runs every step rather than every
   k steps because a rank that skips its batch would otherwise enter a
   different collective than its peers (the check must be at the same
   point of the same step everywhere). Its cost is one tiny all-reduce on
   the CPU (a gloo group, also under NCCL, so it never waits for the GPU
   stream): about 0.2 ms with two local gloo ranks, and it adds no
   waiting, because the ranks meet at the step's gradient all-reduce
   anyway.
2. Any other crash (an exception elsewhere, a killed process). The DeepSpeed
   launcher (``deepspeed/launcher/launch.py``, ``main``) polls its children
   every second and, as soon as one exits with a non-zero code, terminates
   the whole process tree of every rank (SIGTERM, SIGKILL after 30 s) and
   exits with that code.
3. A rank stuck or gone without a launcher to kill the others. The process
   group is created with a timeout (:data:`DEFAULT_TIMEOUT_S`); a collective
   that does not complete in that time raises on gloo (a peer that died
   makes it raise at once) and aborts the process on NCCL (PyTorch's NCCL
   watchdog with ``TORCH_NCCL_ASYNC_ERROR_HANDLING``, on by default). The
   timeout must exceed the longest time one rank spends outside collectives
   while the others wait (a checkpoint write, an evaluation on rank 0).
   The run config's ``timeout_s`` sets it (``--set timeout_s=10``).

The helpers here convert a failed collective into a one-line
:class:`SrcidError`; :func:`collective_failure` does the same at the
trainer's top level for the collectives DeepSpeed and autograd run
themselves, so a rank whose peer was killed exits with one
``srcid: error: rank R: ... failed (a peer rank exited or did not answer
within T s): ...`` line, not a hang or a traceback
(tests/test_reliability_faults.py).
"""
from __future__ import annotations

import os
import random
import socket
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_gather

from srcid.errors import SrcidError
from srcid.files import read_json_object

DEFAULT_TIMEOUT_S = 120.0
ZERO_STAGES = (0, 1, 2)
_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")


class _State:
    """What :func:`init_distributed` set up for the helpers below."""

    device = torch.device("cpu")
    timeout_s = DEFAULT_TIMEOUT_S
    fault_group = None


_state = _State()


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _skip_cpu_inference_op() -> None:
    """Stop DeepSpeed's CPU backend from JIT-compiling its shared-memory op.

    That op serves only ``inference_all_reduce``; training never calls it,
    and building it needs a C++ compiler and takes about 40 s on first use.
    """
    try:
        import deepspeed.ops  # deepspeed is imported by the functions that start it (seconds), as below

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except (ImportError, AttributeError, TypeError):
        pass


def init_distributed(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S):
    """Start the process group through DeepSpeed; return ``(rank, world_size, local_rank, device)``.

    ``backend`` defaults to ``nccl`` when DeepSpeed's accelerator is CUDA and
    ``gloo`` otherwise (``DS_ACCELERATOR=cpu``). Without launcher variables
    (``RANK``, ``WORLD_SIZE``, ...) it runs as a single process on a free
    local port. Under NCCL a second, gloo group carries the fault flag.
    """
    import deepspeed  # here, not at the top: the run contract and the study import this module
    from deepspeed.accelerator import get_accelerator

    if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
        raise SrcidError(f"distributed timeout must be a positive number of seconds, got {timeout_s!r}")
    accelerator = get_accelerator()
    on_cuda = accelerator.device_name() == "cuda"
    backend = backend or ("nccl" if on_cuda else "gloo")
    if backend not in ("nccl", "gloo"):
        raise SrcidError(f"distributed backend must be 'nccl' or 'gloo', got {backend!r}")
    if backend == "nccl" and not on_cuda:
        raise SrcidError("distributed backend 'nccl' needs CUDA; DeepSpeed's accelerator here is "
                         f"{accelerator.device_name()!r} (use gloo)")
    present = [name for name in _LAUNCHER_ENV if name in os.environ]
    if not present:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    elif len(present) != len(_LAUNCHER_ENV):
        missing = [name for name in _LAUNCHER_ENV if name not in os.environ]
        raise SrcidError(f"distributed launch: environment variables {', '.join(missing)} are missing "
                         f"(found {', '.join(present)}); start with `deepspeed` or set all of "
                         f"{', '.join(_LAUNCHER_ENV)}")
    local_rank = int(os.environ["LOCAL_RANK"])
    if on_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        _skip_cpu_inference_op()
        device = torch.device("cpu")
    timeout = timedelta(seconds=float(timeout_s))
    try:
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout, verbose=False,
                                   auto_mpi_discovery=False)
    except (RuntimeError, ValueError) as exc:
        raise SrcidError(f"could not start the {backend} process group "
                         f"(rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']}, "
                         f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}): "
                         f"{' '.join(str(exc).split())[:300]}") from None
    _state.device, _state.timeout_s = device, float(timeout_s)
    if backend == "gloo" or dist.get_world_size() == 1:
        _state.fault_group = None
    else:
        _state.fault_group = dist.new_group(backend="gloo", timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), local_rank, device


def get_rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


# What gloo and NCCL errors say when a peer is gone or late; a RuntimeError that holds one of these, raised
# while a process group of several ranks is up, is a failed collective (collective_failure).
_PEER_LOSS_MARKERS = ("gloo/transport", "Connection closed by peer", "Connection reset by peer", "Timed out waiting",
                      "NCCL", "ProcessGroup")
# gloo appends a sentence of general advice (and an emoji) to every transport error: cut from here
_GLOO_ADVICE = " This is typically caused by"


def _detail(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    cut = text.find(_GLOO_ADVICE)
    if cut > 0:
        text = text[:cut]
    return text[:300]


def _collective_failed(name: str, exc: BaseException) -> SrcidError:
    return SrcidError(f"rank {get_rank()}: {name} failed (a peer rank exited or did not answer within "
                      f"{_state.timeout_s:g} s): {_detail(exc)}")


def collective_failure(exc: BaseException) -> SrcidError | None:
    """A one-line :class:`SrcidError` for a collective that failed outside these helpers, else None.

    DeepSpeed's own collectives (the gradient all-reduce in ``engine.backward``,
    ZeRO's reduce-scatter and all-gather, its checkpoint barriers) and the
    backward pass of :class:`BatchGather` raise gloo's or NCCL's error as it
    is, a ``RuntimeError`` (``torch.distributed.DistError`` for some). The
    trainer's top level turns such an error into this line instead of a
    traceback, when a process group of several ranks is up (with a single
    process there is no peer to lose, and any other ``RuntimeError`` is a bug
    whose traceback is kept).
    """
    if not isinstance(exc, RuntimeError) or get_world_size() < 2:
        return None
    text = str(exc)
    if isinstance(exc, dist.DistError) or any(marker in text for marker in _PEER_LOSS_MARKERS):
        return _collective_failed("a collective operation", exc)
    return None


def barrier() -> None:
    """Wait for every rank (no-op for a single process)."""
    if get_world_size() == 1:
        return
    try:
        dist.barrier()
    except RuntimeError as exc:
        raise _collective_failed("barrier", exc) from None


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place and return it (no-op for a single process)."""
    if get_world_size() == 1:
        return tensor
    try:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    except RuntimeError as exc:
        raise _collective_failed("all_reduce", exc) from None
    return tensor


def all_reduce_mean(values: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Mean over ranks of scalar tensors, with one collective and one host sync.

    Every rank must pass the same keys; they are reduced in sorted order.
    Meant for logging steps.
    """
    if not values:
        return {}
    keys = sorted(values)
    parts = []
    device = None
    for key in keys:
        value = values[key]
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise SrcidError(f"all_reduce_mean: {key!r} has shape {tuple(value.shape)}, expected a scalar")
            device = device or value.device
            parts.append(value.detach().reshape(1))
        else:
            parts.append(torch.tensor([float(value)]))
    device = device or _state.device
    flat = torch.cat([p.to(device=device, dtype=torch.float64) for p in parts])
    all_reduce_sum_(flat)
    means = (flat / get_world_size()).tolist()
    return dict(zip(keys, means))


def exchange_step_status(local_error: bool, batch_size: int = 0) -> tuple[list[int], list[int]]:
    """One small all-reduce on the CPU fault group: ``(failed ranks, every rank's batch size)``."""
    size = get_world_size()
    table = torch.zeros(2, size, dtype=torch.int64)
    table[0, get_rank()] = 1 if local_error else 0
    table[1, get_rank()] = int(batch_size)
    if size > 1:
        try:
            dist.all_reduce(table, op=dist.ReduceOp.SUM, group=_state.fault_group)
        except RuntimeError as exc:
            raise _collective_failed("fault check", exc) from None
    flags, sizes = table.tolist()
    return [r for r, flag in enumerate(flags) if flag], sizes


def stop_if_any_rank_failed(error: BaseException | None, batch_size: int = 0) -> list[int]:
    """Raise on every rank when any rank has an error: its own error there, a SrcidError elsewhere.

    Otherwise return every rank's ``batch_size`` (the sizes :class:`BatchGather` needs), learned in the
    same collective.
    """
    failed, sizes = exchange_step_status(error is not None, batch_size)
    if error is not None:
        error.on_every_rank = True
        raise error
    if failed:
        names = ", ".join(str(r) for r in failed)
        stop = SrcidError(f"rank {get_rank()}: stopping because rank(s) {names} failed (see their error)")
        stop.on_every_rank = True
        raise stop
    return sizes


def raised_on_every_rank(exc: BaseException) -> bool:
    """Whether ``exc`` came from :func:`stop_if_any_rank_failed`: then every rank stopped at the same
    step and is alive, so the shutdown can wait for all of them (``shutdown(synchronize=True)``), which
    tears the process group down without a peer closing its connections mid-teardown."""
    return bool(getattr(exc, "on_every_rank", False))


class BatchGather:
    """Concatenate a tensor's batch dimension across ranks, differentiably.

    The batch-coupled losses (CPC and CMCM negatives, CLUB's all-pairs
    negative and its q_theta fit) see the global batch through it, so that W
    ranks with batch b compute what one process with batch W*b computes.
    Gradients flow back to each rank's own rows (``torch.distributed.nn``'s
    all_gather sums the gradient copies of every rank, and the engine's
    gradient averaging divides by W). Batch sizes may differ between ranks
    (the last batch of an epoch): the trainer sets :attr:`sizes` every step
    from :func:`stop_if_any_rank_failed`, rows are padded to the largest size
    for the collective and the padding is dropped again.
    """

    def __init__(self):
        self.sizes: list[int] = []

    def __call__(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        if get_world_size() == 1:
            return tensor
        if tensor.shape[dim] != self.sizes[get_rank()]:
            raise SrcidError(f"batch gather: this rank's tensor has {tensor.shape[dim]} rows along dim {dim}, "
                             f"the step's batch size is {self.sizes[get_rank()]}")
        largest = max(self.sizes)
        padded = tensor
        if tensor.shape[dim] < largest:
            pad_shape = list(tensor.shape)
            pad_shape[dim] = largest - tensor.shape[dim]
            padded = torch.cat([tensor, tensor.new_zeros(pad_shape)], dim=dim)
        try:
            parts = all_gather(padded.contiguous())
        except RuntimeError as exc:
            raise _collective_failed("all_gather", exc) from None
        return torch.cat([part.narrow(dim, 0, n) for part, n in zip(parts, self.sizes)], dim=dim)


def shutdown(synchronize: bool = True) -> None:
    """Tear the process group down; with ``synchronize``, wait for every rank first.

    Call it at the end of every run (processes can crash at exit without it),
    with ``synchronize=False`` on an error path, where peers may be gone.
    """
    if not dist.is_initialized():
        return
    try:
        if synchronize:
            barrier()
    finally:
        dist.destroy_process_group()
        _state.fault_group = None


def rank_seed(seed: int, rank: int) -> int:
    """The seed of ``rank``: ``seed`` itself for rank 0, a well-mixed derived value for the others."""
    if rank == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(rank)]).generate_state(1)[0])


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed python, numpy and torch (all devices) with :func:`rank_seed`; return the seed used.

    Build the model after ``seed_everything(seed, 0)`` on every rank, so the
    parameters and the buffers (which DeepSpeed does not broadcast, e.g. the
    codebook) start identical everywhere; then call
    ``seed_everything(seed, rank)`` for the per-rank streams (dropout).
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise SrcidError(f"seed must be a non-negative int, got {seed!r}")
    value = rank_seed(seed, rank)
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)
    return value


def load_ds_config(path, *, zero_stage: int | None = None, micro_batch_size: int | None = None,
                   gradient_accumulation_steps: int | None = None, lr: float | None = None,
                   grad_clip: float | None = None) -> dict:
    """Read a DeepSpeed JSON config and set the keys a run config owns (each keyword given replaces the file's).

    The package's ``srcid/train/ds_config_cpu.json`` (fp32) and
    ``srcid/train/ds_config_gpu.json`` (bf16) hold only what a run config has
    no key for: Adam built by DeepSpeed as ``torch.optim.Adam``
    (``torch_adam``: nothing to compile; ``adam_w_mode`` false: DeepSpeed's
    "Adam" otherwise means AdamW) and the precision. Micro batch,
    accumulation, ZeRO stage, learning rate and clipping come from the run
    config (:func:`srcid.train.trainer.engine_config` passes them all), so
    each has one source: a value in the file would only be overwritten.
    Only the parameters handed to ``deepspeed.initialize`` are optimised:
    the CLUB networks have their own Adam and stay out of it.
    """
    path = Path(path)
    config = read_json_object(path)
    if zero_stage is not None:
        if zero_stage not in ZERO_STAGES:
            raise SrcidError(f"ZeRO stage must be one of {ZERO_STAGES}, got {zero_stage!r}")
        config.setdefault("zero_optimization", {})["stage"] = zero_stage
    for key, value in (("train_micro_batch_size_per_gpu", micro_batch_size),
                       ("gradient_accumulation_steps", gradient_accumulation_steps)):
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SrcidError(f"{key} must be a positive int, got {value!r}")
            config[key] = value
    if lr is not None:
        config.setdefault("optimizer", {}).setdefault("params", {})["lr"] = lr
    if grad_clip is not None:
        config["gradient_clipping"] = grad_clip
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in ZERO_STAGES:
        raise SrcidError(f"{path}: zero_optimization.stage must be one of {ZERO_STAGES}, got {stage!r}")
    return config
