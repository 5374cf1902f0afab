"""Qlib's own regression window operators (``Slope``, ``Rsquare``, ``Resi``) for many series at once.

Each kernel is ``rolling_<name>(x, lo, hi, window)`` under the contract of :mod:`qlib_server.engine.kernels`;
``window == 0`` is the expanding form. The values are bit for bit those of Qlib's Cython kernels
(``qlib/data/_libs/rolling.pyx`` for ``window > 0``, ``expanding.pyx`` for ``window == 0``) applied to the
row's slice ``x[i, lo[i]:hi[i]]``: the same running sums, updated in the same order with the same
operations, and the same NaN handling (a NaN value leaves the sums alone and still counts as a position).

Not pandas semantics: ``inf`` is an ordinary value here (Qlib's kernels see it), and a window holding
fewer than two numbers divides by zero (NaN, or +-inf where a rounding residue is left in the sums), as
Qlib does; for ``Resi`` a NaN value gives NaN.
``Rsquare``'s extra masking (``np.isclose(rolling std, 0, atol=2e-05)``, only for ``window > 0``) is the
evaluator's: :func:`rolling_rsquare` equals the Cython function's output before it.
Kernels compile with ``error_model="numpy"`` (IEEE division, as Cython's ``cdivision``).
The rolling sums keep Qlib's C ``int`` arithmetic for ``window * window``: windows above 46340 overflow in
Qlib and are refused here.
"""

from __future__ import annotations

import math

import numba
import numpy as np

_SLOPE, _RSQUARE, _RESI = 0, 1, 2
_MAX_WINDOW = 46340  # window * window must fit Qlib's C int


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _rolling_row(x, lo, hi, window, kind, out):
    """Qlib ``rolling.pyx`` Slope/Rsquare/Resi ``update`` over x[lo:hi] into out[lo:hi]."""
    w = float(window)
    ww = float(window * window)
    na_count = window  # the deque starts full of NaN
    i_sum = 0.0
    x_sum = 0.0
    x2_sum = 0.0
    y_sum = 0.0
    y2_sum = 0.0
    xy_sum = 0.0
    for p in range(lo, hi):
        val = x[p]
        xy_sum = xy_sum - y_sum
        x2_sum = (x2_sum + i_sum) - 2.0 * x_sum
        x_sum = x_sum - i_sum
        front = x[p - window] if p - window >= lo else np.nan
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
        n = float(window - na_count)
        if kind == _RSQUARE:
            r = (n * xy_sum - x_sum * y_sum) / math.sqrt(
                (n * x2_sum - x_sum * x_sum) * (n * y2_sum - y_sum * y_sum))
            out[p] = r * r
        else:
            slope = (n * xy_sum - x_sum * y_sum) / (n * x2_sum - x_sum * x_sum)
            if kind == _SLOPE:
                out[p] = slope
            else:
                interp = y_sum / n - slope * (x_sum / n)
                out[p] = val - (slope * w + interp)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _expanding_row(x, lo, hi, kind, out):
    """Qlib ``expanding.pyx`` Slope/Rsquare/Resi ``update`` over x[lo:hi] into out[lo:hi]."""
    na_count = 0
    x_sum = 0.0
    x2_sum = 0.0
    y_sum = 0.0
    y2_sum = 0.0
    xy_sum = 0.0
    for p in range(lo, hi):
        val = x[p]
        size = p - lo + 1
        s = float(size)
        if math.isnan(val):
            na_count += 1
        else:
            x_sum += s
            x2_sum += float(size * size)
            y_sum += val
            y2_sum += val * val
            xy_sum += s * val
        n = float(size - na_count)
        if kind == _RSQUARE:
            r = (n * xy_sum - x_sum * y_sum) / math.sqrt(
                (n * x2_sum - x_sum * x_sum) * (n * y2_sum - y_sum * y_sum))
            out[p] = r * r
        else:
            slope = (n * xy_sum - x_sum * y_sum) / (n * x2_sum - x_sum * x_sum)
            if kind == _SLOPE:
                out[p] = slope
            else:
                interp = y_sum / n - slope * (x_sum / n)
                out[p] = val - (slope * s + interp)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _regression(x, lo, hi, window, kind):
    """Every row of ``x`` through the rolling (window > 0) or expanding (window == 0) Qlib kernel."""
    out = np.full(x.shape, np.nan)
    for i in range(x.shape[0]):
        if window == 0:
            _expanding_row(x[i], lo[i], hi[i], kind, out[i])
        else:
            _rolling_row(x[i], lo[i], hi[i], window, kind, out[i])
    return out


def _check(window: int) -> int:
    window = int(window)
    if not 0 <= window <= _MAX_WINDOW:
        raise ValueError(f"window {window} outside [0, {_MAX_WINDOW}]")
    return window


def rolling_slope(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, window: int) -> np.ndarray:
    """Qlib ``Slope(feature, window)``: Cython ``rolling_slope`` / ``expanding_slope`` (window 0) per row."""
    return _regression(x, lo, hi, _check(window), _SLOPE)


def rolling_rsquare(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, window: int) -> np.ndarray:
    """Qlib Cython ``rolling_rsquare`` / ``expanding_rsquare`` (window 0) per row, before Rsquare's std mask."""
    return _regression(x, lo, hi, _check(window), _RSQUARE)


def rolling_resi(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, window: int) -> np.ndarray:
    """Qlib ``Resi(feature, window)``: Cython ``rolling_resi`` / ``expanding_resi`` (window 0) per row."""
    return _regression(x, lo, hi, _check(window), _RESI)
