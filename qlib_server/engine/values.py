"""What the evaluator passes between operators: a block of series, one per instrument, on calendar positions.

``Series.data`` has shape ``(n, t)``: row ``i`` is instrument ``i``'s series, column ``j`` is calendar position
``start + j``. Only ``data[i, lo[i]:hi[i]]`` exists; it is exactly the ``pandas.Series`` Qlib holds for that
instrument at that point of the expression (same dtype, NaN where Qlib has NaN). What lies outside that slice
means nothing, except that float data is kept NaN there, so that aligning two series (below) is cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class Unsupported(Exception):
    """An expression, or a part of one, that the engine leaves to Qlib (the message says why)."""


@dataclass
class Series:
    data: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    _float64: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def empty(self) -> np.ndarray:
        return self.lo >= self.hi

    def same_spans(self, other: Series) -> bool:
        """Whether every row's index equals ``other``'s (no alignment: pandas computes position by position)."""
        both_empty = self.empty & other.empty
        return bool(np.all(both_empty | ((self.lo == other.lo) & (self.hi == other.hi))))

    def float64(self) -> np.ndarray:
        """The data as pandas' window operations take it (``float64``, C-contiguous; made once, read-only)."""
        if self._float64 is None:
            if self.data.dtype.kind not in "fiub":
                raise Unsupported(f"a window over {self.data.dtype} values")
            self._float64 = np.ascontiguousarray(self.data, dtype=np.float64)
            if self._float64 is not self.data:
                self._float64.flags.writeable = False
        return self._float64

    def with_data(self, data: np.ndarray) -> Series:
        return Series(data, self.lo, self.hi)

    def nan_outside(self) -> Series:
        """The same series with NaN outside every row's slice (float data only)."""
        positions = np.arange(self.data.shape[1])
        outside = (positions < self.lo[:, None]) | (positions >= self.hi[:, None])
        if not outside.any():
            return self
        data = self.data.copy()
        data[outside] = np.nan
        return self.with_data(data)


def union(left: Series, right: Series) -> tuple[Series, Series, np.ndarray, np.ndarray]:
    """Both series reindexed to the union of their indexes, row by row, as pandas aligns two Series in an
    arithmetic operation: a value missing on one side becomes NaN. Returns them and the union's spans.

    Qlib's series are contiguous slices of the calendar; a union with a gap (two ranges that neither overlap
    nor touch) would be a series whose neighbours are not calendar neighbours, which the engine does not model.
    """
    lo = np.where(left.empty, right.lo, np.where(right.empty, left.lo, np.minimum(left.lo, right.lo)))
    hi = np.where(left.empty, right.hi, np.where(right.empty, left.hi, np.maximum(left.hi, right.hi)))
    gap = ~left.empty & ~right.empty & ((left.hi < right.lo) | (right.hi < left.lo))
    if gap.any():
        raise Unsupported("two operands cover calendar ranges with a gap between them")
    return _reindexed(left, lo, hi), _reindexed(right, lo, hi), lo, hi


def _reindexed(series: Series, lo: np.ndarray, hi: np.ndarray) -> Series:
    grows = ~((series.lo == lo) & (series.hi == hi)) & (lo < hi)
    if not grows.any():
        return series
    kind = series.data.dtype.kind
    if kind == "f":
        return series.nan_outside()
    if kind in "iu":  # pandas turns integers into float64 to hold the NaN it adds
        return Series(series.data.astype(np.float64), series.lo, series.hi).nan_outside()
    raise Unsupported(f"aligning {series.data.dtype} series of different ranges")
