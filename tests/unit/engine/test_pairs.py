"""rolling_cov / rolling_corr equal the installed pandas' ``x.rolling(N, min_periods=1).cov(y)`` / ``.corr(y)``
(and ``expanding``) bit for bit, row by row."""

from __future__ import annotations

import warnings

import numba
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qlib_server.engine.kernels import pairs

from .test_windows import FLOAT32_ROWS, HI, LO, SPIKY, VALUES, WINDOWS, X, assert_same_bits, frames, paired_frames

KERNELS = {"cov": pairs.rolling_cov, "corr": pairs.rolling_corr}


def make_other(x, seed=1):
    """A partner for every row of ``x``: related, with its own NaN, inf, flat stretches and signed zeros."""
    rng = np.random.default_rng(seed)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanstd of the all-NaN row
        y = 0.5 * x + rng.normal(0, 1, x.shape) * np.nanstd(np.where(np.isinf(x), np.nan, x), axis=1)[:, None]
        y = np.where(np.isnan(y), rng.normal(0, 1, x.shape), y).astype(np.float32).astype(np.float64)
    y[rng.random(x.shape) < 0.08] = np.nan
    y[:, 60:75] = 3.0               # flat: zero variance on one side only
    y[:, 200:204] = -0.0
    y[1, 90:95] = np.inf
    y[2] = x[2]                      # perfectly correlated (clipped at 1)
    y[3] = -x[3]                     # perfectly anti-correlated
    return np.ascontiguousarray(y)


Y = make_other(X)


def pair_reference(x, y, lo, hi, window, name, float32_rows=()):
    """``Series(x).rolling(window, min_periods=1).<name>(Series(y))`` per row (window 0: expanding)."""
    out = np.full(x.shape, np.nan)
    for i in range(x.shape[0]):
        a, b = x[i, lo[i]:hi[i]], y[i, lo[i]:hi[i]]
        if i in float32_rows:
            a, b = a.astype(np.float32), b.astype(np.float32)
        s, o = pd.Series(a), pd.Series(b)
        win = s.expanding(min_periods=1) if window == 0 else s.rolling(window, min_periods=1)
        with np.errstate(all="ignore"):
            out[i, lo[i]:hi[i]] = getattr(win, name)(o).to_numpy()
    return out


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("name", sorted(KERNELS))
def test_rolling_pair_kernel_equals_pandas_bit_for_bit(name, window):
    f32 = {i for i in FLOAT32_ROWS if np.array_equal(Y[i], Y[i].astype(np.float32), equal_nan=True)}
    got = KERNELS[name](X, Y, LO, HI, window)
    assert_same_bits(got, pair_reference(X, Y, LO, HI, window, name, f32))


def test_a_nan_or_inf_on_either_side_removes_the_pair_from_both():
    x = np.array([[1.0, 2.0, np.nan, 4.0, 5.0, 7.0]])
    y = np.array([[2.0, np.inf, 1.0, 3.0, 8.0, 1.0]])
    lo, hi = np.array([0]), np.array([6])
    got = pairs.rolling_cov(x, y, lo, hi, 0)
    want = pd.Series(x[0]).expanding(min_periods=1).cov(pd.Series(y[0])).to_numpy()
    assert_same_bits(got, want[None])
    assert np.isnan(got[0, :3]).all() and got[0, 3] == 1.5  # the pairs (1, 2) and (4, 3) only
    assert got[0, 4] == pd.Series([1.0, 4.0, 5.0]).cov(pd.Series([2.0, 3.0, 8.0]))


def test_corr_takes_the_root_with_libm_pow_like_pandas_not_sqrt():
    # pandas' calc_corr divides by (ssqdm_x * ssqdm_y) ** 0.5, which Cython compiles to C pow(); glibc's pow
    # is not the correctly rounded sqrt for every argument, and numba turns ``** 0.5`` into sqrt. The windows
    # of X/Y above hit such arguments: with sqrt, corr differs from pandas by 1 ulp at a few positions.
    import ctypes
    import ctypes.util

    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    libm.pow.restype = ctypes.c_double
    libm.pow.argtypes = [ctypes.c_double, ctypes.c_double]
    v = 5.902893458566169
    assert libm.pow(v, 0.5) != np.sqrt(v)

    @numba.njit(error_model="numpy")
    def root(a):
        return pairs.c_pow(a, 0.5)

    assert root(v) == libm.pow(v, 0.5)


@st.composite
def pair_frames(draw):
    x, lo, hi, window = draw(frames())
    y = np.array(draw(st.lists(VALUES, min_size=x.size, max_size=x.size)), dtype=np.float64).reshape(x.shape)
    return x, np.ascontiguousarray(y), lo, hi, window


@settings(max_examples=80, deadline=None)
@given(pair_frames())
def test_cov_corr_equal_pandas_on_random_rows(frame):
    x, y, lo, hi, window = frame
    for name, kernel in KERNELS.items():
        assert_same_bits(kernel(x, y, lo, hi, window), pair_reference(x, y, lo, hi, window, name))


@st.composite
def paired_row_frames(draw):
    """Up to 7 rows (pairs of rows advance together, an odd one alone) of unequal bounds, with magnitudes that
    make pandas rebuild its state in one row of a pair but not in the other."""
    x, lo, hi, window = draw(paired_frames())
    y = np.array(draw(st.lists(SPIKY, min_size=x.size, max_size=x.size)), dtype=np.float64).reshape(x.shape)
    return x, np.ascontiguousarray(y), lo, hi, window


@settings(max_examples=100, deadline=None)
@given(paired_row_frames())
def test_cov_corr_of_rows_side_by_side_equal_pandas(frame):
    x, y, lo, hi, window = frame
    for name, kernel in KERNELS.items():
        assert_same_bits(kernel(x, y, lo, hi, window), pair_reference(x, y, lo, hi, window, name))
