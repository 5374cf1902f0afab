"""The Qlib window kernels equal Qlib's pandas code (pandas 3.1.1, numpy 2.4.6) bit for bit."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qlib_server.engine.kernels import qlib_windows as qw

WINDOWS = [0, 1, 2, 3, 5, 20, 60, 500]


# Qlib 0.9.7's own functions (qlib/data/ops.py), the reference the kernels must equal.
def qlib_mad(x):
    x1 = x[~np.isnan(x)]
    return np.mean(np.abs(x1 - x1.mean()))


def qlib_weighted_mean(x):
    w = np.arange(len(x)) + 1
    w = w / w.sum()
    return np.nanmean(w * x)


def qlib_exp_weighted_mean(x):
    a = 1 - 2 / (1 + len(x))
    w = a ** np.arange(len(x))[::-1]
    w /= w.sum()
    return np.nansum(w * x)


APPLY = {
    "idxmax": (lambda x: x.argmax() + 1, lambda x, lo, hi, w: qw.rolling_idxmax(x, lo, hi, w)),
    "idxmin": (lambda x: x.argmin() + 1, lambda x, lo, hi, w: qw.rolling_idxmin(x, lo, hi, w)),
    "mad": (qlib_mad, lambda x, lo, hi, w: qw.rolling_mad(x, lo, hi, w)),
    "wma": (qlib_weighted_mean, lambda x, lo, hi, w: qw.rolling_wma(x, lo, hi, w)),
}


def pandas_reference(x, lo, hi, window, method, *args, float32_rows=()):
    """pandas on each row's slice (a float32 Series where the row is float32 data, as Qlib holds it)."""
    out = np.full(x.shape, np.nan)
    for i in range(x.shape[0]):
        seg = x[i, lo[i]:hi[i]]
        series = pd.Series(seg.astype(np.float32) if i in float32_rows else seg)
        win = series.expanding(min_periods=1) if window == 0 else series.rolling(window, min_periods=1)
        with np.errstate(all="ignore"):
            res = win.apply(args[0], raw=True) if method == "apply" else getattr(win, method)(*args)
        out[i, lo[i]:hi[i]] = res.to_numpy()
    return out


def assert_same_bits(got, want):
    """Same NaN positions, and every other value bit-identical (signed zeros included)."""
    assert got.dtype == np.float64 and got.flags.c_contiguous and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    ok = ~np.isnan(want)
    np.testing.assert_array_equal(got[ok].view(np.int64), want[ok].view(np.int64))


FLOAT32_ROWS = (0, 3)


def case_rows(seed: int, t: int = 160):
    """Rows covering the awkward cases: float32-derived (rows 0, 3) and float64 data, NaN runs,
    leading/trailing NaN, all-NaN, empty and one-position rows, lo > 0 and hi < t, flat stretches,
    zeros of both signs, negatives, +-inf (NaN to pandas)."""
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
    r[[82, 85, 91, 93]] = -0.0
    rows.append(r)
    rows.append(-np.abs(walk()))
    rows.append(rng.integers(-2, 3, t).astype(np.float64))
    r = walk()
    r[[5, 50, 51, 52, 53, 54]] = np.inf
    r[[100, 120]] = -np.inf
    r[[121]] = np.nan
    rows.append(r)
    rows.append(rng.choice([0.0, -0.0, 1.0, -1.0, np.nan], t))
    x = np.ascontiguousarray(np.vstack(rows))
    n = x.shape[0]
    lo = rng.integers(0, t // 3, n)
    hi = rng.integers(2 * t // 3, t + 1, n)
    lo[0], hi[0] = 0, t
    lo[1], hi[1] = 30, 30  # empty
    lo[2], hi[2] = t - 1, t  # a single position
    lo[3], hi[3] = 0, t
    return x, lo.astype(np.int64), hi.astype(np.int64)


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("name", sorted(APPLY))
def test_apply_kernel_equals_qlibs_pandas_apply_bit_for_bit(name, window):
    func, kernel = APPLY[name]
    for seed in range(2):
        x, lo, hi = case_rows(seed)
        want = pandas_reference(x, lo, hi, window, "apply", func, float32_rows=FLOAT32_ROWS)
        assert_same_bits(kernel(x, lo, hi, window), want)


def test_expanding_ema_equals_qlibs_expanding_exp_weighted_mean_bit_for_bit():
    for seed in range(2):
        x, lo, hi = case_rows(seed)
        want = pandas_reference(x, lo, hi, 0, "apply", qlib_exp_weighted_mean, float32_rows=FLOAT32_ROWS)
        assert_same_bits(qw.expanding_ema(x, lo, hi), want)


@pytest.mark.parametrize("window", WINDOWS)
def test_rolling_median_equals_pandas_median_bit_for_bit(window):
    for seed in range(3):
        x, lo, hi = case_rows(seed)
        want = pandas_reference(x, lo, hi, window, "median", float32_rows=FLOAT32_ROWS)
        assert_same_bits(qw.rolling_median(x, lo, hi, window), want)


@pytest.mark.parametrize("q", [0.0, 0.2, 0.25, 1 / 3, 0.5, 0.8, 0.95, 1.0])
@pytest.mark.parametrize("window", WINDOWS)
def test_rolling_quantile_equals_pandas_linear_quantile_bit_for_bit(window, q):
    x, lo, hi = case_rows(7)
    want = pandas_reference(x, lo, hi, window, "quantile", q, float32_rows=FLOAT32_ROWS)
    assert_same_bits(qw.rolling_quantile(x, lo, hi, window, q), want)


@pytest.mark.parametrize("window", [129, 300, 0])
def test_windows_above_numpys_pairwise_block_keep_its_summation_order(window):
    """Windows over 128 values take numpy's recursive halves; the expanding EMA reaches 700 values."""
    x, lo, hi = case_rows(11, t=700)
    keep = [0, 3, 4, 6, 9]
    x, lo, hi = np.ascontiguousarray(x[keep]), lo[keep], hi[keep]
    for name in ("mad", "wma"):
        func, kernel = APPLY[name]
        assert_same_bits(kernel(x, lo, hi, window), pandas_reference(x, lo, hi, window, "apply", func))
    if window == 0:
        want = pandas_reference(x, lo, hi, 0, "apply", qlib_exp_weighted_mean)
        assert_same_bits(qw.expanding_ema(x, lo, hi), want)


def test_np_sum_is_numpys_pairwise_sum_from_zero():
    rng = np.random.default_rng(3)
    for n in [*range(0, 140), 255, 256, 257, 1000, 4097, 9000, 20001]:
        a = rng.standard_normal(n) * 10.0 ** rng.integers(-5, 9, n)
        assert qw._np_sum(a, n) == np.sum(a)
    for a in ([-0.0], [-0.0] * 9, [0.0, -0.0], []):
        a = np.array(a, dtype=np.float64)
        assert np.signbit(qw._np_sum(a, len(a))) == np.signbit(np.sum(a))


def test_kernels_refuse_a_negative_window_and_a_quantile_outside_0_1():
    x, lo, hi = np.zeros((1, 3)), np.zeros(1, np.int64), np.full(1, 3, np.int64)
    with pytest.raises(ValueError):
        qw.rolling_mad(x, lo, hi, -1)
    with pytest.raises(ValueError):
        qw.rolling_quantile(x, lo, hi, 3, 1.5)


values = st.one_of(
    st.floats(-1e4, 1e4, width=32).map(float),
    st.sampled_from([np.nan, np.nan, 0.0, -0.0, 1.0, -1.0, np.inf, -np.inf]),
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e300, max_value=1e300),
)
series = st.lists(values, min_size=0, max_size=40)
windows = st.sampled_from([0, 1, 2, 3, 4, 7, 20])
pads = st.tuples(st.integers(0, 3), st.integers(0, 3))


def one_row(data, pad):
    seg = np.array(data, dtype=np.float64)
    x = np.concatenate([np.full(pad[0], 3.5), seg, np.full(pad[1], -2.0)])[None, :].copy()
    return x, np.array([pad[0]], dtype=np.int64), np.array([pad[0] + len(seg)], dtype=np.int64)


@settings(max_examples=60, deadline=None)
@given(data=series, window=windows, pad=pads, name=st.sampled_from(sorted(APPLY)))
def test_any_series_gives_qlibs_apply_values_bit_for_bit(data, window, pad, name):
    x, lo, hi = one_row(data, pad)
    func, kernel = APPLY[name]
    with np.errstate(all="ignore"):
        assert_same_bits(kernel(x, lo, hi, window), pandas_reference(x, lo, hi, window, "apply", func))


@settings(max_examples=40, deadline=None)
@given(data=series, pad=pads)
def test_any_series_gives_qlibs_expanding_ema_bit_for_bit(data, pad):
    x, lo, hi = one_row(data, pad)
    with np.errstate(all="ignore"):
        want = pandas_reference(x, lo, hi, 0, "apply", qlib_exp_weighted_mean)
        assert_same_bits(qw.expanding_ema(x, lo, hi), want)


@settings(max_examples=60, deadline=None)
@given(data=series, window=windows, pad=pads, q=st.one_of(st.none(), st.floats(0.0, 1.0)))
def test_any_series_gives_pandas_median_and_quantile_bit_for_bit(data, window, pad, q):
    x, lo, hi = one_row(data, pad)
    with np.errstate(all="ignore"):
        if q is None:
            want = pandas_reference(x, lo, hi, window, "median")
            assert_same_bits(qw.rolling_median(x, lo, hi, window), want)
        else:
            want = pandas_reference(x, lo, hi, window, "quantile", q)
            assert_same_bits(qw.rolling_quantile(x, lo, hi, window, q), want)


# ---- adversarial rows for the incremental algorithms (monotonic deque, sorted window): few distinct values
# (ties everywhere, 0.0 next to -0.0), runs of NaN and +-inf, windows of 1 and 2, windows longer than the row.

few_values = st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.0, 2.0, np.nan, np.inf, -np.inf])


@st.composite
def runs(draw, max_runs=30):
    """A series made of runs: a value repeated 1-12 times (ties and NaN/inf runs), or a few distinct values."""
    out = []
    for _ in range(draw(st.integers(0, max_runs))):
        if draw(st.booleans()):
            out += [draw(few_values)] * draw(st.integers(1, 12))
        else:
            out += draw(st.lists(st.one_of(few_values, st.floats(-3, 3, width=16).map(float)), max_size=6))
    return out


adversarial_windows = st.sampled_from([0, 1, 2, 3, 5, 8, 13, 33, 500])


@settings(max_examples=150, deadline=None)
@given(data=runs(), window=adversarial_windows, pad=pads, name=st.sampled_from(["idxmax", "idxmin"]))
def test_idx_extremes_on_tie_and_nan_runs_equal_numpys_argmax_argmin(data, window, pad, name):
    x, lo, hi = one_row(data, pad)
    func, kernel = APPLY[name]
    with np.errstate(all="ignore"):
        assert_same_bits(kernel(x, lo, hi, window), pandas_reference(x, lo, hi, window, "apply", func))


@settings(max_examples=150, deadline=None)
@given(data=runs(), window=adversarial_windows, pad=pads,
       q=st.one_of(st.none(), st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0, 0.2, 0.8]), st.floats(0.0, 1.0)))
def test_order_statistics_on_tie_and_nan_runs_equal_pandas(data, window, pad, q):
    """The ranks of a ring window against pandas' skiplist: equal values of both zero signs entering and
    leaving in every order, NaN/inf runs emptying the window, exact ranks (f == int(f)) and interpolation."""
    x, lo, hi = one_row(data, pad)
    with np.errstate(all="ignore"):
        if q is None:
            assert_same_bits(qw.rolling_median(x, lo, hi, window), pandas_reference(x, lo, hi, window, "median"))
        else:
            want = pandas_reference(x, lo, hi, window, "quantile", q)
            assert_same_bits(qw.rolling_quantile(x, lo, hi, window, q), want)


def test_order_statistics_of_zeros_of_both_signs_keep_the_skiplists_arrival_order():
    rng = np.random.default_rng(5)
    x = rng.choice([0.0, -0.0, 0.0, -0.0, 1.0, -1.0, np.nan], (6, 300))
    lo, hi = np.zeros(6, np.int64), np.full(6, 300, np.int64)
    for window in (0, 1, 2, 3, 4, 6, 9, 64, 299, 301):
        assert_same_bits(qw.rolling_median(x, lo, hi, window), pandas_reference(x, lo, hi, window, "median"))
        for q in (0.1, 0.5, 0.9):
            want = pandas_reference(x, lo, hi, window, "quantile", q)
            assert_same_bits(qw.rolling_quantile(x, lo, hi, window, q), want)


def test_a_window_far_longer_than_the_rows_allocates_nothing_and_equals_pandas():
    x, lo, hi = case_rows(4)
    window = 10**12
    assert_same_bits(qw.rolling_median(x, lo, hi, window), pandas_reference(x, lo, hi, window, "median"))
    assert_same_bits(qw.rolling_quantile(x, lo, hi, window, 0.3),
                     pandas_reference(x, lo, hi, window, "quantile", 0.3))
    for name in ("idxmax", "idxmin"):
        func, kernel = APPLY[name]
        assert_same_bits(kernel(x, lo, hi, window), pandas_reference(x, lo, hi, window, "apply", func))
