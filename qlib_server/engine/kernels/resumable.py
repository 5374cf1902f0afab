"""The kernels that carry running state from a series' start, made resumable: stop after any position, save the
state, resume later from that state, and get bit for bit what one uninterrupted run gives.

Every kernel here is ``resume_<name>(x, lo, hi, ..., j0, jsave, state)`` and returns a new float64 array shaped
like ``x``, NaN except the positions it computed:

- ``x`` is a C-contiguous float64 *buffer* of shape ``(n, w)``; row ``i``'s series position ``j`` (0 is the
  series' first value) is column ``lo[i] + j``; ``lo[i]`` may be negative (the series started before the
  buffer), ``hi[i]`` is the column after its last value, so the series has ``hi[i] - lo[i]`` values.
- Positions ``j0[i] <= j < hi[i] - lo[i]`` are computed. The kernel reads the series only from position
  ``max(0, j0[i] - TAIL)`` on, where ``TAIL`` is the kernel's look-back (:data:`TAIL`: the window for most,
  0 for ewm and the expanding regressions, the whole series for expanding var/std/sem/skew/kurt, whose rare
  rebuilds re-read the whole window); the buffer must hold those columns.
- ``state[i]`` holds on entry the state after positions ``< j0[i]`` (unused when ``j0[i] == 0``: a series
  starts from nothing), and on return the state after positions ``< jsave[i]`` (``j0[i] <= jsave[i]``;
  a ``jsave`` past the series' end saves the state at its end). Its width is :data:`STATE` of the kernel.

Running ``[0, n)`` in one call therefore equals running ``[0, m)``, then ``[m, n)`` from the state saved at
``m``. The arithmetic is that of the one-shot kernels of :mod:`.windows`, :mod:`.moments`, :mod:`.ewm`,
:mod:`.pairs` and :mod:`.regression` (the same steps, in the same order, on the same floats), one row at a
time.
"""

from __future__ import annotations

import numba
import numpy as np

from .ewm import _ewm_row, ewm_com_from_alpha
from .moments import _moments_rebuild, _moments_step, _moments_value, _var_rebuild, _var_step, _var_value, _zsqrt
from .resumable_pairs import resume_corr as resume_corr
from .resumable_pairs import resume_cov as resume_cov
from .resumable_pairs import resume_resi as resume_resi
from .resumable_pairs import resume_rsquare as resume_rsquare
from .resumable_pairs import resume_slope as resume_slope
from .windows import JIT, clean_row, kahan_add, nan_output, window_start

#: the state width of each kernel family
STATE = {"sum": 7, "var": 6, "moments": 7, "ewm": 3, "regression": 7, "pair": 10}


def tail(family: str, window: int) -> int | None:
    """How many input positions before the resume point a kernel of ``family`` reads (None: all of them)."""
    if family in ("ewm",) or (family == "regression" and window == 0):
        return 0
    if window == 0:
        return 0 if family == "sum" else None
    return window


@numba.njit(**JIT)
def _first(lo, hi, j0, tail_len):
    """The first series position a row's computation reads (None-tail: ``tail_len < 0``, the series' start)."""
    if tail_len < 0:
        return 0
    return max(0, min(j0, hi - lo) - tail_len)


@numba.njit(**JIT)
def _sum_mean_row(v, o, p0, window, mean, j0, jsave, st):
    total, comp_add, comp_rem, prev = st[0], st[1], st[2], st[3]
    nobs, neg, same = int(st[4]), int(st[5]), int(st[6])
    n = v.shape[0] + p0
    for j in range(j0, n + 1):
        if j == jsave or (j == n and jsave > n):
            st[0], st[1], st[2], st[3] = total, comp_add, comp_rem, prev
            st[4], st[5], st[6] = nobs, neg, same
        if j == n:
            break
        s = window_start(j, window)
        if j == 0 or window == 1:
            total = comp_add = comp_rem = 0.0
            nobs = neg = same = 0
            prev = v[s - p0]
            first = s
        else:
            first = j
            for k in range(window_start(j - 1, window), s):
                val = v[k - p0]
                if val == val:
                    nobs -= 1
                    total, comp_rem = kahan_add(-val, total, comp_rem)
                    if np.signbit(val):
                        neg -= 1
        for k in range(first, j + 1):
            val = v[k - p0]
            if val == val:
                nobs += 1
                total, comp_add = kahan_add(val, total, comp_add)
                if np.signbit(val):
                    neg += 1
                same = same + 1 if val == prev else 1
                prev = val
        if nobs == 0:
            o[j - p0] = np.nan
        elif not mean:
            o[j - p0] = prev * nobs if same >= nobs else total
        else:
            r = total / nobs
            if same >= nobs:
                r = prev
            elif neg == 0 and r < 0:
                r = 0.0
            elif neg == nobs and r > 0:
                r = 0.0
            o[j - p0] = r


@numba.njit(**JIT)
def _sum_mean(x, lo, hi, window, j0, jsave, state, mean):
    out = nan_output(x)
    for i in range(x.shape[0]):
        if j0[i] >= hi[i] - lo[i]:
            continue
        p0 = _first(lo[i], hi[i], j0[i], 0 if window == 0 else window)
        _sum_mean_row(clean_row(x, i, lo[i] + p0, hi[i]), out[i, lo[i] + p0:hi[i]], p0, window, mean,
                      j0[i], jsave[i], state[i])
    return out


@numba.njit(**JIT)
def resume_sum(x, lo, hi, window, j0, jsave, state):
    """Resumable :func:`.windows.rolling_sum` (state: :data:`STATE` ``["sum"]``)."""
    return _sum_mean(x, lo, hi, window, j0, jsave, state, False)


@numba.njit(**JIT)
def resume_mean(x, lo, hi, window, j0, jsave, state):
    """Resumable :func:`.windows.rolling_mean` (state: :data:`STATE` ``["sum"]``)."""
    return _sum_mean(x, lo, hi, window, j0, jsave, state, True)


@numba.njit(**JIT)
def _var(x, lo, hi, window, j0, jsave, state, root, sem):
    """roll_var (``root``: std; ``sem``: std / sqrt(count), the count over the raw values) resumed per row."""
    out = nan_output(x)
    for i in range(x.shape[0]):
        a, n = lo[i], hi[i] - lo[i]
        if j0[i] >= n:
            continue
        p0 = _first(a, hi[i], j0[i], window if window > 0 else -1)
        v = clean_row(x, i, a + p0, hi[i])
        st = state[i]
        na, ma, sa, ca, ra, c = st[0], st[1], st[2], st[3], st[4], int(st[5])
        for j in range(j0[i], n + 1):
            if j == jsave[i] or (j == n and jsave[i] > n):
                st[0], st[1], st[2], st[3], st[4], st[5] = na, ma, sa, ca, ra, c
            if j == n:
                break
            u = False
            k = j - window - p0
            if window > 1 and j >= window and v[k] == v[k]:
                na, ma, sa, ra, u = _var_step(v[k], na, ma, sa, ra, u, -1.0)
            if v[j - p0] == v[j - p0]:
                na, ma, sa, ca, u = _var_step(v[j - p0], na, ma, sa, ca, u, 1.0)
            if u or j == 0 or window == 1:
                s = window_start(j, window)
                na, ma, sa, ca, ra = _var_rebuild(v[s - p0:j - p0 + 1], 0, j - s)
            value = _var_value(na, sa, root or sem)
            if sem:  # rolling_sem's count: non-NaN raw values (inf counts)
                raw = x[i, a + j]
                if raw == raw:
                    c += 1
                if window > 0 and j - window >= 0 and x[i, a + j - window] == x[i, a + j - window]:
                    c -= 1
                value = _zsqrt(_var_value(na, sa, False)) / np.sqrt(float(c))
            out[i, a + j] = value
    return out


@numba.njit(**JIT)
def resume_var(x, lo, hi, window, j0, jsave, state):
    """Resumable :func:`.moments.rolling_var` (state: :data:`STATE` ``["var"]``)."""
    return _var(x, lo, hi, window, j0, jsave, state, False, False)


@numba.njit(**JIT)
def resume_std(x, lo, hi, window, j0, jsave, state):
    """Resumable :func:`.moments.rolling_std` (state: :data:`STATE` ``["var"]``)."""
    return _var(x, lo, hi, window, j0, jsave, state, True, False)


@numba.njit(**JIT)
def resume_sem(x, lo, hi, window, j0, jsave, state):
    """Resumable :func:`.moments.rolling_sem` (state: :data:`STATE` ``["var"]``, the count in its last slot)."""
    return _var(x, lo, hi, window, j0, jsave, state, False, True)


@numba.njit(**JIT)
def _moments(x, lo, hi, window, j0, jsave, state, kurt):
    out = nan_output(x)
    for i in range(x.shape[0]):
        a, n = lo[i], hi[i] - lo[i]
        if j0[i] >= n:
            continue
        p0 = _first(a, hi[i], j0[i], window if window > 0 else -1)
        v = clean_row(x, i, a + p0, hi[i])
        st = state[i]
        m, mean, orig, m2, m3, m4, peak = st[0], st[1], st[2], st[3], st[4], st[5], st[6]
        for j in range(j0[i], n + 1):
            if j == jsave[i] or (j == n and jsave[i] > n):
                st[0], st[1], st[2], st[3], st[4], st[5], st[6] = m, mean, orig, m2, m3, m4, peak
            if j == n:
                break
            u = False
            k = j - window - p0
            if window > 1 and j >= window and v[k] == v[k]:
                m, mean, orig, m2, m3, m4, peak, u = _moments_step(v[k], m, mean, orig, m2, m3, m4, peak, u, kurt,
                                                                   False)
            if v[j - p0] == v[j - p0]:
                m, mean, orig, m2, m3, m4, peak, u = _moments_step(v[j - p0], m, mean, orig, m2, m3, m4, peak, u,
                                                                   kurt, True)
            if u or j == 0 or window == 1:
                s = window_start(j, window)
                m, mean, orig, m2, m3, m4, peak = _moments_rebuild(v[s - p0:j - p0 + 1], 0, j - s, kurt)
            out[i, a + j] = _moments_value(m, m2, m3, m4, kurt)
    return out


@numba.njit(**JIT)
def resume_skew(x, lo, hi, window, j0, jsave, state):
    """Resumable :func:`.moments.rolling_skew` (state: :data:`STATE` ``["moments"]``)."""
    return _moments(x, lo, hi, window, j0, jsave, state, False)


@numba.njit(**JIT)
def resume_kurt(x, lo, hi, window, j0, jsave, state):
    """Resumable :func:`.moments.rolling_kurt` (state: :data:`STATE` ``["moments"]``)."""
    return _moments(x, lo, hi, window, j0, jsave, state, True)


@numba.njit(**JIT)
def resume_ewm_com(x, lo, hi, com, j0, jsave, state):
    """Resumable :func:`.ewm.ewm_mean_com` (state: :data:`STATE` ``["ewm"]``: weighted mean, count, old weight)."""
    out = nan_output(x)
    for i in range(x.shape[0]):
        if j0[i] < hi[i] - lo[i]:
            _ewm_row(clean_row(x, i, lo[i] + j0[i], hi[i]), out[i, lo[i] + j0[i]:hi[i]], j0[i], com, jsave[i],
                    state[i])
    return out


def resume_ewm(x, lo, hi, alpha, j0, jsave, state):
    """Resumable :func:`.ewm.ewm_mean` (``ewm(alpha=alpha, min_periods=1).mean()``)."""
    return resume_ewm_com(x, lo, hi, ewm_com_from_alpha(alpha), j0, jsave, state)
