"""Rolling/expanding var, std, sem, skew and kurt, bit for bit as pandas' Cython window kernels (3.1.1).

Windows, incremental updates and the rebuild rule are those of :mod:`.windows`; in addition pandas rebuilds
the state from the window's values whenever an update looks like catastrophic cancellation (var: the sum
of squared deviations shrank by more than ``InvCondTol``; skew/kurt: ``moment_cancellation_suspected``),
and these kernels take the same decisions on the same floats.
"""

import numba
import numpy as np

from .windows import JIT, clean_row, nan_output, window_start

EPS = float(np.finfo(np.float64).eps)
INV_COND_TOL = EPS * 1e3  # pandas' InvCondTol
PEAK_DEV_LIMIT = EPS / INV_COND_TOL
ANCHOR_DRIFT_LIMIT = 1.0 / 16.0
MAX_ORIGIN = float(np.sqrt(np.finfo(np.float64).max))  # pandas' MaxOriginMagnitude

@numba.njit(**JIT)
def _zsqrt(var):
    """pandas' zsqrt: sqrt, 0 for a negative variance (NaN stays NaN)."""
    return 0.0 if var < 0 else np.sqrt(var)


@numba.njit(**JIT)
def _var_step(val, n, mean, ssq, comp, unstable, sign):
    """pandas' add_var (``sign=1``) / remove_var (``sign=-1``) of a non-NaN value, Welford with Kahan: the
    state (count, mean, sum of squared deviations, the side's compensation, unstable) in, the new state out."""
    prev_m2 = ssq
    n += sign
    if n == 0:
        return n, 0.0, 0.0, comp, False
    prev_mean = mean - comp
    y = val - comp
    t = y - mean
    comp = t + mean - y
    if sign > 0:
        mean = mean + t / n
        ssq = ssq + (val - prev_mean) * (val - mean)
    else:
        mean = mean - t / n
        ssq = ssq - (val - prev_mean) * (val - mean)
    if prev_m2 * INV_COND_TOL > ssq:
        unstable = True
    return n, mean, ssq, comp, unstable


@numba.njit(**JIT)
def _var_rebuild(v, s, j):
    """pandas' rebuild of the var state from the window ``v[s:j + 1]`` (compensations start from 0)."""
    n = mean = ssq = cadd = 0.0
    unstable = False
    for k in range(s, j + 1):
        if v[k] == v[k]:
            n, mean, ssq, cadd, unstable = _var_step(v[k], n, mean, ssq, cadd, unstable, 1.0)
    return n, mean, ssq, cadd, 0.0


@numba.njit(**JIT)
def _var_value(n, ssq, root):
    """The sample variance (ddof=1; NaN below two observations), or its zsqrt (the std) when ``root``."""
    var = ssq / (n - 1.0) if n > 1.0 else np.nan
    return _zsqrt(var) if root else var


@numba.njit(**JIT)
def _var_rows(x, lo, hi, window, root):
    """roll_var(ddof=1) (``root``: its zsqrt, the std) of every row, two rows at a time.

    Per row, position ``j`` removes the value leaving a fixed window (``j - window``; none when expanding),
    adds ``v[j]``, and rebuilds the state from the window at ``j == 0``, for ``window == 1`` (no overlap) and
    whenever an update flagged cancellation, as pandas. A row's updates are a chain of dependent divisions,
    so two rows advance in the same loop for the CPU to overlap their chains; each row's arithmetic is
    exactly its own (the state is in local variables, updated in pandas' order)."""
    out = nan_output(x)
    rows = x.shape[0]
    for g in range(0, rows, 2):
        va = clean_row(x, g, lo[g], hi[g])
        oa = out[g, lo[g]:hi[g]]
        h = g + 1 if g + 1 < rows else g  # an odd last row pairs with itself, as an empty row
        vb = clean_row(x, h, lo[h], hi[h]) if h > g else va[:0]
        ob = out[h, lo[h]:hi[h]] if h > g else oa[:0]
        na = ma = sa = ca = ra = 0.0
        nb = mb = sb = cb = rb = 0.0
        for j in range(max(va.shape[0], vb.shape[0])):
            if j < va.shape[0]:
                ua = False
                if window > 1 and j >= window and va[j - window] == va[j - window]:
                    na, ma, sa, ra, ua = _var_step(va[j - window], na, ma, sa, ra, ua, -1.0)
                if va[j] == va[j]:
                    na, ma, sa, ca, ua = _var_step(va[j], na, ma, sa, ca, ua, 1.0)
                if ua or j == 0 or window == 1:
                    na, ma, sa, ca, ra = _var_rebuild(va, window_start(j, window), j)
                oa[j] = _var_value(na, sa, root)
            if j < vb.shape[0]:
                ub = False
                if window > 1 and j >= window and vb[j - window] == vb[j - window]:
                    nb, mb, sb, rb, ub = _var_step(vb[j - window], nb, mb, sb, rb, ub, -1.0)
                if vb[j] == vb[j]:
                    nb, mb, sb, cb, ub = _var_step(vb[j], nb, mb, sb, cb, ub, 1.0)
                if ub or j == 0 or window == 1:
                    nb, mb, sb, cb, rb = _var_rebuild(vb, window_start(j, window), j)
                ob[j] = _var_value(nb, sb, root)
    return out


@numba.njit(**JIT)
def rolling_var(x, lo, hi, window):
    """``Series.rolling(window, min_periods=1).var()`` (``expanding(min_periods=1).var()`` for window 0)."""
    return _var_rows(x, lo, hi, window, False)


@numba.njit(**JIT)
def rolling_std(x, lo, hi, window):
    """``Series.rolling(window, min_periods=1).std()`` (``expanding(min_periods=1).std()`` for window 0)."""
    return _var_rows(x, lo, hi, window, True)


@numba.njit(**JIT)
def rolling_sem(x, lo, hi, window):
    """``Series.rolling(window, min_periods=1).sem()`` = std / count ** 0.5 (count counts inf, std does not)."""
    out = rolling_var(x, lo, hi, window)
    for i in range(x.shape[0]):
        c = 0
        for j in range(lo[i], hi[i]):
            if x[i, j] == x[i, j]:
                c += 1
            if window > 0 and j - window >= lo[i] and x[i, j - window] == x[i, j - window]:
                c -= 1
            out[i, j] = _zsqrt(out[i, j]) / np.sqrt(float(c))
    return out


# skew/kurt state: nobs, mean, origin, m2, m3, m4, peak_dev, unstable
_MN, _MMEAN, _ORIG, _M2, _M3, _M4, _PEAK, _MUNST = range(8)


@numba.njit(**JIT)
def _moments_add(val, st, kurt):
    """pandas' add_skew/add_kurt of a non-NaN value: anchored online central moments."""
    if st[_MN] == 0:
        st[_ORIG] = val if abs(val) < MAX_ORIGIN else 0.0
    shifted = val - st[_ORIG]
    delta = shifted - st[_MMEAN]
    st[_MN] += 1.0
    n = st[_MN]
    delta_n = delta / n
    term1 = delta * delta_n * (n - 1.0)
    m2 = st[_M2]
    m3 = st[_M3]
    if kurt:
        st[_M4] += delta_n * (-4.0 * m3 + delta_n * (6.0 * m2 + term1 * (n * n - 3.0 * n + 3.0)))
    st[_M3] = m3 + delta_n * (term1 * (n - 2.0) - 3.0 * m2)
    st[_M2] = m2 + term1
    st[_MMEAN] += delta_n
    _moments_check(shifted, st)


@numba.njit(**JIT)
def _moments_remove(val, st, kurt):
    """pandas' remove_skew/remove_kurt of a non-NaN value."""
    st[_MN] -= 1.0
    if st[_MN] == 0:
        st[:] = 0.0
        return
    shifted = val - st[_ORIG]
    n = st[_MN]
    delta = shifted - st[_MMEAN]
    delta_n = delta / n
    term1 = delta_n * delta * (n + 1.0)
    m2 = st[_M2]
    m3 = st[_M3]
    if kurt:
        st[_M4] += delta_n * (4.0 * m3 + delta_n * (6.0 * m2 - term1 * (n * n + 3.0 * n + 3.0)))
    st[_M3] = m3 - delta_n * (term1 * (n + 2.0) - 3.0 * m2)
    st[_M2] = m2 - term1
    st[_MMEAN] -= delta_n
    _moments_check(shifted, st)


@numba.njit(**JIT)
def _moments_check(shifted, st):
    """pandas' track_moment_dev + moment_cancellation_suspected: flag the state for a rebuild."""
    dev = abs(shifted - st[_MMEAN])
    if dev > st[_PEAK]:
        st[_PEAK] = dev
    mean, m2, peak = st[_MMEAN], st[_M2], st[_PEAK]
    if (m2 != m2 or st[_M3] != st[_M3] or st[_M4] != st[_M4]
            or mean * mean * ANCHOR_DRIFT_LIMIT > m2 or peak * peak * PEAK_DEV_LIMIT > m2):
        st[_MUNST] = 1.0


@numba.njit(**JIT)
def _moments_row(v, out, window, kurt):
    """roll_skew (``kurt=False``) / roll_kurt (``kurt=True``) over one row."""
    st = np.zeros(8)
    for j in range(v.shape[0]):
        s = window_start(j, window)
        rebuild = j == 0 or window == 1
        if not rebuild:
            for k in range(window_start(j - 1, window), s):
                if v[k] == v[k]:
                    _moments_remove(v[k], st, kurt)
            if v[j] == v[j]:
                _moments_add(v[j], st, kurt)
        if rebuild or st[_MUNST] != 0.0:
            st[:] = 0.0
            for k in range(s, j + 1):
                if v[k] == v[k]:
                    _moments_add(v[k], st, kurt)
            st[_MUNST] = 0.0
        n, m2 = st[_MN], st[_M2]
        if not kurt:
            if n < 3:
                out[j] = np.nan
            else:
                out[j] = st[_M3] / (m2 * np.sqrt(m2)) * ((n * np.sqrt(n - 1.0)) / (n - 2.0))
        elif n < 4:
            out[j] = np.nan
        else:
            inner = n * (n + 1.0) * (st[_M4] / (m2 * m2)) - 3.0 * (n - 1.0)
            out[j] = (n - 1.0) / ((n - 2.0) * (n - 3.0)) * inner


@numba.njit(**JIT)
def rolling_skew(x, lo, hi, window):
    """``Series.rolling(window, min_periods=1).skew()`` (NaN below 3 observations; window 0: expanding)."""
    out = nan_output(x)
    for i in range(x.shape[0]):
        _moments_row(clean_row(x, i, lo[i], hi[i]), out[i, lo[i]:hi[i]], window, False)
    return out


@numba.njit(**JIT)
def rolling_kurt(x, lo, hi, window):
    """``Series.rolling(window, min_periods=1).kurt()`` (NaN below 4 observations; window 0: expanding)."""
    out = nan_output(x)
    for i in range(x.shape[0]):
        _moments_row(clean_row(x, i, lo[i], hi[i]), out[i, lo[i]:hi[i]], window, True)
    return out
