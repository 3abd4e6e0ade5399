"""What the op benchmarks share (bench/test_bench_<op>.py): the device, the paper's sizes, peak memory and timing.

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

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
INTERPRETER_SKIP = "fused kernels on CPU run in Triton's interpreter, which is not a performance path"

CODES, DIM, STEPS, MODALITIES = 400, 256, 10, 3
DECAY, EPS = 0.99, 1e-5


def sync():
    if ON_GPU:
        torch.cuda.synchronize()


def bench_rounds(cheap: bool) -> int:
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
    sync()
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
    sync()
    peak, method = measure_peak(fn)
    benchmark.extra_info.update(info)
    benchmark.extra_info.update(device=str(DEVICE), peak_bytes=peak, peak_method=method)

    def timed():
        fn()
        sync()

    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
