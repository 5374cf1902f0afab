"""Rolling/expanding covariance and correlation of two aligned series, bit for bit as pandas 3.1.1.

``x.rolling(N, min_periods=1).cov(y)`` first masks the pair (``X = x + 0 * y``, ``Y = y + 0 * x``: a NaN or inf
on either side is missing on both, and ``-0.0 + 0.0`` is ``0.0``), turns +-inf into NaN, and runs roll_cov /
roll_corr: origin-anchored online co-moments, rebuilt from the window whenever cancellation is suspected.
Window bounds and the rebuild-on-non-overlap rule are those of :mod:`.windows`.
"""

from typing import Any

import numba
import numpy as np
from numba import types

from .moments import INV_COND_TOL, MAX_ORIGIN
from .windows import JIT, nan_output, window_start

# pandas' calc_corr takes ``(ssqdm_x * ssqdm_y) ** 0.5`` through C's pow(), which is not always the correctly
# rounded sqrt (e.g. 5.902893458566169); numba would rewrite ``** 0.5`` into sqrt, so call libm's pow.
c_pow: Any = types.ExternalFunction("pow", types.float64(types.float64, types.float64))  # numba stubs type it as a Type

# state: nobs, mean_x, mean_y, origin_x, origin_y, ssqdm_xy, ssqdm_x, ssqdm_y, peak_x, peak_y, unstable
_N, _MX, _MY, _OX, _OY, _SXY, _SXX, _SYY, _PX, _PY, _UNST = range(11)


@numba.njit(**JIT)
def _masked_pair(x, y, i, lo, hi):
    """Row ``i`` of ``x`` and ``y`` as pandas' kernel sees them after prep_binary and _prep_values."""
    a = x[i, lo:hi] + 0.0 * y[i, lo:hi]
    b = y[i, lo:hi] + 0.0 * x[i, lo:hi]
    for j in range(a.shape[0]):
        if np.isinf(a[j]):
            a[j] = np.nan
        if np.isinf(b[j]):
            b[j] = np.nan
    return a, b


@numba.njit(**JIT)
def _comoment_update(a, b, st, add):
    """pandas' add_cov/add_corr (``add``) or remove_cov/remove_corr of one non-NaN pair."""
    if add:
        st[_N] += 1.0
        if st[_N] == 1.0:
            st[_OX] = a if abs(a) < MAX_ORIGIN else 0.0
            st[_OY] = b if abs(b) < MAX_ORIGIN else 0.0
    sa = a - st[_OX]
    sb = b - st[_OY]
    dx = sa - st[_MX]
    dy = sb - st[_MY]
    if add:
        st[_MX] += dx / st[_N]
        st[_MY] += dy / st[_N]
        st[_SXY] += (sa - st[_MX]) * dy
        st[_SXX] += (sa - st[_MX]) * dx
        st[_SYY] += (sb - st[_MY]) * dy
    else:
        st[_N] -= 1.0
        if st[_N] == 0.0:
            st[:] = 0.0
            return
        st[_MX] -= dx / st[_N]
        st[_MY] -= dy / st[_N]
        st[_SXY] -= (sa - st[_MX]) * dy
        st[_SXX] -= (sa - st[_MX]) * dx
        st[_SYY] -= (sb - st[_MY]) * dy
    dev_x = abs(sa - st[_MX])
    dev_y = abs(sb - st[_MY])
    if dev_x > st[_PX]:
        st[_PX] = dev_x
    if dev_y > st[_PY]:
        st[_PY] = dev_y
    sxy, sxx, syy, px, py = st[_SXY], st[_SXX], st[_SYY], st[_PX], st[_PY]
    if (sxy != sxy or sxx != sxx or syy != syy or px * py * INV_COND_TOL > abs(sxy)
            or px * px * INV_COND_TOL > sxx or py * py * INV_COND_TOL > syy):
        st[_UNST] = 1.0


@numba.njit(**JIT)
def _pair_row(a, b, out, window, corr):
    """roll_cov(ddof=1) (``corr=False``) / roll_corr (``corr=True``) over one row."""
    st = np.zeros(11)
    for j in range(a.shape[0]):
        s = window_start(j, window)
        rebuild = j == 0 or window == 1
        if not rebuild:
            for k in range(window_start(j - 1, window), s):
                if a[k] == a[k] and b[k] == b[k]:
                    _comoment_update(a[k], b[k], st, False)
            if a[j] == a[j] and b[j] == b[j]:
                _comoment_update(a[j], b[j], st, True)
        if rebuild or st[_UNST] != 0.0:
            st[:] = 0.0
            for k in range(s, j + 1):
                if a[k] == a[k] and b[k] == b[k]:
                    _comoment_update(a[k], b[k], st, True)
            st[_UNST] = 0.0
        n = st[_N]
        if n < 1.0:
            out[j] = np.nan
        elif not corr:
            out[j] = st[_SXY] / (n - 1.0) if n > 1.0 else np.nan
        elif st[_SXX] == 0.0 or st[_SYY] == 0.0:
            out[j] = np.nan
        else:
            r = st[_SXY] / c_pow(st[_SXX] * st[_SYY], 0.5)
            out[j] = 1.0 if r > 1.0 else (-1.0 if r < -1.0 else r)


@numba.njit(**JIT)
def rolling_cov(x, y, lo, hi, window):
    """``x.rolling(window, min_periods=1).cov(y)`` (``expanding(min_periods=1).cov(y)`` for window 0)."""
    out = nan_output(x)
    for i in range(x.shape[0]):
        a, b = _masked_pair(x, y, i, lo[i], hi[i])
        _pair_row(a, b, out[i, lo[i]:hi[i]], window, False)
    return out


@numba.njit(**JIT)
def rolling_corr(x, y, lo, hi, window):
    """``x.rolling(window, min_periods=1).corr(y)`` (``expanding(min_periods=1).corr(y)`` for window 0)."""
    out = nan_output(x)
    for i in range(x.shape[0]):
        a, b = _masked_pair(x, y, i, lo[i], hi[i])
        _pair_row(a, b, out[i, lo[i]:hi[i]], window, True)
    return out
