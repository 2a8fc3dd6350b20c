"""Reading pickled data files without running code from them.

A pickle names functions that loading calls to rebuild its objects, and `pickle.load`
imports and calls whatever the file names: `os.system` as readily as numpy's array
constructor. The data sets that come as pickles (miniImageNet caches, tieredImageNet,
CIFAR-100's python archive) hold only numpy arrays, numbers, strings, bytes and containers,
so `load` resolves exactly the globals those need, from a table and without importing
anything, and refuses every other with a DataError naming the file and the global.
"""

from __future__ import annotations

import collections
import pickle
from pathlib import Path
from typing import IO

import numpy as np

from metarun.errors import DataError

# numpy's private modules moved from numpy.core (1.x) to numpy._core (2.x); files name either
_CORE = getattr(np, "_core", None) or np.core


def _allowed() -> dict[tuple[str, str], object]:
    table: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # protocols 0-2 build these by calling them (later protocols have opcodes)
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "bytearray"): bytearray,
        ("builtins", "complex"): complex,
        ("collections", "OrderedDict"): collections.OrderedDict,
    }
    for core in ("numpy.core", "numpy._core"):
        table[(f"{core}.multiarray", "_reconstruct")] = _CORE.multiarray._reconstruct  # arrays
        table[(f"{core}.multiarray", "scalar")] = _CORE.multiarray.scalar  # numpy scalars
        table[(f"{core}.numeric", "_frombuffer")] = _CORE.numeric._frombuffer  # protocol 5
    for name in dir(getattr(np, "dtypes", None)):  # numpy >= 1.25: dtype classes
        cls = getattr(np.dtypes, name)
        if isinstance(cls, type) and issubclass(cls, np.dtype):
            table[("numpy.dtypes", name)] = cls
    return table


ALLOWED = _allowed()
# Python 2 files (CIFAR-100's, Ren et al.'s) name the builtins module __builtin__
_PY2_MODULES = {"__builtin__": "builtins"}
_TEXT_CODECS = {"latin1", "latin-1", "iso-8859-1", "ascii", "utf-8", "utf8"}


def load(file: IO[bytes], label: str | Path, encoding: str = "ASCII"):
    """Unpickle `file` allowing only plain data; `label` names the file in errors.
    encoding: how to read Python 2 strings ("latin1" for numpy arrays pickled by Python 2)."""
    return _DataUnpickler(file, str(label), encoding=encoding).load()


def load_path(path: Path, encoding: str = "ASCII"):
    with open(path, "rb") as f:
        return load(f, path, encoding)


class _DataUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], label: str, **kwargs):
        super().__init__(file, **kwargs)
        self.label = label

    def find_class(self, module: str, name: str):
        module = _PY2_MODULES.get(module, module)
        if (module, name) == ("_codecs", "encode"):  # how protocols 0-2 store bytes
            return self._encode_text
        if (module, name) in ALLOWED:
            return ALLOWED[(module, name)]
        raise DataError(
            f"{self.label} is not a plain data file: loading it would call {module}.{name}, "
            "and metarun reads only numpy arrays, numbers, strings and containers from "
            "pickles (a pickle that names other functions can run any code). Get the file "
            "again from the data set's original source."
        )

    def _encode_text(self, text: str, encoding: str = "utf-8") -> bytes:
        # only the text codecs pickle itself uses; others (zlib, bz2) could expand a tiny file
        if encoding.lower() not in _TEXT_CODECS:
            raise DataError(
                f"{self.label} is not a plain data file: it asks to decode bytes with the "
                f"{encoding!r} codec. Get the file again from the data set's original source."
            )
        return text.encode(encoding)
