"""Qlib's pandas-based window operators for many series at once: IdxMax, IdxMin, Mad, WMA, EMA (window 0),
Med and Quantile.

Each kernel is ``rolling_<name>(x, lo, hi, window)`` under the contract of :mod:`qlib_server.engine.kernels`
(``window == 0`` is the expanding form), except :func:`expanding_ema`, which only exists for window 0 (for
``N > 0`` Qlib's EMA is ``pandas.ewm``). Values are bit for bit what Qlib computes on the row's slice with
pandas 3.1.1 ``rolling(window, min_periods=1)`` / ``expanding(min_periods=1)``, because these kernels keep
pandas' rules:

- pandas turns +-inf into NaN before any window function, so here a value counts iff it is finite;
- ``.apply(f, raw=True)`` calls ``f`` only where the window holds a finite value, else the result is NaN;
  ``f`` then receives the whole window, NaN included (an inf arrives as NaN);
- numpy's ``np.sum``/``mean``/``nansum``/``nanmean`` of a float64 array is ``0.0 + pairwise(a)`` (numpy's
  ``pairwise_sum``: sequential from -0.0 below 8 values, 8 accumulators up to 128, halves above), redone in
  :func:`_np_sum`;
- ``median``/``quantile`` are pandas' skiplist order statistics over the window's finite values; equal
  values (0.0 and -0.0) stay in arrival order, as in the skiplist (insert after equals, remove the first);
  but ``quantile(0.0)``/``quantile(1.0)`` are pandas' ``roll_min``/``roll_max``, which keep the newest of
  equal extremes (the sign of a zero differs).

EMA's weights ``a ** arange(n)[::-1]`` are computed by numpy itself (:func:`expanding_ema`): numpy's power
on this hardware (SIMD/SVML) differs from libm's ``pow`` in the last bit for ~5% of the weights.
Kernels compile with ``error_model="numpy"`` (IEEE division by zero) and never with fastmath.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from .windows import rolling_max, rolling_min

_jit = numba.njit(cache=True, nogil=True, error_model="numpy")


@_jit
def _pairwise_block(a, s, n):
    """numpy ``DOUBLE_pairwise_sum`` of a[s:s + n] for n <= 128 (no halving)."""
    if n < 8:
        res = -0.0
        for k in range(s, s + n):
            res += a[k]
        return res
    r0, r1, r2, r3 = a[s], a[s + 1], a[s + 2], a[s + 3]
    r4, r5, r6, r7 = a[s + 4], a[s + 5], a[s + 6], a[s + 7]
    k = 8
    stop = n - n % 8
    while k < stop:
        b = s + k
        r0 += a[b]
        r1 += a[b + 1]
        r2 += a[b + 2]
        r3 += a[b + 3]
        r4 += a[b + 4]
        r5 += a[b + 5]
        r6 += a[b + 6]
        r7 += a[b + 7]
        k += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while k < n:
        res += a[s + k]
        k += 1
    return res


@_jit
def _left_half(n):
    """numpy's split of n > 128 values: half, rounded down to a multiple of 8."""
    n2 = n // 2
    return n2 - n2 % 8


@_jit
def _pairwise(a, s, n):
    """numpy ``DOUBLE_pairwise_sum`` of a[s:s + n]: its recursion (left + right halves) on an explicit
    stack (a recursive numba function called from cached ones crashes numba 0.68)."""
    if n <= 128:
        return _pairwise_block(a, s, n)
    starts = np.empty(64, np.int64)  # node stack: a node waits for its left, then its right half
    sizes = np.empty(64, np.int64)
    lefts = np.empty(64)
    has_left = np.zeros(64, np.bool_)
    top = 0
    starts[0], sizes[0], has_left[0] = s, n, False
    while True:
        if sizes[top] > 128:  # descend into the left half
            top += 1
            starts[top], sizes[top], has_left[top] = starts[top - 1], _left_half(sizes[top - 1]), False
            continue
        v = _pairwise_block(a, starts[top], sizes[top])
        top -= 1
        while top >= 0 and has_left[top]:  # both halves done: combine and climb
            v = lefts[top] + v
            top -= 1
        if top < 0:
            return v
        lefts[top], has_left[top] = v, True  # left half done: descend into the right half
        n2 = _left_half(sizes[top])
        top += 1
        starts[top], sizes[top], has_left[top] = starts[top - 1] + n2, sizes[top - 1] - n2, False


@_jit
def _np_sum(a, n):
    """``np.sum(a[:n])`` for a contiguous float64 array: the reduction starts from 0.0."""
    return 0.0 + _pairwise(a, 0, n)


@_jit
def _start(p, lo, window):
    """First position of the window ending at p (expanding when window == 0)."""
    return lo if window == 0 else max(lo, p - window + 1)


_SCAN_WINDOW = 8  # up to this window a branch-free scan of the window is the fastest


@_jit
def _idx_extreme(x, lo, hi, window, sign):
    """``apply(lambda x: x.argmax() + 1, raw=True)`` (sign 1) or ``argmin`` (sign -1) per row.

    pandas calls the function only where the window holds a finite value (else NaN); numpy's argmax/argmin
    then answer the window's first non-finite position if it has one (pandas made inf NaN, and numpy stops
    at the first NaN), else the first of the window's equal extremes (``key = sign * value``; a later one
    wins only when strictly greater). The first non-finite position from each position on comes from a
    backward pass. Small windows scan branch-free. Larger ones split the row into blocks of ``window``
    positions from ``lo`` (one block when expanding or when the window outgrows the row): a window then
    runs from a position ``s`` of one block to a position ``p`` of the next (or is a block's start to
    ``p``), so its first extreme is that of ``s`` to its block's end (kept by the backward pass) or, when
    strictly greater, that of ``p``'s block start to ``p`` (kept going forward): O(1) a step, branch-free."""
    out = np.full(x.shape, np.nan)
    t = x.shape[1]
    nxt = np.empty(t + 1, np.int64)  # first non-finite position >= k (b when none)
    key = np.empty(t)  # sign * value, -inf for a non-finite value (never compared: handled first)
    tail = np.empty(t, np.int64)  # first extreme from k to the end of k's block
    tail_key = np.empty(t)
    for i in range(x.shape[0]):
        row, a, b = x[i], lo[i], hi[i]
        if b <= a:
            continue
        w = window if 0 < window < b - a else b - a
        nxt[b] = b
        off = (b - 1 - a) % w  # (k - a) % w
        best = b - 1
        best_key = -np.inf
        for k in range(b - 1, a - 1, -1):
            finite = math.isfinite(row[k])
            nxt[k] = nxt[k + 1] if finite else k
            kk = sign * row[k] if finite else -np.inf
            key[k] = kk
            take = (off == w - 1) | (kk >= best_key)  # a block's last position, or not smaller: earlier wins
            best = k if take else best
            best_key = kk if take else best_key
            tail[k] = best
            tail_key[k] = best_key
            off = off - 1 if off > 0 else w - 1
        scan = 0 < window <= _SCAN_WINDOW
        count = 0  # finite values in the window
        off = 0  # (p - a) % w
        best = a  # first extreme from p's block start to p
        best_key = -np.inf
        for p in range(a, b):
            kk = key[p]
            take = (off == 0) | (kk > best_key)
            best = p if take else best
            best_key = kk if take else best_key
            count += nxt[p] != p
            s = a
            if p - w >= a:
                s = p - w + 1
                count -= nxt[p - w] != p - w
            if count > 0:
                at = nxt[s]
                if at > p and scan:
                    at = s
                    at_key = key[s]
                    for k in range(s + 1, p + 1):
                        bigger = key[k] > at_key
                        at = k if bigger else at
                        at_key = key[k] if bigger else at_key
                elif at > p:
                    at = best
                    if s > a and off != w - 1:  # s and p in consecutive blocks
                        at = tail[s] if tail_key[s] >= best_key else best
                out[i, p] = float(at - s + 1)
            off = off + 1 if off + 1 < w else 0
    return out


@_jit
def _mad(x, lo, hi, window):
    """Qlib Mad's ``np.mean(np.abs(x1 - x1.mean()))`` over the window's finite values, per row."""
    out = np.full(x.shape, np.nan)
    buf = np.empty(x.shape[1])
    for i in range(x.shape[0]):
        row, a, b = x[i], lo[i], hi[i]
        for p in range(a, b):
            m = 0
            for k in range(_start(p, a, window), p + 1):
                if math.isfinite(row[k]):
                    buf[m] = row[k]
                    m += 1
            if m == 0:
                continue
            mean = _np_sum(buf, m) / m
            for k in range(m):
                buf[k] = abs(buf[k] - mean)
            out[i, p] = _np_sum(buf, m) / m
    return out


@_jit
def _wma(x, lo, hi, window):
    """Qlib WMA's ``np.nanmean(w * x)`` with ``w = (arange(n) + 1) / sum``, per row."""
    out = np.full(x.shape, np.nan)
    buf = np.empty(x.shape[1])
    for i in range(x.shape[0]):
        row, a, b = x[i], lo[i], hi[i]
        for p in range(a, b):
            s = _start(p, a, window)
            n = p - s + 1
            total = float(n * (n + 1) // 2)
            count = 0
            for k in range(n):
                v = row[s + k]
                if math.isfinite(v):
                    buf[k] = (float(k + 1) / total) * v
                    count += 1
                else:
                    buf[k] = 0.0  # nanmean replaces NaN (and pandas' NaN for inf) by 0
            if count > 0:
                out[i, p] = _np_sum(buf, n) / count
    return out


@_jit
def _weighted_nansum_at(x, lo, hi, w, out):
    """``np.nansum(w * x[lo:lo + len(w)])`` at position lo + len(w) - 1 of every row that has it."""
    n = w.shape[0]
    buf = np.empty(n)
    for i in range(x.shape[0]):
        row, a = x[i], lo[i]
        if hi[i] - a < n:
            continue
        count = 0
        for k in range(n):
            v = row[a + k]
            if math.isfinite(v):
                buf[k] = w[k] * v
                count += 1
            else:
                buf[k] = 0.0
        if count > 0:
            out[i, a + n - 1] = _np_sum(buf, n)


_NO_RANK = -(1 << 40)  # the rank of an empty slot or a NaN: never one an order statistic asks for


@_jit
def _order_stat(x, lo, hi, window, q, median):
    """pandas ``roll_median_c`` (median) or ``roll_quantile`` linear (q) over the window's finite values.

    The skiplist orders the window's finite values by value, and equal ones (0.0 and -0.0: which of them is
    picked shows in the sign) in arrival order: it inserts a value after its equals and removes the first of
    a leaving value's equals, which is the leaving value itself, the window's oldest. The window is a ring of
    slots, each holding a value and its rank in that order, and a step is one branch-free pass over the
    filled slots: a value entering moves up the ranks of the greater values, the one leaving moves down those
    it preceded (all values >= it), the entering value's rank is the count of values <= it, and the slots
    holding the wanted ranks are found on the way. Interpolation as pandas: ``lo + (hi - lo) * (f - int(f))``
    with ``f = q * (n - 1)``; the median of an even count ``(hi + lo) / 2``."""
    out = np.full(x.shape, np.nan)
    ring = window if 0 < window < x.shape[1] else x.shape[1]  # expanding or longer than a row: never wraps
    val = np.empty(max(ring, 1))
    rank = np.empty(max(ring, 1), np.int64)
    for i in range(x.shape[0]):
        row, a, b = x[i], lo[i], hi[i]
        val[:] = np.nan
        rank[:] = _NO_RANK
        m = 0
        slot = 0  # where position p goes, and where the value leaving (position p - window) was
        for p in range(a, b):
            v = row[p]
            add = math.isfinite(v)
            if not add:
                v = np.nan
            r = val[slot]
            drop = r == r
            m += add - drop
            if m == 0:  # every slot holds NaN
                val[slot] = v
                rank[slot] = _NO_RANK
            else:
                f = 0.0
                if median:
                    k2 = m // 2
                    k1 = k2 if m % 2 else k2 - 1
                else:
                    f = q * float(m - 1)
                    k1 = int(f)
                    k2 = k1 if f == k1 else k1 + 1
                below = 0  # values <= v (the leaving one included)
                s1 = s2 = 0  # the slots of ranks k1 and k2 (0 when the entering value holds it)
                for k in range(min(ring, p - a + 1)):
                    e = val[k]
                    rk = rank[k] + (v < e) - (r <= e)
                    rank[k] = rk
                    below += e <= v
                    s1 += k if rk == k1 else 0
                    s2 += k if rk == k2 else 0
                if rank[slot] == k1:  # the leaving value's slot (its rank now meaningless) is no answer
                    s1 -= slot
                if rank[slot] == k2:
                    s2 -= slot
                if add:
                    val[slot] = v
                    rank[slot] = below - (r <= v)
                    if rank[slot] == k1:
                        s1 = slot
                    if rank[slot] == k2:
                        s2 = slot
                else:
                    val[slot] = np.nan
                    rank[slot] = _NO_RANK
                low = val[s1]
                if median:
                    out[i, p] = low if k1 == k2 else (val[s2] + low) / 2.0
                elif k1 == k2:
                    out[i, p] = low
                else:
                    out[i, p] = low + (val[s2] - low) * (f - k1)
            slot = slot + 1 if slot + 1 < ring else 0
    return out


def _window(window) -> int:
    if int(window) != window or window < 0:
        raise ValueError(f"window must be an int >= 0, not {window!r}")
    return int(window)


def rolling_idxmax(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, window: int) -> np.ndarray:
    """Qlib ``IdxMax``: pandas ``rolling/expanding(min_periods=1).apply(lambda x: x.argmax() + 1, raw=True)``."""
    return _idx_extreme(x, lo, hi, _window(window), 1.0)


def rolling_idxmin(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, window: int) -> np.ndarray:
    """Qlib ``IdxMin``: pandas ``rolling/expanding(min_periods=1).apply(lambda x: x.argmin() + 1, raw=True)``."""
    return _idx_extreme(x, lo, hi, _window(window), -1.0)


def rolling_mad(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, window: int) -> np.ndarray:
    """Qlib ``Mad``: pandas ``rolling/expanding(min_periods=1).apply(mad, raw=True)``."""
    return _mad(x, lo, hi, _window(window))


def rolling_wma(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, window: int) -> np.ndarray:
    """Qlib ``WMA``: pandas ``rolling/expanding(min_periods=1).apply(weighted_mean, raw=True)``."""
    return _wma(x, lo, hi, _window(window))


def expanding_ema(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Qlib ``EMA(feature, 0)``: pandas ``expanding(min_periods=1).apply(exp_weighted_mean, raw=True)``."""
    out = np.full(x.shape, np.nan)
    longest = int((hi - lo).max()) if len(lo) else 0
    for n in range(1, longest + 1):
        a = 1 - 2 / (1 + n)  # Python float, then numpy's own power and sum: the exact weights
        w = a ** np.arange(n)[::-1]
        w /= w.sum()
        _weighted_nansum_at(x, lo, hi, w, out)
    return out


def rolling_median(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, window: int) -> np.ndarray:
    """Qlib ``Med``: pandas ``rolling/expanding(min_periods=1).median()``."""
    return _order_stat(x, lo, hi, _window(window), 0.5, True)


def rolling_quantile(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, window: int, q: float) -> np.ndarray:
    """Qlib ``Quantile``: pandas ``rolling/expanding(min_periods=1).quantile(q)`` (linear interpolation)."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q} not in [0, 1]")
    if q == 0.0 or q == 1.0:  # pandas itself takes roll_min / roll_max there (the newest of equal extremes)
        return (rolling_max if q == 1.0 else rolling_min)(x, lo, hi, _window(window))
    return _order_stat(x, lo, hi, _window(window), float(q), False)
