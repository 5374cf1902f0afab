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
def _comoment_step(a, b, n, mx, my, ox, oy, sxy, sxx, syy, px, py, unstable, add):
    """pandas' add_cov/add_corr (``add``) or remove_cov/remove_corr of one non-NaN pair: the state (count,
    means and origins of x and y, co-moments, peak deviations, unstable) in, the new state out."""
    if add:
        n += 1.0
        if n == 1.0:
            ox = a if abs(a) < MAX_ORIGIN else 0.0
            oy = b if abs(b) < MAX_ORIGIN else 0.0
    sa = a - ox
    sb = b - oy
    dx = sa - mx
    dy = sb - my
    if add:
        mx += dx / n
        my += dy / n
        sxy += (sa - mx) * dy
        sxx += (sa - mx) * dx
        syy += (sb - my) * dy
    else:
        n -= 1.0
        if n == 0.0:
            return 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, False
        mx -= dx / n
        my -= dy / n
        sxy -= (sa - mx) * dy
        sxx -= (sa - mx) * dx
        syy -= (sb - my) * dy
    dev_x = abs(sa - mx)
    dev_y = abs(sb - my)
    if dev_x > px:
        px = dev_x
    if dev_y > py:
        py = dev_y
    if (sxy != sxy or sxx != sxx or syy != syy or px * py * INV_COND_TOL > abs(sxy)
            or px * px * INV_COND_TOL > sxx or py * py * INV_COND_TOL > syy):
        unstable = True
    return n, mx, my, ox, oy, sxy, sxx, syy, px, py, unstable


@numba.njit(**JIT)
def _comoment_rebuild(a, b, s, j):
    """pandas' rebuild of the state from the window's pairs ``[s, j]`` (the flag cleared)."""
    n = mx = my = ox = oy = sxy = sxx = syy = px = py = 0.0
    u = False
    for k in range(s, j + 1):
        if a[k] == a[k] and b[k] == b[k]:
            n, mx, my, ox, oy, sxy, sxx, syy, px, py, u = _comoment_step(
                a[k], b[k], n, mx, my, ox, oy, sxy, sxx, syy, px, py, u, True)
    return n, mx, my, ox, oy, sxy, sxx, syy, px, py


@numba.njit(**JIT)
def _pair_value(n, sxy, sxx, syy, corr):
    """cov (ddof=1; NaN below two pairs) or corr (NaN for a zero sum of squares, clipped to [-1, 1])."""
    if n < 1.0:
        return np.nan
    if not corr:
        return sxy / (n - 1.0) if n > 1.0 else np.nan
    if sxx == 0.0 or syy == 0.0:
        return np.nan
    r = sxy / c_pow(sxx * syy, 0.5)
    return 1.0 if r > 1.0 else (-1.0 if r < -1.0 else r)


@numba.njit(**JIT)
def _pair_rows(x, y, lo, hi, window, corr):
    """roll_cov(ddof=1) (``corr=False``) / roll_corr (``corr=True``) of every row pair, two rows at a time.

    Per row, position ``j`` removes the pair leaving a fixed window (``j - window``; none when expanding),
    adds pair ``j``, and rebuilds the state from the window at ``j == 0``, for ``window == 1`` and whenever
    an update flagged cancellation, as pandas. Two rows advance in the same loop, so that the CPU overlaps
    their chains of dependent divisions; each row's arithmetic is exactly its own, in pandas' order."""
    out = nan_output(x)
    rows = x.shape[0]
    for g in range(0, rows, 2):
        aa, ba = _masked_pair(x, y, g, lo[g], hi[g])
        oa = out[g, lo[g]:hi[g]]
        h = g + 1 if g + 1 < rows else g  # an odd last row pairs with an empty row
        if h > g:
            ab, bb = _masked_pair(x, y, h, lo[h], hi[h])
            ob = out[h, lo[h]:hi[h]]
        else:
            ab, bb, ob = aa[:0], ba[:0], oa[:0]
        na = mxa = mya = oxa = oya = sxya = sxxa = syya = pxa = pya = 0.0
        nb = mxb = myb = oxb = oyb = sxyb = sxxb = syyb = pxb = pyb = 0.0
        for j in range(max(aa.shape[0], ab.shape[0])):
            if j < aa.shape[0]:
                ua = False
                k = j - window
                if window > 1 and k >= 0 and aa[k] == aa[k] and ba[k] == ba[k]:
                    na, mxa, mya, oxa, oya, sxya, sxxa, syya, pxa, pya, ua = _comoment_step(
                        aa[k], ba[k], na, mxa, mya, oxa, oya, sxya, sxxa, syya, pxa, pya, ua, False)
                if aa[j] == aa[j] and ba[j] == ba[j]:
                    na, mxa, mya, oxa, oya, sxya, sxxa, syya, pxa, pya, ua = _comoment_step(
                        aa[j], ba[j], na, mxa, mya, oxa, oya, sxya, sxxa, syya, pxa, pya, ua, True)
                if ua or j == 0 or window == 1:
                    na, mxa, mya, oxa, oya, sxya, sxxa, syya, pxa, pya = _comoment_rebuild(
                        aa, ba, window_start(j, window), j)
                oa[j] = _pair_value(na, sxya, sxxa, syya, corr)
            if j < ab.shape[0]:
                ub = False
                k = j - window
                if window > 1 and k >= 0 and ab[k] == ab[k] and bb[k] == bb[k]:
                    nb, mxb, myb, oxb, oyb, sxyb, sxxb, syyb, pxb, pyb, ub = _comoment_step(
                        ab[k], bb[k], nb, mxb, myb, oxb, oyb, sxyb, sxxb, syyb, pxb, pyb, ub, False)
                if ab[j] == ab[j] and bb[j] == bb[j]:
                    nb, mxb, myb, oxb, oyb, sxyb, sxxb, syyb, pxb, pyb, ub = _comoment_step(
                        ab[j], bb[j], nb, mxb, myb, oxb, oyb, sxyb, sxxb, syyb, pxb, pyb, ub, True)
                if ub or j == 0 or window == 1:
                    nb, mxb, myb, oxb, oyb, sxyb, sxxb, syyb, pxb, pyb = _comoment_rebuild(
                        ab, bb, window_start(j, window), j)
                ob[j] = _pair_value(nb, sxyb, sxxb, syyb, corr)
    return out


@numba.njit(**JIT)
def rolling_cov(x, y, lo, hi, window):
    """``x.rolling(window, min_periods=1).cov(y)`` (``expanding(min_periods=1).cov(y)`` for window 0)."""
    return _pair_rows(x, y, lo, hi, window, False)


@numba.njit(**JIT)
def rolling_corr(x, y, lo, hi, window):
    """``x.rolling(window, min_periods=1).corr(y)`` (``expanding(min_periods=1).corr(y)`` for window 0)."""
    return _pair_rows(x, y, lo, hi, window, True)
