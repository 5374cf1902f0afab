"""What :class:`.incremental.Extender` passes between operators: a node's series on the few positions an
extension needs (a :class:`Part`), and the evaluator's span rules (:func:`.values.union`, ``shift``, the cut of
a field) on parts."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .values import Unsupported


@dataclass
class Part:
    """A node's series on positions ``[base, end]`` only: ``data[:, c]`` is position ``base + c``; ``lo``/``hi``
    are the whole series' spans (positions), as the full evaluation has them."""

    data: np.ndarray
    base: int
    lo: np.ndarray
    hi: np.ndarray
    _float64: np.ndarray | None = field(default=None, repr=False)

    @property
    def empty(self) -> np.ndarray:
        return self.lo >= self.hi

    def same_spans(self, other: Part) -> bool:
        both_empty = self.empty & other.empty
        return bool(np.all(both_empty | ((self.lo == other.lo) & (self.hi == other.hi))))

    def at(self, base: int) -> Part:
        """The same series from position ``base`` (>= this part's) on."""
        if base == self.base:
            return self
        if base < self.base:
            raise AssertionError(f"a part from {self.base} read from {base}")
        return Part(self.data[:, base - self.base:], base, self.lo, self.hi)

    def with_data(self, data: np.ndarray) -> Part:
        return Part(data, self.base, self.lo, self.hi)

    def with_spans(self, lo: np.ndarray, hi: np.ndarray) -> Part:
        return Part(self.data, self.base, lo, hi)

    def float64(self) -> np.ndarray:
        if self._float64 is None:
            if self.data.dtype.kind not in "fiub":
                raise Unsupported(f"a window over {self.data.dtype} values")
            self._float64 = np.ascontiguousarray(self.data, dtype=np.float64)
            if self._float64 is not self.data:  # read-only as Series.float64 (the kernels' same signatures)
                self._float64.flags.writeable = False
        return self._float64

    def outside(self) -> np.ndarray:
        positions = self.base + np.arange(self.data.shape[1])
        return (positions < self.lo[:, None]) | (positions >= self.hi[:, None])


def union(left: Part, right: Part) -> tuple[Part, Part, np.ndarray, np.ndarray]:
    """:func:`.values.union` of two parts on the same positions."""
    lo = np.where(left.empty, right.lo, np.where(right.empty, left.lo, np.minimum(left.lo, right.lo)))
    hi = np.where(left.empty, right.hi, np.where(right.empty, left.hi, np.maximum(left.hi, right.hi)))
    gap = ~left.empty & ~right.empty & ((left.hi < right.lo) | (right.hi < left.lo))
    if gap.any():
        raise Unsupported("two operands cover calendar ranges with a gap between them")
    return _reindexed(left, lo, hi), _reindexed(right, lo, hi), lo, hi


def _reindexed(part: Part, lo: np.ndarray, hi: np.ndarray) -> Part:
    grows = ~((part.lo == lo) & (part.hi == hi)) & (lo < hi)
    if not grows.any():
        return part
    kind = part.data.dtype.kind
    if kind not in "fiu":
        raise Unsupported(f"aligning {part.data.dtype} series of different ranges")
    data = part.data.astype(np.float64) if kind in "iu" else part.data.copy()
    data[part.outside()] = np.nan
    return part.with_data(data)


def before(lo: np.ndarray, hi: np.ndarray, f0: int) -> np.ndarray:
    """Each span cut to positions before ``f0`` (empty ones as ``(0, 0)``)."""
    a, b = np.minimum(lo, f0), np.minimum(hi, f0)
    empty = a >= b
    return np.stack([np.where(empty, 0, a), np.where(empty, 0, b)])


def shift(x: Part, n: int, at: int, end: int) -> Part:
    """:func:`.evaluate._shift` of ``x`` (``series.shift(n)`` within each row's span) on positions ``[at, end]``."""
    kind = x.data.dtype.kind
    if kind not in "fiu":
        raise Unsupported(f"shifting {x.data.dtype} values (pandas makes them objects)")
    width = end - at + 1
    data = np.full((len(x.lo), width), np.nan, dtype=x.data.dtype if kind == "f" else np.float64)
    positions = at + np.arange(width)
    source = positions - n - x.base
    ok = (source >= 0) & (source < x.data.shape[1])
    data[:, ok] = x.data[:, source[ok]]
    lo, hi = x.lo[:, None], x.hi[:, None]
    data[(positions < lo) | (positions >= hi) | (positions - n < lo) | (positions - n >= hi)] = np.nan
    return Part(data, at, x.lo, x.hi)


def cut(part: Part, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`.features._cut` of a part: the values on positions ``[start, end]`` (float32) and where the series
    has an index entry there."""
    data = part.data
    if data.dtype.kind not in "fiub":
        raise Unsupported(f"a field of {data.dtype} values")
    width = max(0, end - start + 1)
    out = np.full((len(part.lo), width), np.nan, dtype=np.float32)
    out[:, :] = data[:, start - part.base:start - part.base + width]
    positions = start + np.arange(width)
    where = (positions >= part.lo[:, None]) & (positions < part.hi[:, None])
    out[~where] = np.nan
    return out, where
