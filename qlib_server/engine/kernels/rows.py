"""The engine's output rows: a field's values cut to the request's days, and the rows of a block that exist,
each in one pass over the block (NumPy's way took several passes and temporaries the size of the block).

Not window kernels: these move values, cast to float32 as NumPy's ``astype`` does, and compute nothing.
"""

import numba
import numpy as np

from .windows import JIT


@numba.njit(**JIT)
def cut(data, first, stop, lo, hi, width):
    """Calendar positions ``[first, first + width)`` of the series rows ``data`` (``[lo, hi)`` of each row
    exists): the float32 values, NaN where a position does not exist or is ``>= stop``, and where a position
    exists (whatever ``stop``)."""
    n = data.shape[0]
    out = np.empty((n, width), dtype=np.float32)
    where = np.empty((n, width), dtype=np.bool_)
    nan = np.float32(np.nan)
    for i in range(n):
        a, b = lo[i] - first, hi[i] - first
        for j in range(width):
            inside = a <= j and j < b
            where[i, j] = inside
            out[i, j] = np.float32(data[i, first + j]) if inside and j < stop - first else nan
    return out, where


@numba.njit(**JIT)
def compress(values, keep, out):
    """``values[keep]`` (row by row) into ``out``; the number of values written."""
    k = 0
    n, width = values.shape
    for i in range(n):
        for j in range(width):
            if keep[i, j]:
                out[k] = values[i, j]
                k += 1
    return k
