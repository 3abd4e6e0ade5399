"""Compile every kernel and every GPU autotune config for NVIDIA targets, without a GPU.

Triton's compiler runs down to a cubin with the ``ptxas`` it bundles; no
driver or device is needed. For each kernel, each config its autotuner may
pick on a GPU, each constexpr specialisation the wrappers launch, and each
target architecture, :func:`compile_all` records the registers per thread,
the bytes spilled to local memory (``ptxas -v``), the shared memory, and
which tensor-core instruction the PTX uses (``wgmma``, ``mma`` or none).
Kernels in :data:`TENSOR_CORE_KERNELS` must use one in every config: a
compile without is counted like a spill (reported, exit status 1).

The autotuner's GPU configs exist only when Triton's interpreter is off
(under ``TRITON_INTERPRET=1`` each kernel has one small interpreter config
and ``triton.jit`` gives interpreted functions), so this runs in a process
without it::

    env -u TRITON_INTERPRET python -m kernels.compile_check [--arch 80 90] [--json FILE]

Pointers are compiled as float32 (index buffers as int64, the nearest-code
row-paths buffer as int32), which is what the wrappers pass: they cast inputs
of other dtypes to float32 first.
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import contextlib
import dataclasses
import io
import json
import os
import re
import sys
import tempfile
import time
from typing import Optional

from ._common import INTERPRETING

ARCHS = (80, 90)  # A100, H100 / H200
INDEX_POINTERS = {"idx_ptr", "order_ptr", "bounds_ptr"}  # int64 buffers
INT32_POINTERS = {"path_ptr"}  # every other pointer is float32
FLOAT_SCALARS = {"decay", "one_minus_decay", "eps", "codes_eps", "bound_xc", "bound_cc", "bound_abs"}
# constexpr values the wrappers launch with, besides the configs' block sizes
SPECIALISATIONS = {
    "_nearest_code_kernel": ({"STATS": True}, {"STATS": False}),
    "_nearest_code_tc_kernel": ({"STATS": True, "ROW_PATHS": False}, {"STATS": False, "ROW_PATHS": False}),
}
# kernels whose every config must put tensor-core instructions (mma / wgmma) in its PTX
TENSOR_CORE_KERNELS = {"_nearest_code_tc_kernel"}
KERNEL_MODULES = ("kernels.nearest_code", "kernels.club", "kernels.ema")


@dataclasses.dataclass
class CompileResult:
    kernel: str
    config: str  # block sizes, warps and stages, plus the specialisation
    arch: int
    registers: Optional[int] = None  # per thread
    spill_bytes: Optional[int] = None  # spill stores + spill loads
    shared_bytes: Optional[int] = None
    tensor_cores: Optional[bool] = None  # mma / wgmma in the PTX
    tensor_core_op: Optional[str] = None  # "wgmma" (sm_90 warpgroup MMA), "mma" (mma.sync) or None
    seconds: float = 0.0
    error: Optional[str] = None  # the compiler's message when it failed

    @property
    def ok(self) -> bool:
        return self.error is None


def autotuned_kernels() -> list:
    """``[(name, autotuner)]`` of every autotuned kernel, in module order."""
    import importlib

    import triton

    from srcid.errors import SrcidError

    if INTERPRETING:
        raise SrcidError("the compile check needs Triton's compiler: unset TRITON_INTERPRET and run it in a new process")
    found = []
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(module_name)
        for name, obj in vars(module).items():
            if isinstance(obj, triton.runtime.Autotuner):
                found.append((name, obj))
    return found


def _signature(arg_names: list, constexprs: dict) -> dict:
    signature = {}
    for name in arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*i64" if name in INDEX_POINTERS else "*i32" if name in INT32_POINTERS else "*fp32"
        elif name in FLOAT_SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def _describe(config, extra: dict) -> str:
    sizes = ", ".join(f"{k}={v}" for k, v in {**config.kwargs, **extra}.items())
    return f"{sizes}, warps={config.num_warps}, stages={config.num_stages}"


_USED = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_one(name: str, config_index: int, extra: dict, arch: int) -> CompileResult:
    """Compile one kernel / config / specialisation for ``sm_<arch>`` and read what ``ptxas -v`` reports."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    tuner = dict(autotuned_kernels())[name]
    config = tuner.configs[config_index]
    fn = tuner.fn
    constexprs = {**config.kwargs, **extra}
    result = CompileResult(kernel=name, config=_describe(config, extra), arch=arch)
    source = ASTSource(fn=fn, signature=_signature(fn.arg_names, constexprs),
                       constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    log = io.StringIO()
    start = time.perf_counter()
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True  # a cached kernel would skip ptxas and its report
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    except Exception as error:  # the compiler's own message is the report
        result.error = " ".join(str(error).split())[:500]
        return result
    finally:
        result.seconds = time.perf_counter() - start
    text = log.getvalue()
    used = [int(m) for m in _USED.findall(text)]
    spills = [int(a) + int(b) for a, b in _SPILL.findall(text)]
    result.registers = max(used) if used else None
    result.spill_bytes = max(spills) if spills else 0
    result.shared_bytes = int(compiled.metadata.shared)
    ptx = compiled.asm.get("ptx", "")
    result.tensor_core_op = "wgmma" if re.search(r"\bwgmma\.", ptx) else "mma" if re.search(r"\bmma\.", ptx) else None
    result.tensor_cores = result.tensor_core_op is not None
    return result


def jobs(archs=ARCHS) -> list:
    """``(kernel, config index, specialisation, arch)`` for everything :func:`compile_all` compiles."""
    out = []
    for name, tuner in autotuned_kernels():
        for extra in SPECIALISATIONS.get(name, ({},)):
            for index in range(len(tuner.configs)):
                for arch in archs:
                    out.append((name, index, extra, arch))
    return out


def compile_all(archs=ARCHS, workers: Optional[int] = None) -> list:
    """Every job of :func:`jobs`, compiled in ``workers`` processes (default: the CPU count), in job order."""
    todo = jobs(archs)
    workers = workers or os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="srcid-compile-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        if workers == 1:
            return [compile_one(*job) for job in todo]
        with futures.ProcessPoolExecutor(workers) as pool:
            return list(pool.map(compile_one, *zip(*todo)))


def missing_tensor_cores(results: list) -> list:
    """Compiles of a kernel in :data:`TENSOR_CORE_KERNELS` whose PTX has no ``mma`` / ``wgmma``."""
    return [r for r in results if r.ok and r.kernel in TENSOR_CORE_KERNELS and not r.tensor_cores]


def to_markdown(results: list) -> str:
    lines = ["| kernel | config | sm | registers | spill bytes | shared bytes | tensor cores | s | error |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        cells = [r.kernel, r.config, str(r.arch), str(r.registers if r.registers is not None else "-"),
                 str(r.spill_bytes if r.spill_bytes is not None else "-"),
                 str(r.shared_bytes if r.shared_bytes is not None else "-"),
                 "-" if r.tensor_cores is None else (r.tensor_core_op or "no"), f"{r.seconds:.1f}",
                 r.error or ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.compile_check",
                                     description="Compile every kernel and GPU autotune config for NVIDIA targets "
                                                 "(no GPU needed) and report registers, spills and tensor-core use.")
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="compute capabilities x10 (80 90)")
    parser.add_argument("--workers", type=int, default=None, help="compiler processes (default: CPU count)")
    parser.add_argument("--json", default=None, help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    from srcid.errors import SrcidError

    try:
        results = compile_all(tuple(args.arch), args.workers)
    except SrcidError as error:
        print(f"compile_check: error: {error}", file=sys.stderr)
        return 2
    print(to_markdown(results))
    failed = [r for r in results if not r.ok]
    spilled = [r for r in results if r.ok and r.spill_bytes]
    no_tc = missing_tensor_cores(results)
    print(f"\n{len(results)} compiles, {len(failed)} failed, {len(spilled)} spill, {len(no_tc)} lack tensor cores")
    if args.json:
        path = args.json
        tmp = f"{path}.tmp"
        with open(tmp, "w") as handle:
            json.dump([dataclasses.asdict(r) for r in results], handle, indent=1)
        os.replace(tmp, path)
    return 1 if failed or spilled or no_tc else 0


if __name__ == "__main__":
    sys.exit(main())
