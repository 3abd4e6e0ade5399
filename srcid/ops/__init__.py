"""The hot operations of the method, behind one seam.

Two implementations share each signature:

* ``reference``: plain PyTorch, written for clarity; runs anywhere.
* ``fused``: Triton kernels from :mod:`srcid.kernels` (CUDA, or the CPU under
  ``TRITON_INTERPRET=1``).

``impl=None`` uses the process-wide choice: :func:`set_kernels` (the
``--kernels`` flag of every command), else the ``SRCID_KERNELS`` environment
variable, else ``auto`` (fused on CUDA tensors, reference otherwise).

One module per operation holds its result type, its input checks, its
reference and its dispatch; the kernels only compute (the same names in
parallel: ``srcid/ops/<op>.py``, ``kernels/<op>.py``, ``tests/ops/test_<op>.py``,
``bench/test_bench_<op>.py``):

* :mod:`srcid.ops.nearest_code`: nearest code and per-code statistics;
* :mod:`srcid.ops.ema`: the EMA codebook update;
* :mod:`srcid.ops.club`: CLUB log-likelihood terms;
* :mod:`srcid.ops.dispatch`: the choice between the two, shared by all three.
"""
from .club import ClubLoglik, club_loglik, club_loglik_reference
from .dispatch import IMPLS, current_kernels, interpreter_active, resolve, set_kernels
from .ema import ema_update_, ema_update_reference
# The function nearest_code takes the name of its module here (the module stays sys.modules["srcid.ops.nearest_code"]).
from .nearest_code import NearestCode, nearest_code, nearest_code_reference

__all__ = [
    "IMPLS",
    "ClubLoglik",
    "NearestCode",
    "club_loglik",
    "club_loglik_reference",
    "current_kernels",
    "ema_update_",
    "ema_update_reference",
    "interpreter_active",
    "nearest_code",
    "nearest_code_reference",
    "resolve",
    "set_kernels",
]
