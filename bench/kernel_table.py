#!/usr/bin/env python
"""One table of the hot ops on this machine: fused, reference and naive, beside each roofline floor.

    python bench/kernel_table.py [--out DIR] [--quick]

On CUDA, at the paper's sizes (L = 400 codes, D = 256, 3 groups):

* one quantizer step (nearest code with statistics for 3 groups, then the EMA
  update) at N = 2400 and 7680 rows: fused (replayed from a CUDA graph, and
  eager), fused with deterministic statistics, the reference, and the naive
  eager step of ``testing/oracles.py`` (dense ``N x L`` distances and one-hot);
* CLUB forward + backward of ``mean(positive - negative)``: the fused exact
  all-pairs bound, the reference, the sampled estimator (``club_sample``) and
  the naive ``N x N x D`` form where its pair tensors fit.

Before a fused case is timed, its result is checked against the reference on
the GPU (a mismatch is printed, marked ``MISMATCH`` in the table, the case is
not timed, and the script exits 1). Times are medians of
``triton.testing.do_bench`` (CUDA events, L2 flushed before each call); the
peak extra memory is ``torch.cuda.max_memory_allocated`` above what was
allocated before the call. The floor of each case is
``max(FLOPs / peak FLOP/s, bytes / bandwidth)`` with the device's float32
(non-tensor-core) rate and memory bandwidth from :data:`PEAKS`; on another
device they are measured (device-to-device copy; float32 GEMM with TF32 off).

Without CUDA only ``--quick`` runs: the reference and naive paths at small
sizes with CPU wall-clock timing, the fused cases marked ``skipped: no CUDA``,
so that the script's own logic can be tested anywhere.

Writes ``kernel_table.md`` (one markdown table under a short header) and
``kernel_table.json`` into ``--out`` (default ``out/kernel_table``).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # testing.oracles; srcid without an install
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from srcid import ops  # noqa: E402
from testing.oracles import (  # noqa: E402
    club_all_pairs_bytes,
    club_naive,
    club_sample,
    ema_update_naive,
    nearest_code_naive,
)

GROUPS, DECAY, EPS = 3, 0.99, 1e-5
NAIVE_TEMPORARIES = 4  # pair tensors alive at once in forward + backward of the naive CLUB form
NO_CUDA = "skipped: no CUDA"

# Device name (substring, first match wins) -> float32 FLOP/s without tensor cores, memory bytes/s.
# Datasheet figures; the nearest-code kernel's IEEE tl.dot runs on the FMA units, not tensor cores.
PEAKS = (
    ("H200", 67e12, 4.8e12),
    ("H100 PCIe", 51e12, 2.0e12),
    ("H100", 67e12, 3.35e12),  # SXM
    ("A100", 19.5e12, 2.0e12),  # SXM 80 GB
)

GOAL_NAIVE_SPEEDUP = 20.0  # fused quantizer step at least this many times faster than the naive eager step
GOAL_FLOOR_RATIO = 3.0  # ... and within this factor of its floor
GOAL_CLUB_VS_SAMPLED = 1.5  # exact all-pairs CLUB within this factor of the sampled estimator


@dataclasses.dataclass(frozen=True)
class Sizes:
    codes: int
    dim: int
    rows: tuple  # N of the quantizer step (GROUPS equal blocks)
    club: dict  # name -> CLUB input shape [..., N, D]


FULL = Sizes(
    codes=400, dim=256, rows=(2400, 7680),
    club={
        "[2,2,10,80,256] per step": (2, 2, 10, 80, 256),
        "[2,10,80,512] per step": (2, 10, 80, 512),
        "[2,2,10,256,256] per step": (2, 2, 10, 256, 256),
        "[2400,256] pooled": (2400, 256),
        "[7680,256] pooled": (7680, 256),
        "[7680,512] pooled": (7680, 512),
    },
)
QUICK = Sizes(codes=64, dim=32, rows=(240,), club={"[2,3,40,32] per step": (2, 3, 40, 32), "[240,32] pooled": (240, 32)})


@dataclasses.dataclass
class Machine:
    device: torch.device
    name: str
    flops: Optional[float]  # float32 FLOP/s used for the floor
    bandwidth: Optional[float]  # bytes/s used for the floor
    source: str  # where those two come from
    copy_bandwidth: Optional[float] = None  # measured device-to-device copy, bytes read + written per second
    interpret: bool = False  # fused kernels in Triton's interpreter on CPU (logic check; times meaningless)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def fused(self) -> bool:
        return self.cuda or self.interpret


@dataclasses.dataclass
class Row:
    op: str
    case: str
    path: str
    status: str = "ok"  # ok | skipped: ... | MISMATCH: ... | error: ...
    ms: Optional[float] = None  # median
    ms_p20: Optional[float] = None
    ms_p80: Optional[float] = None
    peak_bytes: Optional[int] = None
    flops: Optional[float] = None
    bytes: Optional[float] = None
    floor_us: Optional[float] = None
    bound: Optional[str] = None  # compute | memory
    goals: list = dataclasses.field(default_factory=list)  # Goal records judged on this row
    note: str = ""

    @property
    def failed(self) -> bool:
        return self.status.startswith(("MISMATCH", "error"))


@dataclasses.dataclass
class Goal:
    name: str  # e.g. "naive eager / fused"
    ratio: float
    target: str  # e.g. ">= 20"
    met: bool

    def __str__(self) -> str:
        return f"{self.name} = {self.ratio:.2f}x (goal {self.target}x: {'met' if self.met else 'NOT met'})"


class Mismatch(AssertionError):
    """The fused result differs from the reference."""


# ----------------------------------------------------------------------------------------------
# the machine: peak rates, timing, memory
# ----------------------------------------------------------------------------------------------

def sync(machine: Machine) -> None:
    if machine.cuda:
        torch.cuda.synchronize()


def lookup_peaks(name: str):
    """``(flops, bandwidth)`` for a known device name, else ``None``."""
    for key, flops, bandwidth in PEAKS:
        if key.lower() in name.lower():
            return flops, bandwidth
    return None


def measure_copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes read plus written per second by a device-to-device copy of ``nbytes``."""
    src = torch.empty(nbytes // 4, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), cuda=True)[0]
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / (ms * 1e-3)


def measure_fp32_flops(n: int = 8192) -> float:
    """FLOP/s of a float32 GEMM with TF32 off (the FMA units' rate, near the non-tensor peak)."""
    a, b = (torch.randn(n, n, device="cuda") for _ in range(2))
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ms = bench_ms(lambda: a @ b, cuda=True)[0]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    return 2 * n**3 / (ms * 1e-3)


def describe_machine(interpret: bool) -> Machine:
    if not torch.cuda.is_available():
        source = "no CUDA: no floor"
        return Machine(torch.device("cpu"), platform.processor() or platform.machine(), None, None, source,
                       interpret=interpret)
    name = torch.cuda.get_device_name(0)
    machine = Machine(torch.device("cuda"), name, None, None, "")
    machine.copy_bandwidth = measure_copy_bandwidth()
    known = lookup_peaks(name)
    if known:
        machine.flops, machine.bandwidth = known
        machine.source = "datasheet table in bench/kernel_table.py (float32 non-tensor FLOP/s, HBM bandwidth)"
    else:
        machine.flops, machine.bandwidth = measure_fp32_flops(), machine.copy_bandwidth
        machine.source = ("unknown device: MEASURED here (float32 GEMM with TF32 off; device-to-device copy, "
                          "bytes read + written)")
    return machine


def bench_ms(fn: Callable, cuda: bool, cpu_repeats: int = 5):
    """``(median, p20, p80)`` milliseconds of ``fn``: CUDA events (do_bench) on a GPU, the wall clock on CPU."""
    if cuda:
        from triton.testing import do_bench

        p20, median, p80 = do_bench(fn, warmup=25, rep=100, quantiles=[0.2, 0.5, 0.8])
        return median, p20, p80
    fn()  # warm-up
    samples = []
    for _ in range(cpu_repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    samples.sort()
    return statistics.median(samples), samples[len(samples) // 5], samples[-1 - len(samples) // 5]


def peak_extra_bytes(fn: Callable, machine: Machine) -> Optional[int]:
    """``torch.cuda.max_memory_allocated`` during one call of ``fn``, above what was allocated before it."""
    if not machine.cuda:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def floor(row: Row, machine: Machine, flops: float, nbytes: float) -> None:
    """Fill the row's cost and floor ``max(flops / peak, bytes / bandwidth)``."""
    row.flops, row.bytes = flops, nbytes
    if machine.flops and machine.bandwidth:
        compute, memory = flops / machine.flops, nbytes / machine.bandwidth
        row.floor_us = max(compute, memory) * 1e6
        row.bound = "compute" if compute >= memory else "memory"


def timed(row: Row, fn: Callable, machine: Machine, memory: bool = True) -> Row:
    """Warm up, measure the peak memory of one call (unless ``memory`` is false), then time ``fn``."""
    fn()
    sync(machine)
    row.peak_bytes = peak_extra_bytes(fn, machine) if memory else None
    row.ms, row.ms_p20, row.ms_p80 = bench_ms(fn, machine.cuda)
    return row


def fused_module():
    try:
        from srcid import kernels
    except ImportError:  # srcid not installed: the top-level folder is the same package
        import kernels
    return kernels


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def expect_close(what: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    if not torch.isfinite(got).all():
        raise Mismatch(f"{what}: non-finite values")
    err = rel_err(got, want)
    if not err <= tol:
        raise Mismatch(f"{what}: relative error {err:.2e} > {tol:.0e}")


# ----------------------------------------------------------------------------------------------
# quantizer step: nearest code with statistics for GROUPS groups, then the EMA update
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class StepInputs:
    x: torch.Tensor
    values: torch.Tensor
    codebook: torch.Tensor
    cluster_size: torch.Tensor
    embed_sum: torch.Tensor

    def state(self):
        return self.codebook, self.cluster_size, self.embed_sum

    def clone(self) -> "StepInputs":
        return StepInputs(*(t.clone() for t in dataclasses.astuple(self)))

    def load(self, other: "StepInputs") -> None:
        for mine, theirs in zip(self.state(), other.state()):
            mine.copy_(theirs)


def step_inputs(rows: int, sizes: Sizes, device, seed: int) -> StepInputs:
    gen = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same numbers on every machine
    draw = lambda *shape: torch.randn(*shape, generator=gen).to(device)
    codebook = draw(sizes.codes, sizes.dim) * 0.5
    return StepInputs(draw(rows, sizes.dim), draw(rows, sizes.dim), codebook,
                      torch.ones(sizes.codes, device=device), codebook.clone())


def step_fn(path: str, t: StepInputs) -> Callable:
    """One quantizer step of ``path`` on ``t`` (mutates its codebook and EMA state)."""
    if path.startswith("fused"):
        kernels = fused_module()
        deterministic = path == "fused-deterministic"

        def step():
            _, _, counts, sums = kernels.nearest_code_fused(t.x, t.codebook, values=t.values, stats=True,
                                                            groups=GROUPS, deterministic=deterministic)
            kernels.ema_update_fused_(t.cluster_size, t.embed_sum, t.codebook, counts, sums, decay=DECAY, eps=EPS)
    elif path == "reference":

        def step():
            out = ops.nearest_code_reference(t.x, t.codebook, values=t.values, stats=True, groups=GROUPS)
            ops.ema_update_reference(t.cluster_size, t.embed_sum, t.codebook, out.counts, out.sums,
                                     decay=DECAY, eps=EPS)
    else:

        def step():
            _, counts, sums = nearest_code_naive(t.x, t.codebook, t.values, GROUPS)
            ema_update_naive(t.cluster_size, t.embed_sum, t.codebook, counts, sums, DECAY, EPS)
    return step


def step_cost(rows: int, sizes: Sizes):
    """FLOPs and fewest bytes of one step: read x, values, codebook and the EMA state once, write the
    indices, distances and the new state once (float32; int64 indices)."""
    n, l, d = rows, sizes.codes, sizes.dim
    flops = 2 * n * l * d + n * d  # distances, then the sums of values
    reads = 4 * (2 * n * d + l * d)  # x, values, codebook
    outputs = 12 * n  # int64 indices, float32 distances
    ema_state = 4 * (2 * l * d + 2 * l) + 4 * l * d  # embed_sum and cluster_size read and written; new codebook
    return flops, reads + outputs + ema_state


def check_nearest_step(t: StepInputs, deterministic: bool) -> str:
    """Fused nearest code + statistics + EMA update against float64 and the reference, on the device."""
    kernels = fused_module()
    out = ops.NearestCode(*kernels.nearest_code_fused(t.x, t.codebook, values=t.values, stats=True, groups=GROUPS,
                                                      deterministic=deterministic))
    x, cb = t.x.double(), t.codebook.double()
    dist = (x * x).sum(1, keepdim=True) + (cb * cb).sum(1)[None] - 2 * x @ cb.t()  # [N, L] float64
    best = dist.min(1).values
    picked = dist.gather(1, out.indices[:, None]).squeeze(1)
    tol = 1e-5 * ((x * x).sum(1) + (cb * cb).sum(1).max()) + 1e-6  # float32 rounding of ||x||^2 - 2x.c + ||c||^2
    if not bool(((picked - best) <= tol).all()):
        raise Mismatch(f"nearest code: {int(((picked - best) > tol).sum())} rows took a code that is not nearest")
    if not bool(((out.sq_dist.double() - picked).abs() <= tol).all()):
        raise Mismatch("nearest code: squared distances differ from float64")
    slot = out.indices + torch.arange(len(x), device=x.device) // (len(x) // GROUPS) * cb.shape[0]
    counts = torch.bincount(slot, minlength=GROUPS * cb.shape[0]).view(GROUPS, -1)
    if not torch.equal(out.counts, counts.to(out.counts.dtype)):
        raise Mismatch("nearest code: counts are not those of the returned indices")
    sums = torch.zeros(GROUPS * cb.shape[0], x.shape[1], dtype=torch.float64, device=x.device)
    sums.index_add_(0, slot, t.values.double())
    expect_close("nearest code: sums", out.sums, sums.view(GROUPS, cb.shape[0], -1), 1e-5)
    check_ema(t, out.counts, out.sums)
    reference = ops.nearest_code_reference(t.x, t.codebook)
    differ = int((reference.indices != out.indices).sum())
    return f"{differ} of {len(x)} indices differ from the reference, all within rounding of the minimum" if differ else ""


def check_ema(t: StepInputs, counts, sums) -> None:
    fused, reference = t.clone(), t.clone()
    fused_module().ema_update_fused_(fused.cluster_size, fused.embed_sum, fused.codebook, counts, sums,
                                     decay=DECAY, eps=EPS)
    ops.ema_update_reference(reference.cluster_size, reference.embed_sum, reference.codebook, counts, sums,
                             decay=DECAY, eps=EPS)
    for name, got, want in zip(("codebook", "cluster_size", "embed_sum"), fused.state(), reference.state()):
        expect_close(f"EMA update: {name}", got, want, 1e-5)


def capture_graph(step: Callable) -> "torch.cuda.CUDAGraph":
    """``step`` captured in a CUDA graph after warm-up calls on a side stream (the first call tunes)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    torch.cuda.synchronize()
    return graph


def check_graph(graph, step: Callable, t: StepInputs) -> None:
    """One replay does what one eager step does from the same state."""
    start = t.clone()
    graph.replay()
    torch.cuda.synchronize()
    replayed = t.clone()
    t.load(start)
    step()
    torch.cuda.synchronize()
    if torch.equal(replayed.codebook, start.codebook):
        raise Mismatch("CUDA graph: a replay left the codebook unchanged")
    for name, got, want in zip(("codebook", "cluster_size", "embed_sum"), replayed.state(), t.state()):
        expect_close(f"CUDA graph replay: {name}", got, want, 1e-5)


def step_rows(rows: int, sizes: Sizes, machine: Machine) -> list:
    op, case = "quantizer step (NN + stats + EMA)", f"N={rows} L={sizes.codes} D={sizes.dim} G={GROUPS}"
    flops, nbytes = step_cost(rows, sizes)
    base = step_inputs(rows, sizes, machine.device, seed=rows)
    out = []
    for path in ("fused-graph", "fused", "fused-deterministic", "reference", "naive"):
        row = Row(op, case, path)
        floor(row, machine, flops, nbytes)
        out.append(run_case(row, machine, lambda r=row: time_step(r, base.clone(), machine)))
    step_goals(out)
    return out


def time_step(row: Row, t: StepInputs, machine: Machine) -> Row:
    path = row.path
    if path.startswith("fused"):
        if not machine.fused:
            row.status = NO_CUDA
            return row
        row.note = check_nearest_step(t, deterministic=path == "fused-deterministic")
    step = step_fn("fused" if path == "fused-graph" else path, t)
    if path != "fused-graph":
        return timed(row, step, machine)
    if not machine.cuda:
        row.status = "skipped: CUDA graphs need CUDA"
        return row
    graph = capture_graph(step)
    check_graph(graph, step, t)
    row.note = (row.note + "; " if row.note else "") + "memory: that of the eager fused step, held by the graph"
    return timed(row, graph.replay, machine, memory=False)


def step_goals(rows: list) -> None:
    """On the fused step (graph replay, else eager): speed-up over the naive eager step, and time over floor."""
    by_path = {r.path: r for r in rows}
    fused = next((r for r in (by_path["fused-graph"], by_path["fused"]) if r.ms), None)
    naive = by_path["naive"]
    if fused is None:
        return
    if naive.ms:
        speedup = naive.ms / fused.ms
        fused.goals.append(Goal("naive eager / fused", speedup, f">= {GOAL_NAIVE_SPEEDUP:g}",
                                speedup >= GOAL_NAIVE_SPEEDUP))
    if fused.floor_us:
        ratio = fused.ms * 1e3 / fused.floor_us
        fused.goals.append(Goal("fused / floor", ratio, f"<= {GOAL_FLOOR_RATIO:g}", ratio <= GOAL_FLOOR_RATIO))


# ----------------------------------------------------------------------------------------------
# CLUB: forward + backward of mean(positive - negative)
# ----------------------------------------------------------------------------------------------

CLUB_PATHS = ("fused", "reference", "sampled", "naive-all-pairs")


def club_inputs(shape, device, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=gen).to(device).requires_grad_() for _ in range(3))


def club_terms(path: str, mu, logvar, y) -> Callable:
    if path == "fused":
        return lambda: fused_module().club_loglik_fused(mu, logvar, y)[:2]
    if path == "reference":
        return lambda: ops.club_loglik_reference(mu, logvar, y)[:2]
    if path == "sampled":
        return lambda: club_sample(mu, logvar, y)
    return lambda: club_naive(mu, logvar, y)[:2]


def club_fn(path: str, mu, logvar, y) -> Callable:
    terms = club_terms(path, mu, logvar, y)

    def forward_backward():
        positive, negative = terms()
        torch.autograd.grad((positive - negative).mean(), (mu, logvar, y))

    return forward_backward


def club_cost(shape):
    """About 30 FLOPs per input element; fewest bytes: read mu, logvar, y and write their gradients
    (plus the three [..., N] terms and their gradients)."""
    numel = 1
    for size in shape:
        numel *= size
    rows = numel // shape[-1]
    return 30 * numel, 4 * (6 * numel + 6 * rows)


def check_club(mu, logvar, y) -> None:
    """Fused CLUB terms and gradients (through all three terms) against the reference, on the device."""
    def run(fn):
        terms = fn(mu, logvar, y)
        loss = (terms.positive - terms.negative).mean() + terms.loglik.mean()
        return tuple(terms) + torch.autograd.grad(loss, (mu, logvar, y))

    names = ("positive", "negative", "loglik", "d mu", "d logvar", "d y")
    got = run(lambda *inputs: ops.ClubLoglik(*fused_module().club_loglik_fused(*inputs)))
    want = run(ops.club_loglik_reference)
    for name, g, w in zip(names, got, want):
        expect_close(f"CLUB {name}", g, w, 1e-4)


def naive_budget(machine: Machine):
    if machine.cuda:
        free, _ = torch.cuda.mem_get_info()
        return int(0.8 * free), "80% of free GPU memory"
    return 2 * 1024**3, "2 GiB on CPU"


def club_rows(name: str, shape, machine: Machine, seed: int) -> list:
    flops, nbytes = club_cost(shape)
    out = []
    for path in CLUB_PATHS:
        row = Row("CLUB fwd+bwd", name, path)
        floor(row, machine, flops, nbytes)  # the operation's floor, the same for every path
        out.append(run_case(row, machine, lambda r=row: time_club(r, shape, machine, seed)))
    club_goal(out)
    return out


def time_club(row: Row, shape, machine: Machine, seed: int) -> Row:
    if row.path == "fused" and not machine.fused:
        row.status = NO_CUDA
        return row
    if row.path == "naive-all-pairs":
        pair_bytes = club_all_pairs_bytes(shape)
        budget, why = naive_budget(machine)
        if NAIVE_TEMPORARIES * pair_bytes > budget:
            row.status = (f"skipped: {NAIVE_TEMPORARIES} N x N x D pair tensors of {pair_bytes / 2**30:.1f} GiB "
                          f"exceed {why}")
            return row
    mu, logvar, y = club_inputs(shape, machine.device, seed)
    if row.path == "fused":
        check_club(mu, logvar, y)
    return timed(row, club_fn(row.path, mu, logvar, y), machine)


def club_goal(rows: list) -> None:
    by_path = {r.path: r for r in rows}
    fused, sampled = by_path["fused"], by_path["sampled"]
    if fused.ms and sampled.ms:
        ratio = fused.ms / sampled.ms
        fused.goals.append(Goal("fused all pairs / sampled", ratio, f"<= {GOAL_CLUB_VS_SAMPLED:g}",
                                ratio <= GOAL_CLUB_VS_SAMPLED))


# ----------------------------------------------------------------------------------------------
# running the cases, and the two outputs
# ----------------------------------------------------------------------------------------------

def run_case(row: Row, machine: Machine, fn: Callable) -> Row:
    """Run one case; a mismatch or an exception marks the row (loudly) instead of stopping the table."""
    try:
        fn()
    except Mismatch as error:
        row.status = f"MISMATCH: {error}"
    except Exception as error:  # OOM, a compile error...: recorded, the other cases still run
        row.status = f"error: {type(error).__name__}: {' '.join(str(error).split())[:300]}"
    if row.failed:
        print(f"kernel_table: {row.op} {row.case} {row.path}: {row.status}", file=sys.stderr)
    else:
        print(f"kernel_table: {row.op} {row.case} {row.path}: {fmt_ms(row.ms) if row.ms else row.status}",
              file=sys.stderr, flush=True)
    if machine.cuda:
        torch.cuda.empty_cache()
    return row


def fmt_ms(ms: Optional[float]) -> str:
    if ms is None:
        return "-"
    return f"{ms * 1e3:.1f} us" if ms < 1 else f"{ms:.2f} ms"


def fmt_bytes(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def versions() -> dict:
    import triton

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton.__version__}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(multiprocessors=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}")
    return info


def to_markdown(rows: list, machine: Machine, meta: dict) -> str:
    copy = (f"; measured device-to-device copy {machine.copy_bandwidth / 1e12:.2f} TB/s"
            if machine.copy_bandwidth else "")
    peaks = (f"{machine.flops / 1e12:.1f} TFLOP/s float32, {machine.bandwidth / 1e12:.2f} TB/s"
             if machine.flops else "none")
    timing = ("median of triton.testing.do_bench (CUDA events, L2 flushed before each call)" if machine.cuda
              else "median CPU wall clock of 5 calls after a warm-up")
    lines = [
        f"# Kernel table: {machine.name}{' (quick sizes)' if meta['quick'] else ''}",
        "",
        f"{meta['generated']}; " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
        f"Floor peaks: {peaks} ({machine.source}){copy}. Timing: {timing}. "
        "Peak extra: torch.cuda.max_memory_allocated above the inputs during one call.",
        "",
        "| op | size | path | median | p20-p80 | peak extra | floor (bound) | x floor | goal | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        spread = f"{fmt_ms(r.ms_p20)} - {fmt_ms(r.ms_p80)}" if r.ms else "-"
        floor_cell = f"{r.floor_us:.1f} us ({r.bound})" if r.floor_us else "-"
        ratio = f"{r.ms * 1e3 / r.floor_us:.1f}x" if r.ms and r.floor_us else "-"
        status = r.status + (f" ({r.note})" if r.note else "")
        cells = [r.op, r.case, r.path, fmt_ms(r.ms), spread, fmt_bytes(r.peak_bytes), floor_cell, ratio,
                 "; ".join(map(str, r.goals)) or "-", status]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(out_dir: Path, rows: list, machine: Machine, meta: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "kernel_table.md").write_text(to_markdown(rows, machine, meta))
    record = {
        **meta,
        "machine": {"name": machine.name, "device": str(machine.device), "flops": machine.flops,
                    "bandwidth": machine.bandwidth, "peaks_source": machine.source,
                    "copy_bandwidth": machine.copy_bandwidth, "interpreter": machine.interpret},
        "rows": [dataclasses.asdict(r) for r in rows],
        "goals": [{"case": f"{r.op} {r.case} {r.path}", **dataclasses.asdict(g)} for r in rows for g in r.goals],
        "failures": [f"{r.op} {r.case} {r.path}: {r.status}" for r in rows if r.failed],
    }
    (out_dir / "kernel_table.json").write_text(json.dumps(record, indent=1) + "\n")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python bench/kernel_table.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "kernel_table", help="folder for the table")
    parser.add_argument("--quick", action="store_true", help="small sizes (the only mode without CUDA)")
    parser.add_argument("--interpret", action="store_true",
                        help="without CUDA: run the fused cases in Triton's interpreter (a logic check of this "
                             "script; needs TRITON_INTERPRET=1 at start-up; the times mean nothing)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.quick:
        print("kernel_table: no CUDA device: the full sizes need one; --quick runs the reference and naive paths "
              "at small sizes on the CPU", file=sys.stderr)
        return 2
    if args.interpret and (torch.cuda.is_available() or not ops.interpreter_active()):
        print("kernel_table: --interpret is for a CPU-only process started with TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    sizes = QUICK if args.quick else FULL
    machine = describe_machine(args.interpret)
    meta = {"generated": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "quick": args.quick, "versions": versions(),
            "sizes": {"codes": sizes.codes, "dim": sizes.dim, "groups": GROUPS, "rows": list(sizes.rows),
                      "club": {k: list(v) for k, v in sizes.club.items()}}}
    torch.manual_seed(0)
    rows = []
    for n in sizes.rows:
        rows += step_rows(n, sizes, machine)
    for seed, (name, shape) in enumerate(sizes.club.items()):
        rows += club_rows(name, shape, machine, seed)
    write_outputs(args.out, rows, machine, meta)
    print(to_markdown(rows, machine, meta))
    print(f"kernel_table: wrote {args.out / 'kernel_table.md'} and kernel_table.json", file=sys.stderr)
    failed = [r for r in rows if r.failed]
    for r in failed:
        print(f"kernel_table: FAILED {r.op} {r.case} {r.path}: {r.status}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
