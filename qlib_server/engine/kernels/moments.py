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

# var state: nobs, mean, ssqdm, compensation_add, compensation_remove, unstable
_N, _MEAN, _SSQ, _CADD, _CREM, _UNST = range(6)


@numba.njit(**JIT)
def _var_update(val, st, comp, sign):
    """pandas' add_var (``sign=1``) / remove_var (``sign=-1``) of a non-NaN value, Welford with Kahan."""
    prev_m2 = st[_SSQ]
    st[_N] += sign
    if st[_N] == 0:
        st[_MEAN] = 0.0
        st[_SSQ] = 0.0
        st[_UNST] = 0.0
        return
    mean = st[_MEAN]
    prev_mean = mean - st[comp]
    y = val - st[comp]
    t = y - mean
    st[comp] = t + mean - y
    if sign > 0:
        st[_MEAN] = mean + t / st[_N]
        st[_SSQ] = st[_SSQ] + (val - prev_mean) * (val - st[_MEAN])
    else:
        st[_MEAN] = mean - t / st[_N]
        st[_SSQ] = st[_SSQ] - (val - prev_mean) * (val - st[_MEAN])
    if prev_m2 * INV_COND_TOL > st[_SSQ]:
        st[_UNST] = 1.0


@numba.njit(**JIT)
def _var_row(v, out, window):
    """roll_var(ddof=1) over one row: the sample variance, NaN below two observations."""
    st = np.zeros(6)
    for j in range(v.shape[0]):
        s = window_start(j, window)
        rebuild = j == 0 or window == 1
        if not rebuild:
            for k in range(window_start(j - 1, window), s):
                if v[k] == v[k]:
                    _var_update(v[k], st, _CREM, -1.0)
            if v[j] == v[j]:
                _var_update(v[j], st, _CADD, 1.0)
        if rebuild or st[_UNST] != 0.0:
            st[:] = 0.0
            for k in range(s, j + 1):
                if v[k] == v[k]:
                    _var_update(v[k], st, _CADD, 1.0)
            st[_UNST] = 0.0
        out[j] = st[_SSQ] / (st[_N] - 1.0) if st[_N] > 1.0 else np.nan


@numba.njit(**JIT)
def rolling_var(x, lo, hi, window):
    """``Series.rolling(window, min_periods=1).var()`` (``expanding(min_periods=1).var()`` for window 0)."""
    out = nan_output(x)
    for i in range(x.shape[0]):
        _var_row(clean_row(x, i, lo[i], hi[i]), out[i, lo[i]:hi[i]], window)
    return out


@numba.njit(**JIT)
def _zsqrt(var):
    """pandas' zsqrt: sqrt, 0 for a negative variance (NaN stays NaN)."""
    return 0.0 if var < 0 else np.sqrt(var)


@numba.njit(**JIT)
def rolling_std(x, lo, hi, window):
    """``Series.rolling(window, min_periods=1).std()`` (``expanding(min_periods=1).std()`` for window 0)."""
    out = rolling_var(x, lo, hi, window)
    for i in range(x.shape[0]):
        for j in range(lo[i], hi[i]):
            out[i, j] = _zsqrt(out[i, j])
    return out


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
