"""Resumable Slope/Rsquare/Resi (Qlib's Cython regressions) and Cov/Corr (pandas' co-moments): the contract of
:mod:`.resumable`, the arithmetic of :mod:`.regression` and :mod:`.pairs`."""

from __future__ import annotations

import math

import numba
import numpy as np

from .pairs import _comoment_rebuild, _comoment_step, _masked_pair, _pair_value
from .regression import _RESI, _RSQUARE, _SLOPE, _check
from .windows import JIT, nan_output, window_start


@numba.njit(**JIT)
def _regression(x, lo, hi, window, kind, j0, jsave, state):
    """Qlib's rolling.pyx (``window > 0``) / expanding.pyx Slope/Rsquare/Resi resumed per row (raw values:
    inf is a value). State: NaN count, then the sums (rolling: i, x, x2, y, y2, xy; expanding: x, x2, y, y2,
    xy and an unused slot)."""
    out = nan_output(x)
    w = float(window)
    ww = float(window * window)
    for i in range(x.shape[0]):
        a, n = lo[i], hi[i] - lo[i]
        if j0[i] >= n:
            continue
        st = state[i]
        if j0[i] == 0:
            na_count = window
            i_sum = x_sum = x2_sum = y_sum = y2_sum = xy_sum = 0.0
        else:
            na_count = int(st[0])
            i_sum, x_sum, x2_sum, y_sum, y2_sum, xy_sum = st[1], st[2], st[3], st[4], st[5], st[6]
        for j in range(j0[i], n + 1):
            if j == jsave[i] or (j == n and jsave[i] > n):
                st[0], st[1], st[2], st[3], st[4], st[5], st[6] = na_count, i_sum, x_sum, x2_sum, y_sum, y2_sum, \
                    xy_sum
            if j == n:
                break
            val = x[i, a + j]
            if window > 0:
                xy_sum = xy_sum - y_sum
                x2_sum = (x2_sum + i_sum) - 2.0 * x_sum
                x_sum = x_sum - i_sum
                front = x[i, a + j - window] if j - window >= 0 else np.nan
                if not math.isnan(front):
                    i_sum -= 1.0
                    y_sum -= front
                    y2_sum -= front * front
                else:
                    na_count -= 1
                if math.isnan(val):
                    na_count += 1
                else:
                    i_sum += 1.0
                    x_sum += w
                    x2_sum += ww
                    y_sum += val
                    y2_sum += val * val
                    xy_sum += w * val
                cnt = float(window - na_count)
                at = w
            else:
                size = j + 1
                at = float(size)
                if math.isnan(val):
                    na_count += 1
                else:
                    x_sum += at
                    x2_sum += float(size * size)
                    y_sum += val
                    y2_sum += val * val
                    xy_sum += at * val
                cnt = float(size - na_count)
            if kind == _RSQUARE:
                r = (cnt * xy_sum - x_sum * y_sum) / math.sqrt(
                    (cnt * x2_sum - x_sum * x_sum) * (cnt * y2_sum - y_sum * y_sum))
                out[i, a + j] = r * r
            else:
                slope = (cnt * xy_sum - x_sum * y_sum) / (cnt * x2_sum - x_sum * x_sum)
                if kind == _SLOPE:
                    out[i, a + j] = slope
                else:
                    interp = y_sum / cnt - slope * (x_sum / cnt)
                    out[i, a + j] = val - (slope * at + interp)
    return out


def resume_slope(x, lo, hi, window, j0, jsave, state):
    """Resumable :func:`.regression.rolling_slope` (state: ``STATE["regression"]``)."""
    return _regression(x, lo, hi, _check(window), _SLOPE, j0, jsave, state)


def resume_rsquare(x, lo, hi, window, j0, jsave, state):
    """Resumable :func:`.regression.rolling_rsquare` (state: ``STATE["regression"]``)."""
    return _regression(x, lo, hi, _check(window), _RSQUARE, j0, jsave, state)


def resume_resi(x, lo, hi, window, j0, jsave, state):
    """Resumable :func:`.regression.rolling_resi` (state: ``STATE["regression"]``)."""
    return _regression(x, lo, hi, _check(window), _RESI, j0, jsave, state)


@numba.njit(**JIT)
def _pairs(x, y, lo, hi, window, j0, jsave, state, corr):
    out = nan_output(x)
    for i in range(x.shape[0]):
        a, n = lo[i], hi[i] - lo[i]
        if j0[i] >= n:
            continue
        p0 = 0 if window <= 0 else max(0, min(j0[i], n) - window)
        va, vb = _masked_pair(x, y, i, a + p0, hi[i])
        st = state[i]
        m, mx, my, ox, oy, sxy, sxx, syy, px, py = st[0], st[1], st[2], st[3], st[4], st[5], st[6], st[7], st[8], \
            st[9]
        for j in range(j0[i], n + 1):
            if j == jsave[i] or (j == n and jsave[i] > n):
                st[0], st[1], st[2], st[3], st[4] = m, mx, my, ox, oy
                st[5], st[6], st[7], st[8], st[9] = sxy, sxx, syy, px, py
            if j == n:
                break
            u = False
            k = j - window - p0
            if window > 1 and j >= window and va[k] == va[k] and vb[k] == vb[k]:
                m, mx, my, ox, oy, sxy, sxx, syy, px, py, u = _comoment_step(
                    va[k], vb[k], m, mx, my, ox, oy, sxy, sxx, syy, px, py, u, False)
            k = j - p0
            if va[k] == va[k] and vb[k] == vb[k]:
                m, mx, my, ox, oy, sxy, sxx, syy, px, py, u = _comoment_step(
                    va[k], vb[k], m, mx, my, ox, oy, sxy, sxx, syy, px, py, u, True)
            if u or j == 0 or window == 1:
                s = window_start(j, window)
                m, mx, my, ox, oy, sxy, sxx, syy, px, py = _comoment_rebuild(
                    va[s - p0:j - p0 + 1], vb[s - p0:j - p0 + 1], 0, j - s)
            out[i, a + j] = _pair_value(m, sxy, sxx, syy, corr)
    return out


@numba.njit(**JIT)
def resume_cov(x, y, lo, hi, window, j0, jsave, state):
    """Resumable :func:`.pairs.rolling_cov` (state: ``STATE["pair"]``)."""
    return _pairs(x, y, lo, hi, window, j0, jsave, state, False)


@numba.njit(**JIT)
def resume_corr(x, y, lo, hi, window, j0, jsave, state):
    """Resumable :func:`.pairs.rolling_corr` (state: ``STATE["pair"]``)."""
    return _pairs(x, y, lo, hi, window, j0, jsave, state, True)
