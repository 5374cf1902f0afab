"""Qlib expressions evaluated for a block of instruments at once, operator by operator, as Qlib evaluates them
for one instrument at a time (``Expression.load``): the same operands, dtypes, alignment and window rules.

An :class:`Evaluator` holds one block of instruments and one query range (the calendar positions Qlib loads
for a field: its start minus the expression's look-back, to its end plus its look-ahead). Like Qlib's
in-memory cache ``H["f"]``, it keeps each sub-expression's value under ``str(expression)``, so a
sub-expression shared by several fields of a request is computed once, and two expressions that Qlib
itself confuses (the same ``str``) are confused in the same way.
"""

from __future__ import annotations

import operator
from typing import Callable, Union

import numpy as np
from qlib.data import base, ops

from . import windows
from .values import Series, Unsupported, union

Operand = Union[Series, int, float, bool]


class Evaluator:
    """Evaluates expressions for ``instruments`` over calendar positions ``[start, end]`` (both included).

    ``read(instrument, field)`` returns the raw feature file (float32, its first value the start index),
    or None when the instrument has no such file."""

    def __init__(self, instruments: list[str], start: int, end: int, read: Callable[[str, str], np.ndarray | None]):
        self.instruments = list(instruments)
        self.start, self.end = start, end
        self.width = end - start + 1
        self.read = read
        self.memo: dict[str, Series] = {}
        self.others: dict[str, Evaluator] = {}  # ChangeInstrument / Mask: the block of one other instrument

    def value(self, expression) -> Operand:
        if not isinstance(expression, base.Expression):
            return expression  # a number: numpy and pandas treat Python scalars alike
        key = str(expression)
        if key not in self.memo:
            self.memo[key] = self._compute(expression)
        return self.memo[key]

    def series(self, expression) -> Series:
        result = self.value(expression)
        if not isinstance(result, Series):
            raise Unsupported(f"{expression!r} is a constant where Qlib needs a series")
        return result

    # -- one operator ---------------------------------------------------------------------------------------

    def _compute(self, e) -> Series:
        kind = type(e)
        if kind is base.Feature:
            return self._feature(e)
        if kind in (ops.ChangeInstrument, ops.Mask):
            return self._other_instrument(e)
        if kind in _UNARY:
            return self._unary(e, _UNARY[kind])
        if kind in _BINARY:
            return self._binary(e, _BINARY[kind])
        if kind is ops.If:
            return self._if(e)
        if kind is ops.Ref:
            return self._ref(e)
        if kind is ops.Delta:
            return self._delta(e)
        return windows.compute(self, e)

    def _feature(self, e) -> Series:
        n = len(self.instruments)
        data = np.full((n, self.width), np.nan, dtype=np.float32)
        lo = np.zeros(n, dtype=np.int64)
        hi = np.zeros(n, dtype=np.int64)
        for i, instrument in enumerate(self.instruments):
            raw = self.read(instrument, e._name)
            if raw is None:
                continue
            if raw.size == 0:
                raise Unsupported(f"the feature file of {instrument} {e} is empty")
            first = int(raw[0])
            begin, stop = max(self.start, first), min(self.end + 1, first + raw.size - 1)
            if begin < stop:
                data[i, begin - self.start:stop - self.start] = raw[1 + begin - first:1 + stop - first]
                lo[i], hi[i] = begin - self.start, stop - self.start
        return Series(data, lo, hi)

    def _other_instrument(self, e) -> Series:
        other = self.others.get(e.instrument)
        if other is None:
            other = self.others[e.instrument] = Evaluator([e.instrument], self.start, self.end, self.read)
        one = other.series(e.feature)
        n = len(self.instruments)
        return Series(np.repeat(one.data, n, axis=0), np.repeat(one.lo, n), np.repeat(one.hi, n))

    def _unary(self, e, func) -> Series:
        x = self.series(e.feature)
        data = x.data.astype(np.float32) if type(e) is ops.Sign else x.data  # Qlib's Sign casts first
        with np.errstate(all="ignore"):
            return x.with_data(func(data))

    def _binary(self, e, func) -> Series:
        left, right = self.value(e.feature_left), self.value(e.feature_right)
        if isinstance(left, Series) and isinstance(right, Series):
            if func in _NOT_FOR_BOOLEANS and left.data.dtype == right.data.dtype == np.bool_:
                raise Unsupported(f"{type(e).__name__} of two boolean series (pandas refuses it)")
            if not left.same_spans(right):
                if func not in _ALIGNING:
                    raise Unsupported(f"{type(e).__name__} of series with different indexes (Qlib: not aligned)")
                left, right, lo, hi = union(left, right)
                with np.errstate(all="ignore"):
                    return Series(func(left.data, right.data), lo, hi)
            spans = left
        elif isinstance(left, Series):
            spans = left
        elif isinstance(right, Series):
            spans = right
        else:
            raise Unsupported(f"{e} has no series operand")
        with np.errstate(all="ignore"):
            l_data = left.data if isinstance(left, Series) else left
            r_data = right.data if isinstance(right, Series) else right
            return spans.with_data(func(l_data, r_data))

    def _if(self, e) -> Series:
        condition = self.series(e.condition)
        branches = [self.value(b) for b in (e.feature_left, e.feature_right)]
        for branch in branches:
            if isinstance(branch, Series) and not branch.same_spans(condition):
                raise Unsupported("If over series of different lengths")
        left, right = (b.data if isinstance(b, Series) else b for b in branches)
        return condition.with_data(np.where(condition.data, left, right))

    def _ref(self, e) -> Series:
        x = self.series(e.feature)
        n = e.N
        if not isinstance(n, int):
            raise Unsupported(f"Ref by {n!r}")
        if n == 0:  # every row holds its series' first value
            first = x.data[np.arange(len(x.lo)), np.minimum(x.lo, self.width - 1)]
            return x.with_data(np.broadcast_to(first[:, None], x.data.shape).copy())
        return _shift(x, n)

    def _delta(self, e) -> Series:
        x = self.series(e.feature)
        if not isinstance(e.N, int):
            raise Unsupported(f"Delta by {e.N!r}")
        if e.N == 0:
            if x.empty.any():
                raise Unsupported("Delta(x, 0) of an empty series (Qlib raises on it)")
            first = x.data[np.arange(len(x.lo)), np.minimum(x.lo, self.width - 1)]
            with np.errstate(all="ignore"):
                return x.with_data(x.data - first[:, None])
        shifted = _shift(x, e.N)
        with np.errstate(all="ignore"):
            return x.with_data(x.data - shifted.data)


def _shift(x: Series, n: int) -> Series:
    """``series.shift(n)`` of every row: values move ``n`` positions within the row's own slice."""
    kind = x.data.dtype.kind
    if kind not in "fiu":
        raise Unsupported(f"shifting {x.data.dtype} values (pandas makes them objects)")
    data = np.full(x.data.shape, np.nan, dtype=x.data.dtype if kind == "f" else np.float64)
    for i in range(len(x.lo)):
        lo, hi = int(x.lo[i]), int(x.hi[i])
        if n > 0 and lo + n < hi:
            data[i, lo + n:hi] = x.data[i, lo:hi - n]
        elif n < 0 and lo < hi + n:
            data[i, lo:hi + n] = x.data[i, lo - n:hi]
    return x.with_data(data)


# NumPy functions Qlib applies to a Series. pandas hands the arithmetic and comparison ufuncs to the Series'
# own operators, which apply Python's operators to the arrays (``**`` then squares where np.power would not),
# and aligns the operands of those and of the other ufuncs on their indexes first.
_UNARY = {ops.Abs: np.abs, ops.Sign: np.sign, ops.Log: np.log}
if hasattr(ops, "Not"):
    _UNARY[ops.Not] = np.bitwise_not
_BINARY = {
    ops.Add: operator.add, ops.Sub: operator.sub, ops.Mul: operator.mul, ops.Div: operator.truediv,
    ops.Power: operator.pow, ops.Greater: np.maximum, ops.Less: np.minimum,
    ops.Gt: operator.gt, ops.Ge: operator.ge, ops.Lt: operator.lt, ops.Le: operator.le,
    ops.Eq: operator.eq, ops.Ne: operator.ne, ops.And: operator.and_, ops.Or: operator.or_,
}
_NOT_FOR_BOOLEANS = {operator.truediv, operator.pow}
# Those pandas aligns (union of indexes, NaN where one side has no value); comparisons of differently
# indexed Series raise in pandas, and & | of them turn booleans into objects.
_ALIGNING = {operator.add, operator.sub, operator.mul, operator.truediv, operator.pow, np.maximum, np.minimum}
