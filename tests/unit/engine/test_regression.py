"""The regression kernels equal Qlib's Cython rolling_/expanding_ slope, rsquare and resi bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from qlib.data._libs import expanding as qlib_expanding
from qlib.data._libs import rolling as qlib_rolling

from qlib_server.engine.kernels.regression import rolling_resi, rolling_rsquare, rolling_slope

KERNELS = {"slope": rolling_slope, "rsquare": rolling_rsquare, "resi": rolling_resi}
WINDOWS = [0, 1, 2, 3, 5, 20, 60, 500]


def qlib_reference(name, x, lo, hi, window):
    """Qlib's Cython function on each row's slice, NaN outside [lo, hi)."""
    out = np.full(x.shape, np.nan)
    for i in range(x.shape[0]):
        seg = x[i, lo[i]:hi[i]].copy()
        if window == 0:
            out[i, lo[i]:hi[i]] = getattr(qlib_expanding, f"expanding_{name}")(seg)
        else:
            out[i, lo[i]:hi[i]] = getattr(qlib_rolling, f"rolling_{name}")(seg, window)
    return out


def assert_same_bits(got, want):
    """Same NaN positions, and every other value bit-identical (signed zeros included)."""
    assert got.dtype == np.float64 and got.flags.c_contiguous and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    ok = ~np.isnan(want)
    np.testing.assert_array_equal(got[ok].view(np.int64), want[ok].view(np.int64))


def case_rows(seed: int, t: int = 160):
    """Rows covering the awkward cases: float32-derived and float64 data, NaN runs, leading/trailing NaN,
    all-NaN and empty rows, lo > 0 and hi < t, flat stretches, zeros (both signs), negatives, inf."""
    rng = np.random.default_rng(seed)
    walk = lambda: np.cumsum(rng.standard_normal(t)) + 50.0  # noqa: E731
    rows = [walk().astype(np.float32).astype(np.float64), walk(), rng.standard_normal(t) * 1e6]
    r = walk().astype(np.float32).astype(np.float64)
    r[rng.random(t) < 0.3] = np.nan
    r[40:70] = np.nan
    rows.append(r)
    r = walk()
    r[:25] = np.nan
    r[-30:] = np.nan
    rows.append(r)
    rows.append(np.full(t, np.nan))
    r = np.round(walk())
    r[10:60] = 7.0
    r[80:90] = 0.0
    r[90:95] = -0.0
    rows.append(r)
    rows.append(-np.abs(walk()))
    rows.append(rng.integers(-2, 3, t).astype(np.float64))
    r = walk()
    r[[5, 50, 51]] = np.inf
    r[[100]] = -np.inf
    rows.append(r)
    x = np.ascontiguousarray(np.vstack(rows))
    n = x.shape[0]
    lo = rng.integers(0, t // 3, n)
    hi = rng.integers(2 * t // 3, t + 1, n)
    lo[0], hi[0] = 0, t
    lo[1], hi[1] = 30, 30  # empty
    lo[2], hi[2] = t - 1, t  # a single position
    return x, lo.astype(np.int64), hi.astype(np.int64)


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("name", sorted(KERNELS))
def test_regression_kernel_equals_qlib_cython_bit_for_bit(name, window):
    for seed in range(3):
        x, lo, hi = case_rows(seed)
        assert_same_bits(KERNELS[name](x, lo, hi, window), qlib_reference(name, x, lo, hi, window))


def test_rows_without_any_position_are_all_nan_and_the_output_is_a_new_array():
    x = np.arange(12.0).reshape(3, 4)
    lo = np.array([0, 2, 4], dtype=np.int64)
    hi = np.array([0, 2, 4], dtype=np.int64)
    for kernel in KERNELS.values():
        out = kernel(x, lo, hi, 3)
        assert np.isnan(out).all() and out is not x


def test_a_window_qlibs_c_int_cannot_square_is_refused():
    x = np.zeros((1, 3))
    with pytest.raises(ValueError):
        rolling_slope(x, np.zeros(1, np.int64), np.full(1, 3, np.int64), 50000)


values = st.one_of(
    st.floats(-1e6, 1e6, width=32).map(float),
    st.sampled_from([np.nan, 0.0, -0.0, 1.0, np.inf]),
    st.floats(allow_nan=True, allow_infinity=False),
)


@settings(max_examples=60, deadline=None)
@given(data=st.lists(values, min_size=0, max_size=40), window=st.sampled_from([0, 1, 2, 3, 4, 7, 20]),
       name=st.sampled_from(sorted(KERNELS)), pad=st.tuples(st.integers(0, 3), st.integers(0, 3)))
def test_any_series_gives_qlibs_cython_values_bit_for_bit(data, window, name, pad):
    seg = np.array(data, dtype=np.float64)
    x = np.concatenate([np.full(pad[0], 3.5), seg, np.full(pad[1], -2.0)])[None, :].copy()
    lo = np.array([pad[0]], dtype=np.int64)
    hi = np.array([pad[0] + len(seg)], dtype=np.int64)
    with np.errstate(all="ignore"):
        assert_same_bits(KERNELS[name](x, lo, hi, window), qlib_reference(name, x, lo, hi, window))
