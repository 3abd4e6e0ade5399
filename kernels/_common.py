"""Helpers shared by the kernel modules: the interpreter flag and the tuning configs.

The kernels import nothing of :mod:`srcid.ops`: the ops check the inputs and
call the kernels, never the other way round.
"""
from __future__ import annotations

import os

import triton

# Read once at import: Triton's interpreter is chosen when triton is imported (``triton.jit`` then gives
# interpreted functions). The same test as srcid.ops.dispatch.interpreter_active, which reads it per call.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def tuning_configs(gpu_configs, interpreter_config):
    """The autotuning space on a GPU; one small config under the interpreter.

    Each config is a dict of block sizes plus optional ``num_warps`` and
    ``num_stages``.
    """
    chosen = [interpreter_config] if INTERPRETING else gpu_configs
    configs = []
    for entry in chosen:
        entry = dict(entry)
        num_warps = entry.pop("num_warps", 4)
        num_stages = entry.pop("num_stages", 2)
        configs.append(triton.Config(entry, num_warps=num_warps, num_stages=num_stages))
    return configs
