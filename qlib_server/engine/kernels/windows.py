"""Rolling/expanding sum, mean, count, min, max and rank, bit for bit as pandas' Cython window kernels.

Every public kernel keeps the contract of :mod:`qlib_server.engine.kernels` and re-creates, per row, the
arithmetic of ``pandas/_libs/window/aggregations.pyx`` (pandas 3.1.1) for ``min_periods=1`` windows:
window ``j`` of a row is ``[max(0, j - window + 1), j + 1)`` (``[0, j + 1)`` when ``window == 0``), the
state is updated incrementally (values leaving, then the value entering) and rebuilt from scratch whenever
the new window does not overlap the previous one (only ``window == 1``), exactly as pandas does.

Like pandas' ``_prep_values``, +-inf is NaN for every kernel but ``count`` (``notna`` counts inf).
"""

from typing import Any

import numba
import numpy as np

JIT: dict[str, Any] = dict(cache=True, nogil=True, error_model="numpy")  # IEEE division by zero, no fastmath (no FMA)


@numba.njit(**JIT)
def nan_output(x):
    """A float64 array shaped like ``x``, all NaN."""
    return np.full(x.shape, np.nan)


@numba.njit(**JIT)
def clean_row(x, i, lo, hi):
    """Row ``i``'s series ``x[i, lo:hi]`` as pandas' kernels see it: a float64 copy with +-inf turned NaN."""
    v = x[i, lo:hi].copy()
    for j in range(v.shape[0]):
        if np.isinf(v[j]):
            v[j] = np.nan
    return v


@numba.njit(**JIT)
def window_start(j, window):
    """First position of window ``j`` (pandas' FixedWindowIndexer / ExpandingIndexer start)."""
    if window == 0:
        return 0
    return max(0, j - window + 1)


@numba.njit(**JIT)
def kahan_add(val, total, comp):
    """One Kahan step of pandas' add_sum/add_mean (remove is ``kahan_add(-val, ...)``)."""
    y = val - comp
    t = total + y
    return t, t - total - y


@numba.njit(**JIT)
def _sum_mean_row(v, out, window, mean):
    """roll_sum (``mean=False``) / roll_mean (``mean=True``) over one row."""
    total = comp_add = comp_rem = prev = 0.0
    nobs = neg = same = 0
    for j in range(v.shape[0]):
        s = window_start(j, window)
        if j == 0 or window == 1:
            total = comp_add = comp_rem = 0.0
            nobs = neg = same = 0
            prev = v[s]
            first = s
        else:
            first = j
            for k in range(window_start(j - 1, window), s):
                val = v[k]
                if val == val:
                    nobs -= 1
                    total, comp_rem = kahan_add(-val, total, comp_rem)
                    if np.signbit(val):
                        neg -= 1
        for k in range(first, j + 1):
            val = v[k]
            if val == val:
                nobs += 1
                total, comp_add = kahan_add(val, total, comp_add)
                if np.signbit(val):
                    neg += 1
                same = same + 1 if val == prev else 1
                prev = val
        if nobs == 0:
            out[j] = np.nan
        elif not mean:
            out[j] = prev * nobs if same >= nobs else total
        else:
            r = total / nobs
            if same >= nobs:
                r = prev
            elif neg == 0 and r < 0:
                r = 0.0
            elif neg == nobs and r > 0:
                r = 0.0
            out[j] = r


@numba.njit(**JIT)
def rolling_sum(x, lo, hi, window):
    """``Series.rolling(window, min_periods=1).sum()`` (``expanding(min_periods=1).sum()`` for window 0)."""
    out = nan_output(x)
    for i in range(x.shape[0]):
        _sum_mean_row(clean_row(x, i, lo[i], hi[i]), out[i, lo[i]:hi[i]], window, False)
    return out


@numba.njit(**JIT)
def rolling_mean(x, lo, hi, window):
    """``Series.rolling(window, min_periods=1).mean()`` (``expanding(min_periods=1).mean()`` for window 0)."""
    out = nan_output(x)
    for i in range(x.shape[0]):
        _sum_mean_row(clean_row(x, i, lo[i], hi[i]), out[i, lo[i]:hi[i]], window, True)
    return out


@numba.njit(**JIT)
def rolling_count(x, lo, hi, window):
    """``Series.rolling(window, min_periods=1).count()``: non-NaN values (inf counts), 0.0 when none."""
    out = nan_output(x)
    for i in range(x.shape[0]):
        c = 0
        for j in range(lo[i], hi[i]):
            if x[i, j] == x[i, j]:
                c += 1
            if window > 0 and j - window >= lo[i] and x[i, j - window] == x[i, j - window]:
                c -= 1
            out[i, j] = c
    return out


@numba.njit(**JIT)
def _min_max_row(v, out, window, is_max):
    """roll_max/roll_min over one row: a monotonic deque of candidate positions; among equal extremes
    (0.0 and -0.0) the latest wins, as in pandas."""
    q = np.empty(v.shape[0], dtype=np.int64)
    head = tail = 0
    for j in range(v.shape[0]):
        s = window_start(j, window)
        val = v[j]
        if val == val:
            while tail > head and ((val >= v[q[tail - 1]]) if is_max else (val <= v[q[tail - 1]])):
                tail -= 1
            q[tail] = j
            tail += 1
        while tail > head and q[head] < s:
            head += 1
        out[j] = v[q[head]] if tail > head else np.nan


@numba.njit(**JIT)
def rolling_max(x, lo, hi, window):
    """``Series.rolling(window, min_periods=1).max()`` (``expanding(min_periods=1).max()`` for window 0)."""
    out = nan_output(x)
    for i in range(x.shape[0]):
        _min_max_row(clean_row(x, i, lo[i], hi[i]), out[i, lo[i]:hi[i]], window, True)
    return out


@numba.njit(**JIT)
def rolling_min(x, lo, hi, window):
    """``Series.rolling(window, min_periods=1).min()`` (``expanding(min_periods=1).min()`` for window 0)."""
    out = nan_output(x)
    for i in range(x.shape[0]):
        _min_max_row(clean_row(x, i, lo[i], hi[i]), out[i, lo[i]:hi[i]], window, False)
    return out


@numba.njit(**JIT)
def _rank_row(v, out, window, pct):
    """roll_rank(method='average', ascending) over one row: the rank of the window's last value among the
    window's non-NaN values, ``(min_rank + max_rank) / 2`` (pandas' skiplist formula is exact), NaN when that
    value is NaN; ``pct`` divides by the window's non-NaN count."""
    nobs = 0  # the window's non-NaN values
    for j in range(v.shape[0]):
        val = v[j]
        s = window_start(j, window)
        nobs += val == val
        if j > 0 and s > window_start(j - 1, window):  # the value leaving (one: windows move by one)
            nobs -= v[s - 1] == v[s - 1]
        if val != val:
            continue
        below = 0
        upto = 0  # values <= val
        for k in range(s, j + 1):  # branch-free counts (NaN compares false)
            w = v[k]
            below += w < val
            upto += w <= val
        equal = upto - below
        rank_max = float(below + equal)
        rank_min = float(below + 1)
        rank = (rank_max * (rank_max + 1) / 2 - (rank_min - 1) * rank_min / 2) / (rank_max - rank_min + 1)
        out[j] = rank / nobs if pct else rank


@numba.njit(**JIT)
def rolling_rank(x, lo, hi, window):
    """``Series.rolling(window, min_periods=1).rank()`` (method='average', ascending, pct=False)."""
    out = nan_output(x)
    for i in range(x.shape[0]):
        _rank_row(clean_row(x, i, lo[i], hi[i]), out[i, lo[i]:hi[i]], window, False)
    return out


@numba.njit(**JIT)
def rolling_rank_pct(x, lo, hi, window):
    """``Series.rolling(window, min_periods=1).rank(pct=True)`` (method='average', ascending): Qlib's Rank."""
    out = nan_output(x)
    for i in range(x.shape[0]):
        _rank_row(clean_row(x, i, lo[i], hi[i]), out[i, lo[i]:hi[i]], window, True)
    return out
