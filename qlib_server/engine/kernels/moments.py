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


@numba.njit(**JIT)
def _moments_step(val, n, mean, orig, m2, m3, m4, peak, unstable, kurt, add):
    """pandas' add_skew/add_kurt (``add``) or remove_skew/remove_kurt of a non-NaN value (anchored online
    central moments; m4 only for kurt), then track_moment_dev + moment_cancellation_suspected: the state
    (count, shifted mean, origin, m2, m3, m4, peak deviation, unstable) in, the new state out."""
    if add:
        if n == 0:
            orig = val if abs(val) < MAX_ORIGIN else 0.0
        shifted = val - orig
        delta = shifted - mean
        n += 1.0
        delta_n = delta / n
        term1 = delta * delta_n * (n - 1.0)
        if kurt:
            m4 += delta_n * (-4.0 * m3 + delta_n * (6.0 * m2 + term1 * (n * n - 3.0 * n + 3.0)))
        m3 = m3 + delta_n * (term1 * (n - 2.0) - 3.0 * m2)
        m2 = m2 + term1
        mean += delta_n
    else:
        n -= 1.0
        if n == 0:
            return 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, False
        shifted = val - orig
        delta = shifted - mean
        delta_n = delta / n
        term1 = delta_n * delta * (n + 1.0)
        if kurt:
            m4 += delta_n * (4.0 * m3 + delta_n * (6.0 * m2 - term1 * (n * n + 3.0 * n + 3.0)))
        m3 = m3 - delta_n * (term1 * (n + 2.0) - 3.0 * m2)
        m2 = m2 - term1
        mean -= delta_n
    dev = abs(shifted - mean)
    if dev > peak:
        peak = dev
    if (m2 != m2 or m3 != m3 or m4 != m4
            or mean * mean * ANCHOR_DRIFT_LIMIT > m2 or peak * peak * PEAK_DEV_LIMIT > m2):
        unstable = True
    return n, mean, orig, m2, m3, m4, peak, unstable


@numba.njit(**JIT)
def _moments_rebuild(v, s, j, kurt):
    """pandas' rebuild of the skew/kurt state from the window ``v[s:j + 1]`` (the flag cleared)."""
    n = mean = orig = m2 = m3 = m4 = peak = 0.0
    u = False
    for k in range(s, j + 1):
        if v[k] == v[k]:
            n, mean, orig, m2, m3, m4, peak, u = _moments_step(v[k], n, mean, orig, m2, m3, m4, peak, u, kurt, True)
    return n, mean, orig, m2, m3, m4, peak


@numba.njit(**JIT)
def _moments_value(n, m2, m3, m4, kurt):
    """Sample skewness (NaN below 3 values) or excess kurtosis (NaN below 4), pandas' formulas."""
    if not kurt:
        if n < 3:
            return np.nan
        return m3 / (m2 * np.sqrt(m2)) * ((n * np.sqrt(n - 1.0)) / (n - 2.0))
    if n < 4:
        return np.nan
    inner = n * (n + 1.0) * (m4 / (m2 * m2)) - 3.0 * (n - 1.0)
    return (n - 1.0) / ((n - 2.0) * (n - 3.0)) * inner


@numba.njit(**JIT)
def _moments_rows(x, lo, hi, window, kurt):
    """roll_skew (``kurt=False``) / roll_kurt (``kurt=True``) of every row, two rows at a time: the steps,
    rebuilds and interleaving of :func:`_var_rows` (state: count n, mean m, origin o, moments 2-4, peak)."""
    out = nan_output(x)
    rows = x.shape[0]
    for g in range(0, rows, 2):
        va = clean_row(x, g, lo[g], hi[g])
        oa = out[g, lo[g]:hi[g]]
        h = g + 1 if g + 1 < rows else g  # an odd last row pairs with an empty row
        vb = clean_row(x, h, lo[h], hi[h]) if h > g else va[:0]
        ob = out[h, lo[h]:hi[h]] if h > g else oa[:0]
        na = ma = oa_ = a2 = a3 = a4 = pa = 0.0
        nb = mb = ob_ = b2 = b3 = b4 = pb = 0.0
        for j in range(max(va.shape[0], vb.shape[0])):
            if j < va.shape[0]:
                ua = False
                k = j - window
                if window > 1 and k >= 0 and va[k] == va[k]:
                    na, ma, oa_, a2, a3, a4, pa, ua = _moments_step(va[k], na, ma, oa_, a2, a3, a4, pa, ua, kurt, False)
                if va[j] == va[j]:
                    na, ma, oa_, a2, a3, a4, pa, ua = _moments_step(va[j], na, ma, oa_, a2, a3, a4, pa, ua, kurt, True)
                if ua or j == 0 or window == 1:
                    na, ma, oa_, a2, a3, a4, pa = _moments_rebuild(va, window_start(j, window), j, kurt)
                oa[j] = _moments_value(na, a2, a3, a4, kurt)
            if j < vb.shape[0]:
                ub = False
                k = j - window
                if window > 1 and k >= 0 and vb[k] == vb[k]:
                    nb, mb, ob_, b2, b3, b4, pb, ub = _moments_step(vb[k], nb, mb, ob_, b2, b3, b4, pb, ub, kurt, False)
                if vb[j] == vb[j]:
                    nb, mb, ob_, b2, b3, b4, pb, ub = _moments_step(vb[j], nb, mb, ob_, b2, b3, b4, pb, ub, kurt, True)
                if ub or j == 0 or window == 1:
                    nb, mb, ob_, b2, b3, b4, pb = _moments_rebuild(vb, window_start(j, window), j, kurt)
                ob[j] = _moments_value(nb, b2, b3, b4, kurt)
    return out


@numba.njit(**JIT)
def rolling_skew(x, lo, hi, window):
    """``Series.rolling(window, min_periods=1).skew()`` (NaN below 3 observations; window 0: expanding)."""
    return _moments_rows(x, lo, hi, window, False)


@numba.njit(**JIT)
def rolling_kurt(x, lo, hi, window):
    """``Series.rolling(window, min_periods=1).kurt()`` (NaN below 4 observations; window 0: expanding)."""
    return _moments_rows(x, lo, hi, window, True)
