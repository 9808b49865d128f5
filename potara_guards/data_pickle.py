"""Pickles of plain data read without running code: CIFAR-100's files (data.py) and any file in their layout.

    batch = read_data_pickle("data/cifar-100-python/train", 1 << 30)   # a dict of lists, strings, numbers, arrays

Python's pickle calls whatever a file names, so a planted file could run code. DataUnpickler resolves only the
three names numpy's array pickles use, each to a stand-in that builds data and nothing else; any other global
(os.system, builtins.eval, ...) is refused before anything is called. The file itself is read bounded and
regular only (safe_files.read_regular). Any problem is one Unreadable line naming the file.
"""

from __future__ import annotations

import io
import os
import pickle
import struct

import numpy as np

from .safe_files import UnsafeFile, read_regular


class Unreadable(Exception):
    """A file that is not a well-formed pickle of plain data (the message says why)."""


class _ArrayType:  # stands in for numpy.ndarray inside a pickle: an argument of _reconstruct, never callable
    pass


def _empty_array(subtype, shape, dtype) -> np.ndarray:
    """numpy.core.multiarray._reconstruct as numpy's pickles use it: an empty array that BUILD then fills
    from the pickle's own bytes (so memory is bounded by the file). Any other use is refused."""
    if not isinstance(subtype, _ArrayType) or tuple(shape) != (0,):
        raise Unreadable(f"unexpected array reconstruction {shape!r}")
    return np.empty(0, np.uint8)


def _plain_dtype(code, align=False, copy=True) -> np.dtype:
    if not isinstance(code, str) or code not in ("u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "f4", "f8"):
        raise Unreadable(f"unexpected array dtype {str(code)[:20]!r}")
    return np.dtype(code)


class DataUnpickler(pickle._Unpickler):
    """Reads the objects CIFAR-100's pickles hold (dicts, lists, strings, ints, numpy arrays of numbers) and
    nothing else: a pickle naming any other global (os.system, builtins.eval, ...) is refused before
    anything is called, so a planted file cannot run code. It is pickle's pure-Python unpickler: its memo
    is a dict, where the C unpickler's memo array grows to whatever index a crafted pickle names."""

    def find_class(self, module: str, name: str):
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
            return _empty_array
        if (module, name) == ("numpy", "ndarray"):
            return _ArrayType()
        if (module, name) == ("numpy", "dtype"):
            return _plain_dtype
        raise Unreadable(f"refused to unpickle {module[:40]}.{name[:40]} (CIFAR-100 files hold only data)")


def read_data_pickle(path: str, max_bytes: int) -> dict:
    """A regular file of at most max_bytes (safe_files.read_regular: a link, /dev/zero or a FIFO planted under
    a CIFAR name is refused at once, and the bytes actually read are bounded), unpickled by DataUnpickler."""
    try:
        payload = read_regular(path, max_bytes)
    except UnsafeFile as e:
        raise Unreadable(f"{os.path.basename(path)}: {str(e).split(': ', 1)[-1]}") from None
    try:
        obj = DataUnpickler(io.BytesIO(payload), encoding="latin1").load()
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
        OverflowError,
        struct.error,
    ) as e:  # what a truncated or garbled pickle raises; not MemoryError
        raise Unreadable(f"{os.path.basename(path)}: not a CIFAR-100 pickle ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise Unreadable(f"{os.path.basename(path)} holds a {type(obj).__name__}, not a dict")
    return obj
