"""Time and peak memory of the hot ops at the paper's sizes: fused, reference and naive.

Run with ``.venv/bin/python -m pytest bench/ --benchmark-only``. On a GPU all
paths run; on CPU the fused path is skipped (Triton's interpreter is a
correctness tool, not a performance path). Peak memory goes into
``extra_info``: ``torch.cuda.max_memory_allocated`` above the inputs on a GPU,
the growth of the process's resident-set high-water mark on CPU (with glibc
told to map every allocation of 64 KiB or more on its own, so freed tensors
leave the resident set and the high-water mark follows the live tensors).
"""
import ctypes
import re

import pytest
import torch

from srcid import ops
from testing.oracles import club_all_pairs_bytes, club_naive, club_sample, ema_update_naive, nearest_code_naive

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
INTERPRETER_SKIP = "fused kernels on CPU run in Triton's interpreter, which is not a performance path"

CODES, DIM, STEPS, MODALITIES = 400, 256, 10, 3
DECAY, EPS = 0.99, 1e-5


def _sync():
    if ON_GPU:
        torch.cuda.synchronize()


def _rounds(cheap: bool) -> int:
    return 20 if ON_GPU else (5 if cheap else 2)


def _mmap_threshold(nbytes: int) -> bool:
    """glibc: serve allocations of ``nbytes`` or more by their own mmap (returned to the OS when freed)."""
    try:
        return ctypes.CDLL("libc.so.6").mallopt(-3, nbytes) == 1  # -3: M_MMAP_THRESHOLD
    except OSError:
        return False


def _status_bytes(key):
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+) kB", f.read()).group(1)) * 1024


def measure_peak(fn):
    """Peak bytes one call of ``fn`` adds on top of what is already allocated, and how it was measured."""
    _sync()
    if ON_GPU:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, "torch.cuda.max_memory_allocated above the inputs"
    # Tensors of 64 KiB or more get their own mapping while measuring, so a freed tensor
    # leaves the resident set and the high-water mark follows the live tensors; timing
    # runs afterwards with glibc's usual ceiling of 32 MiB for that threshold.
    if not _mmap_threshold(64 * 1024):
        return None, "not measured: glibc's mmap threshold could not be set"
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give free heap memory back first: a clean baseline
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the resident-set high-water mark
        base = _status_bytes("VmRSS")
        fn()
        return max(0, _status_bytes("VmHWM") - base), "resident-set high-water growth, tensors of 64 KiB and more mmapped"
    except OSError:
        return None, "not measured: /proc/self/clear_refs is not writable here"
    finally:
        _mmap_threshold(32 * 1024 * 1024)


def run_benchmark(benchmark, fn, rounds, info):
    fn()  # warm-up; on a GPU this also runs Triton's autotuning once per size
    _sync()
    peak, method = measure_peak(fn)
    benchmark.extra_info.update(info)
    benchmark.extra_info.update(device=str(DEVICE), peak_bytes=peak, peak_method=method)

    def timed():
        fn()
        _sync()

    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)


# ----------------------------------------------------------------------------------------------
# nearest code + EMA statistics + EMA update: one quantizer step for all modalities
# ----------------------------------------------------------------------------------------------

NEAREST_PATHS = ["fused", "fused-deterministic", "reference", "naive"]


@pytest.mark.parametrize("clips", [80, 256])
@pytest.mark.parametrize("path", NEAREST_PATHS)
def test_nearest_code_ema_step(benchmark, path, clips):
    if path.startswith("fused") and not ON_GPU:
        pytest.skip(INTERPRETER_SKIP)
    rows = clips * STEPS * MODALITIES
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(rows, DIM, device=DEVICE, generator=gen)
    values = torch.randn(rows, DIM, device=DEVICE, generator=gen)
    codebook = torch.randn(CODES, DIM, device=DEVICE, generator=gen) * 0.5
    cluster_size = torch.ones(CODES, device=DEVICE)
    embed_sum = codebook.clone()

    if path.startswith("fused"):
        from srcid.kernels import ema_update_fused_, nearest_code_fused

        deterministic = path == "fused-deterministic"

        def step():
            _, _, counts, sums = nearest_code_fused(x, codebook, values=values, stats=True, groups=MODALITIES,
                                                    deterministic=deterministic)
            ema_update_fused_(cluster_size, embed_sum, codebook, counts, sums, decay=DECAY, eps=EPS)

    elif path == "reference":

        def step():
            out = ops.nearest_code_reference(x, codebook, values=values, stats=True, groups=MODALITIES)
            ops.ema_update_reference(cluster_size, embed_sum, codebook, out.counts, out.sums, decay=DECAY, eps=EPS)

    else:

        def step():
            _, counts, sums = nearest_code_naive(x, codebook, values, MODALITIES)
            ema_update_naive(cluster_size, embed_sum, codebook, counts, sums, DECAY, EPS)

    info = {
        "rows": rows, "codes": CODES, "dim": DIM, "groups": MODALITIES,
        "flops_distance": 2 * rows * CODES * DIM,
        "min_bytes": 4 * (2 * rows * DIM + CODES * DIM) + 12 * rows + 4 * MODALITIES * CODES * (DIM + 1),
        "dense_nl_bytes": 4 * rows * CODES,
    }
    run_benchmark(benchmark, step, _rounds(cheap=True), info)


# ----------------------------------------------------------------------------------------------
# CLUB: forward + backward of the MI loss mean(positive - negative)
# ----------------------------------------------------------------------------------------------

CLUB_SHAPES = {
    # [modality, layer, time, clips, D]: the per-step estimators of audio and text, both layers
    "steps-80clips-256": (2, 2, STEPS, 80, 256),
    "steps-256clips-256": (2, 2, STEPS, 256, 256),
    # [layer, time, clips, D]: video's 512-d specific features
    "steps-80clips-512": (2, STEPS, 80, 512),
    # every row of a step pooled into one estimator
    "pooled-2400-256": (2400, 256),
    "pooled-7680-256": (7680, 256),
    "pooled-7680-512": (7680, 512),
}
CLUB_PATHS = ["fused", "reference", "naive-all-pairs", "club-sample"]
NAIVE_TEMPORARIES = 4  # pair tensors alive at once in forward + backward of the naive form


def _naive_budget():
    if ON_GPU:
        free, _ = torch.cuda.mem_get_info()
        return int(0.8 * free), "80% of free GPU memory"
    return 2 * 1024**3, "2 GiB on CPU, where larger pair tensors take minutes per round"


@pytest.mark.parametrize("case", list(CLUB_SHAPES))
@pytest.mark.parametrize("path", CLUB_PATHS)
def test_club_forward_backward(benchmark, path, case):
    shape = CLUB_SHAPES[case]
    if path == "fused" and not ON_GPU:
        pytest.skip(INTERPRETER_SKIP)
    pair_bytes = club_all_pairs_bytes(shape)
    if path == "naive-all-pairs":
        budget, why = _naive_budget()
        if NAIVE_TEMPORARIES * pair_bytes > budget:
            pytest.skip(
                f"the N x N x D pair tensor of {shape} is {pair_bytes / 2**30:.1f} GiB; "
                f"{NAIVE_TEMPORARIES} of them exceed the budget ({why})"
            )
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    mu, logvar, y = (torch.randn(shape, device=DEVICE, generator=gen).requires_grad_() for _ in range(3))

    if path == "fused":
        from srcid.kernels import club_loglik_fused

        terms = lambda: club_loglik_fused(mu, logvar, y)[:2]
    elif path == "reference":
        terms = lambda: ops.club_loglik_reference(mu, logvar, y)[:2]
    elif path == "naive-all-pairs":
        terms = lambda: club_naive(mu, logvar, y)[:2]
    else:
        terms = lambda: club_sample(mu, logvar, y)

    def forward_backward():
        positive, negative = terms()
        torch.autograd.grad((positive - negative).mean(), (mu, logvar, y))

    numel = mu.numel()
    info = {
        "shape": list(shape),
        "min_bytes": 4 * (3 * numel + 3 * numel),  # read mu, logvar, y; write their gradients
        "pair_tensor_bytes": pair_bytes,
    }
    cheap = path != "naive-all-pairs" and (ON_GPU or numel <= 2_000_000)
    run_benchmark(benchmark, forward_backward, _rounds(cheap), info)
