"""Reading numpy arrays from pickles and ``.npy`` bytes without running foreign code.

Original feature releases store each clip's array as a pickle. A plain
``pickle.load`` would call whatever a malicious file names (``os.system``,
``subprocess.Popen``, ...). :class:`ArrayUnpickler` resolves only the few
globals a pickled numpy array needs (the array and scalar reconstructors,
``numpy.ndarray``, ``numpy.dtype`` and a latin-1-only ``_codecs.encode`` used
by protocols 0-2); any other global is refused with a :class:`DataError`
naming the file, before anything is called. A malicious file therefore
cannot run code through it. ``.npy`` bytes are read with
``allow_pickle=False``. Only numeric (bool, int, float) arrays are accepted.
"""
from __future__ import annotations

import io
import pickle

import numpy as np

from srcid.errors import DataError

try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _multiarray
    from numpy.core import numeric as _numeric


def _latin1_encode(text, encoding="latin1", errors="strict"):
    """``_codecs.encode`` restricted to what protocols 0-2 use for bytes."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise pickle.UnpicklingError("_codecs.encode is admitted only for latin-1 text")
    return text.encode("latin1")


_ALLOWED = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _latin1_encode}
for _package in ("numpy.core", "numpy._core"):
    _ALLOWED[(f"{_package}.multiarray", "_reconstruct")] = _multiarray._reconstruct
    _ALLOWED[(f"{_package}.multiarray", "scalar")] = _multiarray.scalar
    _ALLOWED[(f"{_package}.numeric", "_frombuffer")] = _numeric._frombuffer

NUMERIC_KINDS = "biuf"


class ArrayUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals a numpy array needs."""

    def __init__(self, file, where: str):
        super().__init__(file)
        self.where = where

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise DataError(f"{self.where}: refused to unpickle {module}.{name}: only numpy arrays are admitted") from None


def _numeric_array(obj, where: str) -> np.ndarray:
    if not isinstance(obj, np.ndarray):
        raise DataError(f"{where}: holds a {type(obj).__name__}, not a numpy array")
    if obj.dtype.kind not in NUMERIC_KINDS:
        raise DataError(f"{where}: array dtype {obj.dtype} is not numeric")
    return obj


def load_pickled_array(data: bytes, where: str) -> np.ndarray:
    """The numeric numpy array pickled in ``data``; ``where`` names the file in errors."""
    try:
        obj = ArrayUnpickler(io.BytesIO(data), where).load()
    except DataError:
        raise
    except Exception as exc:  # any malformed pickle: truncated, bad opcode, bad reconstruct arguments
        raise DataError(f"{where}: not a readable pickle ({type(exc).__name__}: {exc})".replace("\n", " ")) from None
    return _numeric_array(obj, where)


def load_npy_array(data: bytes, where: str) -> np.ndarray:
    """The numeric array stored as ``.npy`` bytes, read with ``allow_pickle=False``."""
    try:
        obj = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:
        raise DataError(f"{where}: not a readable .npy array ({type(exc).__name__}: {exc})".replace("\n", " ")) from None
    return _numeric_array(obj, where)
