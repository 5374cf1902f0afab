"""Exponentially weighted mean, bit for bit as pandas' Cython ``ewm`` kernel (3.1.1).

pandas turns every parametrisation into a centre of mass first (``span``: ``(span - 1) / 2``; ``alpha``:
``(1 - alpha) / alpha``) and its kernel then uses ``alpha = 1 / (1 + com)`` and ``1 - alpha``. The alpha of
``ewm(alpha=a)`` is therefore not always ``a`` to the last bit, but the weights ``1 - alpha`` that the
recursion multiplies by are: ``ewm(alpha=ewm_span_alpha(N))`` equals ``ewm(span=N)`` bit for bit (tested
for every N up to 10**5).
"""

import numba
import numpy as np

from .windows import JIT, clean_row, nan_output


def ewm_com_from_alpha(alpha):
    """The centre of mass pandas derives from ``ewm(alpha=alpha)``."""
    alpha = float(alpha)
    if not 0.0 < alpha <= 1.0:
        raise ValueError("alpha must satisfy: 0 < alpha <= 1")
    return (1 - alpha) / alpha


def ewm_com_from_span(span):
    """The centre of mass pandas derives from ``ewm(span=span)``."""
    if span < 1:
        raise ValueError("span must satisfy: span >= 1")
    return float((span - 1) / 2)


def ewm_span_alpha(span):
    """The smoothing factor pandas' kernel uses for ``ewm(span=span)``: ``1 / (1 + (span - 1) / 2)``."""
    return 1.0 / (1.0 + ewm_com_from_span(span))


@numba.njit(**JIT)
def _ewm_row(v, out, p0, com, jsave, state):
    """pandas' ewm(adjust=True, ignore_na=False, normalize=True, minp=1) over one row from position ``p0`` on,
    resumable: ``v`` (the cleaned values) and ``out`` start at position ``p0``; the state (weighted mean, count,
    old weight) starts from nothing at ``p0 == 0``, else from ``state``, and the state after positions
    ``< jsave`` is saved to it (a ``jsave`` past the row: its end; negative: never)."""
    alpha = 1.0 / (1.0 + com)
    old_wt_factor = 1.0 - alpha
    new_wt = 1.0
    n = v.shape[0] + p0
    if v.shape[0] == 0:
        return
    if p0 == 0:
        weighted = v[0]
        nobs = 1 if weighted == weighted else 0
        out[0] = weighted if nobs >= 1 else np.nan
        old_wt = 1.0
        begin = 1
    else:
        weighted, nobs, old_wt = state[0], int(state[1]), state[2]
        begin = p0
    for j in range(begin, n):
        if j == jsave:
            state[0], state[1], state[2] = weighted, nobs, old_wt
        cur = v[j - p0]
        observed = cur == cur
        if observed:
            nobs += 1
        if weighted == weighted:
            old_wt *= old_wt_factor
            if observed:
                if weighted != cur:
                    weighted = old_wt * weighted + new_wt * cur
                    weighted /= old_wt + new_wt
                old_wt += new_wt
        elif observed:
            weighted = cur
        out[j - p0] = weighted if nobs >= 1 else np.nan
    if jsave >= n:
        state[0], state[1], state[2] = weighted, nobs, old_wt


@numba.njit(**JIT)
def ewm_mean_com(x, lo, hi, com):
    """``Series.ewm(com=com, min_periods=1).mean()`` (adjust=True, ignore_na=False)."""
    out = nan_output(x)
    state = np.zeros(3)  # every row runs from position 0 and saves nothing
    for i in range(x.shape[0]):
        _ewm_row(clean_row(x, i, lo[i], hi[i]), out[i, lo[i]:hi[i]], 0, com, -1, state)
    return out


def ewm_mean(x, lo, hi, alpha):
    """``Series.ewm(alpha=alpha, min_periods=1).mean()`` (adjust=True, ignore_na=False)."""
    return ewm_mean_com(x, lo, hi, ewm_com_from_alpha(alpha))

