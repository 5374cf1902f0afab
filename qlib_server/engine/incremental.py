"""Incremental evaluation: a full evaluation over ``[0, T]`` also records a compact checkpoint, and
:class:`Extender` computes, from that checkpoint and the data after days were appended, only the rows that
change, bit for bit what a full evaluation of the longer data gives (values, NaN and index entries), and the
next checkpoint (so extensions chain: 1 day, then 5, then 1 ...).

What changes (see :mod:`.plan`): a node's rows from its frozen point ``T + 1 - look-ahead`` on; a field's rows
from its own frozen point (``Ref($close, -2)``'s last two rows gain values). What the checkpoint keeps, per
block of instruments and per node: for a window with running state (sum/mean, var/std/sem, skew/kurt, ewm and
EMA, Slope/Rsquare/Resi, Corr/Cov) the kernel's state at the frozen point; for every window the values between
its base and its frozen point that a consumer reads back; for a feature its index span and a CRC32 of the
values the extension reads again before ``T + 1`` (history rewritten: :class:`Unsupported`); for ``Ref(x, 0)``
/ ``Delta(x, 0)`` each series' first value. Features are read again from the files, and elementwise operators,
``Ref`` and ``Delta`` recomputed over the few rows they are needed for.

Covered: every operator the engine evaluates (features, Abs/Sign/Log/Not, the arithmetic, comparison and
logical operators with Qlib's alignment, If, Ref, Delta, all Rolling windows 0/int/alpha, Rank, Quantile,
IdxMax/IdxMin, Mad, WMA, EMA, Slope/Rsquare/Resi, Corr/Cov); instruments delisted before ``T`` (no new rows),
feature files that did not grow, instruments of the block listed after ``T``. Expanding forms whose value
needs the whole window (median, quantile, rank, count, max/min, IdxMax/IdxMin, Mad, WMA, EMA(x, 0), and
var/std/sem/skew/kurt, whose rebuilds re-read the window) are extended exactly but re-read their operand's
whole history (its values kept in the checkpoint when the operand is itself a window).

Raises :class:`Unsupported` (the caller recomputes the cache): ChangeInstrument and Mask; any field the full
evaluation left to Qlib; whatever the full evaluation of the longer data would leave to Qlib; a feature whose
history changed (its start, its end before ``T + 1`` or, where re-read, its values), or that grew after
ending before ``T + 1``.
"""

from __future__ import annotations

import zlib
from typing import Any, Union

import numpy as np
from qlib.data import base, ops

from . import evaluate, windows
from .evaluate import Evaluator
from .kernels.resumable import STATE
from .parts import Part, before, shift, union
from .plan import Node, Plan
from .values import Series, Unsupported
from .values import union as series_union

Records = dict  # node key -> {what: array}


def _crc(data: np.ndarray) -> np.ndarray:
    """Each row's CRC32 (of its float32 bytes)."""
    data = np.ascontiguousarray(data)
    return np.array([zlib.crc32(row.tobytes()) for row in data], dtype=np.uint32)


def _feature_record(data: np.ndarray, lo: np.ndarray, hi: np.ndarray, node: Node, f0: int) -> dict:
    """A feature's spans and the CRC of the values an extension re-reads before ``f0`` (columns from 0 =
    ``node.base``)."""
    return {"lo": lo.copy(), "hi": hi.copy(), "crc": _crc(data[:, :max(0, f0 - node.base)])}


def _j(frozen: int, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Each row's series position of calendar position ``frozen`` (clamped to the series)."""
    return np.clip(frozen - lo, 0, np.maximum(hi - lo, 0)).astype(np.int64)


def _masked(node: Node, values: np.ndarray, stds: list) -> None:
    """Qlib's NaN where the rolling std behind Rsquare / Corr is ~0 (``stds``: on ``values``' columns)."""
    for std in stds:
        values[windows.close_to_zero(std)] = np.nan


class Recorder(Evaluator):
    """An :class:`Evaluator` that also records, node by node of ``plan``, what an extension needs."""

    def __init__(self, instruments, start, end, read, plan: Plan):
        super().__init__(instruments, start, end, read)
        self.plan = plan
        self.records: Records = {}

    def _compute(self, e) -> Series:
        node = self.plan.nodes.get(self.plan.key(e))
        if node is None:
            return super()._compute(e)
        if node.kind == "window":
            return self._window(node)
        result = super()._compute(e)
        if node.kind == "feature":
            self.records[node.key] = _feature_record(result.data[:, node.base:], result.lo, result.hi, node,
                                                     self.plan.f0)
        elif node.kind == "first":
            x = self.series(e.feature)
            self.records[node.key] = {"first": x.data[np.arange(len(x.lo)), np.minimum(x.lo, self.width - 1)]}
        return result

    def _window(self, node: Node) -> Series:
        w = node.window
        assert w is not None
        x, y = _operands(node, [self.value(o) for o in w.operands], Series)
        n = len(x.lo)
        record = {}
        if w.family == "content":
            values = _content(w, x.float64(), x.lo, x.hi)
        else:
            state = np.zeros((n, STATE[w.family]))
            j0 = np.zeros(n, dtype=np.int64)
            args = (x.float64(),) if y is None else (x.float64(), y.float64())
            values = _stateful(w, args, x.lo, x.hi, j0, _j(node.frozen, x.lo, x.hi), state)
            record["state"] = state
        _masked(node, values, [self.series(m).data for m in w.masks])
        record["tail"] = values[:, node.base:node.frozen].copy()
        self.records[node.key] = record
        return Series(values, x.lo, x.hi)


def _operands(node: Node, values: list, kind) -> tuple:
    """The window's operand (and a pair's second one), checked and aligned as :func:`.windows._pair` does."""
    if len(values) == 1:
        if not isinstance(values[0], kind):
            raise Unsupported(f"{node.key} of a constant")
        return values[0], None
    left, right = values
    if not (isinstance(left, kind) and isinstance(right, kind)):
        raise Unsupported(f"{type(node.expression).__name__} with a constant operand")
    if left.same_spans(right):
        return left, right
    if type(node.expression) is ops.Corr:  # Qlib's mask combines arrays of two lengths: it raises
        raise Unsupported("Corr of series with different indexes")
    if kind is Series:
        left, right, lo, hi = series_union(left, right)
        return Series(left.data, lo, hi), Series(right.data, lo, hi)
    left, right, lo, hi = union(left, right)
    return left.with_spans(lo, hi), right.with_spans(lo, hi)


def _content(w, x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    kernel = windows.kernel(w.kernel)
    if w.kernel == "expanding_ema":
        return kernel(x, lo, hi)
    if w.kernel == "rolling_quantile":
        return kernel(x, lo, hi, w.window, w.param)
    return kernel(x, lo, hi, w.window)


def _stateful(w, args: tuple, lo, hi, j0, jsave, state) -> np.ndarray:
    from .kernels import resumable

    kernel = getattr(resumable, w.kernel)
    parameter = w.param if w.family == "ewm" else w.window
    return kernel(*args, lo, hi, parameter, j0, jsave, state)


# -- the extension ----------------------------------------------------------------------------------------------


Value = Union[Part, int, float, bool]


class Extender:
    """The nodes of one evaluator's fields (``plan``, made for the old data) recomputed on the data that now
    ends at position ``end`` (the evaluator's start is calendar position ``start``), from the checkpoint
    ``records``; :attr:`records` afterwards holds the next checkpoint, made for the plan ``after`` (the same
    fields planned for the new data)."""

    def __init__(self, instruments, start: int, end: int, read, plan: Plan, after: Plan, records: Records):
        self.instruments, self.start, self.end, self.read = list(instruments), start, end, read
        self.plan, self.after, self.saved = plan, after, records
        self.memo: dict[str, Part] = {}
        self.records: Records = {}

    def value(self, e) -> Value:
        if not isinstance(e, base.Expression):
            return e
        key = self.plan.key(e)
        if key not in self.memo:
            node = self.plan.nodes.get(key)
            if node is None:
                raise Unsupported(f"{key} is not in the checkpoint's plan")
            self.memo[key] = self._compute(node)
        return self.memo[key]

    def part(self, e) -> Part:
        result = self.value(e)
        if not isinstance(result, Part):
            raise Unsupported(f"{e!r} is a constant where Qlib needs a series")
        return result

    def _operand(self, e, at: int) -> Value:
        value = self.value(e)
        return value.at(at) if isinstance(value, Part) else value

    def _compute(self, node: Node) -> Part:
        e = node.expression
        if node.kind == "feature":
            return self._feature(node)
        if node.kind == "window":
            return self._window(node)
        if node.kind == "unary":
            x = self.part(e.feature).at(node.base)
            data = x.data.astype(np.float32) if type(e) is ops.Sign else x.data
            with np.errstate(all="ignore"):
                return x.with_data(evaluate._UNARY[type(e)](data))
        if node.kind == "binary":
            return self._binary(node)
        if node.kind == "if":
            condition = self.part(e.condition).at(node.base)
            branches = [self._operand(b, node.base) for b in (e.feature_left, e.feature_right)]
            for branch in branches:
                if isinstance(branch, Part) and not branch.same_spans(condition):
                    raise Unsupported("If over series of different lengths")
            left, right = (b.data if isinstance(b, Part) else b for b in branches)
            return condition.with_data(np.where(condition.data, left, right))
        if node.kind == "first":
            return self._first(node)
        x = self.part(e.feature)
        shifted = shift(x, node.n, node.base, self.end)
        if node.kind == "ref":
            return shifted
        x = x.at(node.base)
        with np.errstate(all="ignore"):
            return x.with_data(x.data - shifted.data)

    def _feature(self, node: Node) -> Part:
        n, width = len(self.instruments), self.end - node.base + 1
        data = np.full((n, width), np.nan, dtype=np.float32)
        lo = np.zeros(n, dtype=np.int64)
        hi = np.zeros(n, dtype=np.int64)
        since = self.start + node.base  # the first calendar position read
        tail = getattr(self.read, "tail", None)
        for i, instrument in enumerate(self.instruments):
            if tail is not None:  # (start index, number of values, the values from max(start index, since))
                found = tail(instrument, node.expression._name, since)
            else:
                raw = self.read(instrument, node.expression._name)
                found = None if raw is None else (int(raw[0]) if raw.size else 0, raw.size - 1,
                                                  raw[1 + max(0, since - int(raw[0])):] if raw.size else raw)
            if found is None:
                continue
            first, count, values = found
            if count < 0:
                raise Unsupported(f"the feature file of {instrument} {node.key} is empty")
            begin, stop = max(self.start, first), min(self.start + self.end + 1, first + count)
            if begin < stop:
                lo[i], hi[i] = begin - self.start, stop - self.start
                a = max(begin, since)
                if a < stop:
                    offset = max(first, since)
                    data[i, a - since:stop - since] = values[a - offset:stop - offset]
        saved, f0 = self.saved[node.key], self.plan.f0
        if not (np.array_equal(before(lo, hi, f0), before(saved["lo"], saved["hi"], f0))
                and np.array_equal(_crc(data[:, :max(0, f0 - node.base)]), saved["crc"])):
            raise Unsupported(f"the history of {node.key} changed since the checkpoint")
        then = self.after.nodes[node.key]
        self.records[node.key] = _feature_record(data[:, then.base - node.base:], lo, hi, then, self.after.f0)
        return Part(data, node.base, lo, hi)

    def _binary(self, node: Node) -> Part:
        e = node.expression
        func: Any = evaluate._BINARY[type(e)]
        left, right = self._operand(e.feature_left, node.base), self._operand(e.feature_right, node.base)
        if isinstance(left, Part) and isinstance(right, Part):
            if func in evaluate._NOT_FOR_BOOLEANS and left.data.dtype == right.data.dtype == np.bool_:
                raise Unsupported(f"{type(e).__name__} of two boolean series (pandas refuses it)")
            if not left.same_spans(right):
                if func not in evaluate._ALIGNING:
                    raise Unsupported(f"{type(e).__name__} of series with different indexes (Qlib: not aligned)")
                left, right, lo, hi = union(left, right)
                with np.errstate(all="ignore"):
                    return Part(func(left.data, right.data), node.base, lo, hi)
            spans = left
        elif isinstance(left, Part):
            spans = left
        elif isinstance(right, Part):
            spans = right
        else:
            raise Unsupported(f"{e} has no series operand")
        with np.errstate(all="ignore"):
            l_data = left.data if isinstance(left, Part) else left
            r_data = right.data if isinstance(right, Part) else right
            return spans.with_data(func(l_data, r_data))

    def _first(self, node: Node) -> Part:
        e = node.expression
        x = self.part(e.feature).at(node.base)
        first = np.array(self.saved[node.key]["first"], dtype=x.data.dtype)
        late = x.lo >= node.frozen  # a series starting in the recomputed rows: its first value is new
        if late.any():
            columns = np.clip(x.lo - x.base, 0, x.data.shape[1] - 1)
            first[late] = x.data[np.arange(len(x.lo)), columns][late]
        self.records[node.key] = {"first": first}
        if type(e) is ops.Ref:
            return x.with_data(np.broadcast_to(first[:, None], x.data.shape).copy())
        if x.empty.any():
            raise Unsupported("Delta(x, 0) of an empty series (Qlib raises on it)")
        with np.errstate(all="ignore"):
            return x.with_data(x.data - first[:, None])

    def _window(self, node: Node) -> Part:
        w = node.window
        assert w is not None
        operands = [self.value(o) for o in w.operands]
        x, y = _operands(node, operands, Part)
        if y is not None:
            at = max(x.base, y.base)
            x, y = x.at(at), y.at(at)
        frozen, then = node.frozen, self.after.nodes[node.key]
        lo, hi = x.lo - x.base, x.hi - x.base
        if w.family == "content":
            reach = w.tail()
            first = -x.base if reach is None else frozen - reach - x.base
            if x.base > max(0, first + x.base):
                raise AssertionError(f"{node.key}: its operand's rows from {x.base} do not reach back enough")
            width = x.data.shape[1]
            chi = np.clip(hi, 0, width)
            clo = np.minimum(np.clip(np.maximum(lo, first), 0, width), chi)
            values = _content(w, x.float64(), clo, chi)
        else:
            state = np.array(self.saved[node.key]["state"], dtype=np.float64)
            j0, jsave = _j(frozen, x.lo, x.hi), _j(then.frozen, x.lo, x.hi)
            args = (x.float64(),) if y is None else (x.float64(), y.float64())
            values = _stateful(w, args, lo, hi, j0, jsave, state)
        start = frozen - x.base
        _masked(node, values[:, start:], [self.part(m).at(frozen).data for m in w.masks])
        out = np.full((len(x.lo), self.end - node.base + 1), np.nan)
        out[:, :frozen - node.base] = self.saved[node.key]["tail"]
        out[:, frozen - node.base:] = values[:, start:]
        record = {"tail": out[:, then.base - node.base:then.frozen - node.base].copy()}
        if w.family != "content":
            record["state"] = state
        self.records[node.key] = record
        return Part(out, node.base, x.lo, x.hi)
