"""Test-wide setup.

Without a GPU the Triton kernels run in Triton's interpreter, which must be
switched on before any kernel module is imported.
"""
import os

try:
    import torch

    _cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _cuda = False
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _cuda else "cuda")
