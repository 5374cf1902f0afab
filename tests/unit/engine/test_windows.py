"""The rolling/expanding and ewm kernels equal the installed pandas (3.1.1) bit for bit, row by row."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qlib_server.engine.kernels import ewm, moments, windows

WINDOWS = [1, 2, 3, 5, 20, 60, 1000, 0]  # 1000: larger than every row; 0: expanding

KERNELS = {
    "sum": (windows.rolling_sum, lambda w: w.sum()),
    "mean": (windows.rolling_mean, lambda w: w.mean()),
    "count": (windows.rolling_count, lambda w: w.count()),
    "min": (windows.rolling_min, lambda w: w.min()),
    "max": (windows.rolling_max, lambda w: w.max()),
    "rank": (windows.rolling_rank, lambda w: w.rank()),
    "rank_pct": (windows.rolling_rank_pct, lambda w: w.rank(pct=True)),
    "var": (moments.rolling_var, lambda w: w.var()),
    "std": (moments.rolling_std, lambda w: w.std()),
    "sem": (moments.rolling_sem, lambda w: w.sem()),
    "skew": (moments.rolling_skew, lambda w: w.skew()),
    "kurt": (moments.rolling_kurt, lambda w: w.kurt()),
}


def make_rows(seed=0, t=240):
    """Rows made to trip a kernel up, with their bounds and which of them hold float32 data."""
    rng = np.random.default_rng(seed)
    rows = []

    def add(values, lo=0, hi=t):
        row = np.full(t, np.nan)
        row[lo:hi] = values[: hi - lo] if np.ndim(values) else values
        rows.append((row, lo, hi))

    def f32(v):
        return np.asarray(v, dtype=np.float32).astype(np.float64)

    price = f32(10 * np.exp(np.cumsum(rng.normal(0, 0.02, t))))
    add(price)                                                     # float32-derived prices
    add(rng.normal(0, 1, t))                                       # float64 data
    add(np.where(rng.random(t) < 0.3, np.nan, price))              # scattered NaN
    add(np.concatenate([np.full(30, np.nan), price[30:200], np.full(40, np.nan)]))  # leading/trailing NaN
    gap = price.copy()
    gap[50:120] = np.nan
    add(gap)                                                       # a NaN run longer than every window but 0/1000
    add(np.nan)                                                    # all NaN
    add(price, 100, 100)                                           # empty row
    add(price, 37, 181)                                            # lo > 0, hi < t
    flat = price.copy()
    flat[20:90] = flat[20]
    flat[150:160] = 0.0
    add(flat)                                                      # flat stretches, zero variance, zeros
    add(f32(np.round(rng.normal(0, 1, t), 1)))                     # negatives, zeros and many ties
    signed = np.zeros(t)
    signed[rng.random(t) < 0.5] = -0.0
    signed[::7] = np.nan
    add(signed)                                                    # +0.0 and -0.0 only
    add(-price)                                                    # all negative
    add(f32(price * 1e9))                                          # huge magnitudes (volumes, amounts)
    add(price * 1e-12)                                             # tiny magnitudes
    add(np.where(rng.random(t) < 0.5, 1e150, -1e150) * rng.random(t))  # squares overflow float64
    add(np.where(rng.random(t) < 0.05, 1e300, 1e-300))             # extremes mixed
    add(f32(price + 1e6))                                          # large offset, small deviations
    infs = price.copy()
    infs[[10, 11, 60, 140]] = [np.inf, -np.inf, np.inf, -np.inf]
    add(infs)                                                      # +-inf: NaN for pandas' kernels, count counts it
    add(f32(np.repeat(rng.normal(0, 1, t // 8 + 1), 8)))           # constant blocks of 8
    x = np.ascontiguousarray(np.array([r for r, _, _ in rows]))
    lo = np.array([a for _, a, _ in rows], dtype=np.int64)
    hi = np.array([b for _, _, b in rows], dtype=np.int64)
    return x, lo, hi


X, LO, HI = make_rows()
with np.errstate(over="ignore"):
    FLOAT32_ROWS = {i for i in range(X.shape[0]) if np.array_equal(X[i], X[i].astype(np.float32), equal_nan=True)}


def pandas_rows(x, lo, hi, fn, float32_rows=()):
    """``fn`` applied to each row's slice as a pandas Series (float32 where the data is float32, as in Qlib)."""
    out = np.full(x.shape, np.nan)
    for i in range(x.shape[0]):
        seg = x[i, lo[i]:hi[i]]
        with np.errstate(all="ignore"):
            out[i, lo[i]:hi[i]] = fn(pd.Series(seg.astype(np.float32) if i in float32_rows else seg))
    return out


def rolling_reference(x, lo, hi, window, agg, float32_rows=()):
    """``Series.rolling(window, min_periods=1).<agg>`` per row (``expanding(min_periods=1)`` for window 0)."""
    def fn(s):
        return agg(s.expanding(min_periods=1) if window == 0 else s.rolling(window, min_periods=1)).to_numpy()

    return pandas_rows(x, lo, hi, fn, float32_rows)


def assert_same_bits(got, want):
    """Same shape, C-contiguous float64, same NaN positions, every other value bit-identical (signed zeros too)."""
    assert got.dtype == np.float64 and got.flags.c_contiguous and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    ok = ~np.isnan(want)
    np.testing.assert_array_equal(got[ok].view(np.int64), want[ok].view(np.int64))


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("name", sorted(KERNELS))
def test_rolling_kernel_equals_pandas_bit_for_bit(name, window):
    kernel, agg = KERNELS[name]
    got = kernel(X, LO, HI, window)
    assert_same_bits(got, rolling_reference(X, LO, HI, window, agg, FLOAT32_ROWS))


def test_outside_each_rows_bounds_every_kernel_gives_nan():
    for kernel, _ in KERNELS.values():
        got = kernel(X, LO, HI, 5)
        for i in range(X.shape[0]):
            assert np.isnan(got[i, : LO[i]]).all() and np.isnan(got[i, HI[i]:]).all()


def test_kernels_accept_zero_rows_and_zero_columns():
    for shape in [(0, 10), (3, 0)]:
        x = np.zeros(shape)
        lo = np.zeros(shape[0], dtype=np.int64)
        for kernel, _ in KERNELS.values():
            assert kernel(x, lo, lo.copy(), 3).shape == shape


# ---- ewm


@pytest.mark.parametrize("alpha", [0.05, 0.1, 1 / 3, 0.5, 0.9, 1.0])
def test_ewm_mean_equals_pandas_ewm_alpha_bit_for_bit(alpha):
    got = ewm.ewm_mean(X, LO, HI, alpha)
    want = pandas_rows(X, LO, HI, lambda s: s.ewm(alpha=alpha, min_periods=1).mean().to_numpy(), FLOAT32_ROWS)
    assert_same_bits(got, want)


@pytest.mark.parametrize("span", [1, 2, 5, 10, 11, 20, 60, 1000])
def test_ewm_mean_of_ewm_span_alpha_equals_pandas_ewm_span_bit_for_bit(span):
    got = ewm.ewm_mean(X, LO, HI, ewm.ewm_span_alpha(span))
    want = pandas_rows(X, LO, HI, lambda s: s.ewm(span=span, min_periods=1).mean().to_numpy(), FLOAT32_ROWS)
    assert_same_bits(got, want)


def test_ewm_span_alpha_is_the_alpha_pandas_kernel_uses_for_a_span():
    for span in [1, 2, 3, 5, 10, 11, 20, 22, 60, 250, 1000, 2.5]:
        com = pd.Series([1.0]).ewm(span=span)._com
        assert ewm.ewm_span_alpha(span) == 1.0 / (1.0 + com)
    assert ewm.ewm_span_alpha(5) == 1 / 3 and ewm.ewm_span_alpha(20) == 1.0 / (1.0 + 9.5)


def test_ewm_span_alpha_fed_back_as_alpha_gives_pandas_span_weights_for_every_span():
    # pandas re-derives alpha from com = (1 - alpha) / alpha, which for many spans (5, 10, 11, ...) is not
    # the span's alpha to the last bit; the recursion only multiplies by 1 - alpha, and that is the same.
    for span in range(1, 100_001):
        alpha = ewm.ewm_span_alpha(span)
        assert 1.0 - 1.0 / (1.0 + ewm.ewm_com_from_alpha(alpha)) == 1.0 - alpha


def test_ewm_carries_the_last_mean_over_nan_and_starts_at_the_first_value():
    x = np.array([[np.nan, np.nan, 2.0, np.nan, 4.0, np.inf]])
    got = ewm.ewm_mean(x, np.array([0]), np.array([6]), 0.5)
    want = pd.Series(x[0]).ewm(alpha=0.5, min_periods=1).mean().to_numpy()
    assert_same_bits(got, want[None])
    assert np.isnan(got[0, :2]).all() and got[0, 3] == 2.0 and got[0, 5] == got[0, 4]


def test_ewm_rejects_pandas_invalid_parameters():
    with pytest.raises(ValueError):
        ewm.ewm_mean(X, LO, HI, 0.0)
    with pytest.raises(ValueError):
        ewm.ewm_span_alpha(0.5)


# ---- properties: random rows with NaN, ties, signed zeros, random bounds and windows

VALUES = st.one_of(
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5, 1e6, np.nan, np.nan]),
    st.floats(-1e6, 1e6, width=32),
    st.floats(-1e3, 1e3),
)


@st.composite
def frames(draw, max_t=40):
    t = draw(st.integers(0, max_t))
    n = draw(st.integers(1, 4))
    x = np.array(draw(st.lists(VALUES, min_size=n * t, max_size=n * t)), dtype=np.float64).reshape(n, t)
    bounds = [sorted(draw(st.lists(st.integers(0, t), min_size=2, max_size=2))) for _ in range(n)]
    lo = np.array([b[0] for b in bounds], dtype=np.int64)
    hi = np.array([b[1] for b in bounds], dtype=np.int64)
    window = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 7, 10, 50]))
    return np.ascontiguousarray(x), lo, hi, window


def check_family(names, frame):
    x, lo, hi, window = frame
    for name in names:
        kernel, agg = KERNELS[name]
        assert_same_bits(kernel(x, lo, hi, window), rolling_reference(x, lo, hi, window, agg))


@settings(max_examples=60, deadline=None)
@given(frames())
def test_sum_mean_count_equal_pandas_on_random_rows(frame):
    check_family(["sum", "mean", "count"], frame)


@settings(max_examples=60, deadline=None)
@given(frames())
def test_min_max_rank_equal_pandas_on_random_rows(frame):
    check_family(["min", "max", "rank", "rank_pct"], frame)


@settings(max_examples=60, deadline=None)
@given(frames())
def test_var_std_sem_skew_kurt_equal_pandas_on_random_rows(frame):
    check_family(["var", "std", "sem", "skew", "kurt"], frame)


@settings(max_examples=60, deadline=None)
@given(frames(), st.sampled_from([0.1, 0.5, 0.9, 1.0]), st.sampled_from([2, 5, 10]))
def test_ewm_means_equal_pandas_on_random_rows(frame, alpha, span):
    x, lo, hi, _ = frame
    assert_same_bits(ewm.ewm_mean(x, lo, hi, alpha),
                     pandas_rows(x, lo, hi, lambda s: s.ewm(alpha=alpha, min_periods=1).mean().to_numpy()))
    assert_same_bits(ewm.ewm_mean(x, lo, hi, ewm.ewm_span_alpha(span)),
                     pandas_rows(x, lo, hi, lambda s: s.ewm(span=span, min_periods=1).mean().to_numpy()))


# ---- rows computed side by side (var/std/skew/kurt advance two rows in one loop): rows of unequal bounds, odd counts,
# and magnitudes that make pandas rebuild its state (cancellation) in one row of a pair but not the other.

SPIKY = st.one_of(
    st.sampled_from([0.0, -0.0, 1.0, 1e8, -1e8, 1e150, -1e150, 1e-300, np.nan, np.nan, np.inf, -np.inf]),
    st.floats(-1e3, 1e3, width=32),
    st.floats(1e8 - 1, 1e8 + 1),
)


@st.composite
def paired_frames(draw, max_t=60):
    t = draw(st.integers(0, max_t))
    n = draw(st.integers(1, 7))
    x = np.array(draw(st.lists(SPIKY, min_size=n * t, max_size=n * t)), dtype=np.float64).reshape(n, t)
    bounds = [sorted(draw(st.lists(st.integers(0, t), min_size=2, max_size=2))) for _ in range(n)]
    lo = np.array([b[0] for b in bounds], dtype=np.int64)
    hi = np.array([b[1] for b in bounds], dtype=np.int64)
    window = draw(st.sampled_from([0, 1, 2, 3, 5, 13, 100]))
    return np.ascontiguousarray(x), lo, hi, window


@settings(max_examples=100, deadline=None)
@given(paired_frames())
def test_moments_of_rows_side_by_side_equal_pandas(frame):
    check_family(["var", "std", "sem", "skew", "kurt"], frame)


@settings(max_examples=60, deadline=None)
@given(paired_frames())
def test_rank_with_a_running_count_equals_pandas_on_inf_and_nan_runs(frame):
    check_family(["rank", "rank_pct"], frame)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=64),
                          st.sampled_from([2e-05, -2e-05, np.nextafter(2e-05, 1), np.nextafter(2e-05, 0), 0.0, -0.0,
                                           5e-324, -np.inf, np.inf, np.nan])), min_size=1, max_size=64))
def test_close_to_zero_is_numpys_isclose_to_zero_with_qlibs_tolerance(values):
    from qlib_server.engine.windows import close_to_zero

    std = np.array(values, dtype=np.float64)
    assert np.array_equal(close_to_zero(std), np.isclose(std, 0, atol=2e-05))
