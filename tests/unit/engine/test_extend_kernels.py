"""The resumable kernels: one run over a series equals the one-shot kernel, and a run stopped at any position,
resumed from the saved state with only the input tail the kernel asks for, equals it too, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qlib_server.engine.kernels import ewm, moments, pairs, regression, resumable, windows

from .test_windows import X, assert_same_bits

ONE_SERIES = {  # resumable kernel, one-shot kernel, state family
    "sum": (resumable.resume_sum, windows.rolling_sum, "sum"),
    "mean": (resumable.resume_mean, windows.rolling_mean, "sum"),
    "var": (resumable.resume_var, moments.rolling_var, "var"),
    "std": (resumable.resume_std, moments.rolling_std, "var"),
    "sem": (resumable.resume_sem, moments.rolling_sem, "var"),
    "skew": (resumable.resume_skew, moments.rolling_skew, "moments"),
    "kurt": (resumable.resume_kurt, moments.rolling_kurt, "moments"),
    "slope": (resumable.resume_slope, regression.rolling_slope, "regression"),
    "rsquare": (resumable.resume_rsquare, regression.rolling_rsquare, "regression"),
    "resi": (resumable.resume_resi, regression.rolling_resi, "regression"),
}
PAIRS = {"cov": (resumable.resume_cov, pairs.rolling_cov), "corr": (resumable.resume_corr, pairs.rolling_corr)}

VALUES = st.one_of(
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5, 1e6, np.nan, np.nan, np.inf, -np.inf]),
    st.floats(-1e6, 1e6, width=32),
    st.floats(-1e3, 1e3),
    st.sampled_from([1e150, -1e150, 1e-300, 3.0, 3.0, 3.0]),
)


@st.composite
def cases(draw, max_t=60):
    """Rows (ties, zeros of both signs, NaN runs, inf, negatives), each with its span, a window (0, 1, 2, large)
    and two stopping points m1 <= m2 per row (anywhere in the span, before it, or past its end)."""
    t = draw(st.integers(0, max_t))
    n = draw(st.integers(1, 4))
    values = draw(st.lists(VALUES, min_size=n * t, max_size=n * t))
    x = np.array(values, dtype=np.float64).reshape(n, t)
    if t and draw(st.booleans()):  # NaN runs
        a = draw(st.integers(0, t - 1))
        x[:, a:a + draw(st.integers(1, 15))] = np.nan
    bounds = [sorted(draw(st.lists(st.integers(0, t), min_size=2, max_size=2))) for _ in range(n)]
    lo = np.array([b[0] for b in bounds], dtype=np.int64)
    hi = np.array([b[1] for b in bounds], dtype=np.int64)
    x[np.arange(t)[None, :] < lo[:, None]] = np.nan  # outside a span: NaN, as the evaluator keeps it
    x[np.arange(t)[None, :] >= hi[:, None]] = np.nan
    window = draw(st.sampled_from([0, 0, 1, 2, 3, 5, 8, 100]))
    stops = [sorted(draw(st.lists(st.integers(0, t + 2), min_size=2, max_size=2))) for _ in range(n)]
    m1 = np.array([s[0] for s in stops], dtype=np.int64)
    m2 = np.array([s[1] for s in stops], dtype=np.int64)
    return np.ascontiguousarray(x), lo, hi, window, m1, m2


def tail_buffer(x, lo, hi, j0, tail, poison):
    """``x`` with every column a row's resumed run may not read overwritten by ``poison``, cut to start at the
    first column some row may read (so that a span's start is a negative column): the buffer, its spans."""
    x = x.copy()
    first = np.empty(len(lo), dtype=np.int64)
    for i in range(len(lo)):
        n = hi[i] - lo[i]
        p0 = 0 if tail is None else max(0, min(j0[i], n) - tail)
        first[i] = lo[i] + p0 if j0[i] < n else hi[i]
        x[i, :first[i]] = poison
    cut = int(first.min(initial=x.shape[1])) if len(first) else 0
    cut = min(cut, x.shape[1])
    return np.ascontiguousarray(x[:, cut:]), lo - cut, hi - cut, cut


def run_in_pieces(call, x, lo, hi, window, m1, m2, family, tail, poison):
    """``call`` over [0, m1), then [m1, m2) from the state saved at m1 (a tail buffer), then [m2, end): the
    pieces put together, and the final state; and the uninterrupted run's output and final state."""
    k = resumable.STATE[family]
    n = len(lo)
    zero = np.zeros(n, dtype=np.int64)
    end = (hi - lo) + 5
    whole_state = np.zeros((n, k))
    whole = call(x, lo, hi, window, zero, end, whole_state)
    state = np.zeros((n, k))
    out = call(x, lo, hi, window, zero, m1, state)
    length = hi - lo
    for a, b in ((m1, m2), (m2, end)):
        j0 = np.minimum(a, np.maximum(length, 0))
        buffer, blo, bhi, cut = tail_buffer(x, lo, hi, j0, tail, poison)
        piece = call(buffer, blo, bhi, window, j0, np.maximum(b, j0), state)
        for i in range(n):  # positions >= j0 come from the resumed run
            cols = np.arange(lo[i] + j0[i], hi[i])
            out[i, cols] = piece[i, cols - cut]
    return out, state, whole, whole_state


@pytest.mark.parametrize("name", sorted(ONE_SERIES))
@settings(max_examples=150, deadline=None)
@given(case=cases(), poison=st.sampled_from([np.nan, 7.0, -1e300]))
def test_a_resumed_run_equals_the_one_shot_kernel(name, case, poison):
    x, lo, hi, window, m1, m2 = case
    resume, one_shot, family = ONE_SERIES[name]
    want = one_shot(x, lo, hi, window)
    out, state, whole, whole_state = run_in_pieces(resume, x, lo, hi, window, m1, m2, family,
                                                   resumable.tail(family, window), poison)
    assert_same_bits(whole, want)
    assert_same_bits(out, want)
    np.testing.assert_array_equal(state.view(np.int64), whole_state.view(np.int64))


@pytest.mark.parametrize("name", sorted(PAIRS))
@settings(max_examples=150, deadline=None)
@given(case=cases(), other=cases(), poison=st.sampled_from([np.nan, 7.0]))
def test_a_resumed_pair_run_equals_the_one_shot_kernel(name, case, other, poison):
    x, lo, hi, window, m1, m2 = case
    window = window or 3  # Qlib's Corr/Cov have no expanding form
    y = np.resize(other[0], x.shape) if x.size else x.copy()
    y[np.isnan(x) & ~np.isnan(y)] = 1.0  # keep y's NaN and add some pairs where only x has one
    y = np.ascontiguousarray(y)
    resume, one_shot = PAIRS[name]
    want = one_shot(x, y, lo, hi, window)

    def call(buffer, blo, bhi, w, j0, jsave, state):  # the same columns of y as of x
        cut = x.shape[1] - buffer.shape[1]
        return resume(buffer, np.ascontiguousarray(y[:, cut:]), blo, bhi, w, j0, jsave, state)

    out, state, whole, whole_state = run_in_pieces(call, x, lo, hi, window, m1, m2, "pair", window, poison)
    assert_same_bits(whole, want)
    assert_same_bits(out, want)
    np.testing.assert_array_equal(state.view(np.int64), whole_state.view(np.int64))


@settings(max_examples=150, deadline=None)
@given(case=cases(), alpha=st.sampled_from([0.05, 1 / 3, 0.5, 0.9, 1.0, ewm.ewm_span_alpha(20)]),
       poison=st.sampled_from([np.nan, 7.0]))
def test_a_resumed_ewm_equals_the_one_shot_kernel(case, alpha, poison):
    x, lo, hi, _, m1, m2 = case
    want = ewm.ewm_mean(x, lo, hi, alpha)

    def call(buffer, blo, bhi, w, j0, jsave, state):
        return resumable.resume_ewm(buffer, blo, bhi, alpha, j0, jsave, state)

    out, state, whole, whole_state = run_in_pieces(call, x, lo, hi, 0, m1, m2, "ewm", 0, poison)
    assert_same_bits(whole, want)
    assert_same_bits(out, want)
    np.testing.assert_array_equal(state.view(np.int64), whole_state.view(np.int64))


@pytest.mark.parametrize("name", sorted(ONE_SERIES))
@pytest.mark.parametrize("window", [0, 1, 2, 5, 20, 1000])
def test_the_awkward_rows_resumed_at_every_tenth_position_equal_the_one_shot_kernel(name, window):
    resume, one_shot, family = ONE_SERIES[name]
    rows = np.ascontiguousarray(np.nan_to_num(X, nan=np.nan, posinf=np.inf, neginf=-np.inf))
    lo = np.zeros(rows.shape[0], dtype=np.int64)
    hi = np.full(rows.shape[0], rows.shape[1], dtype=np.int64)
    want = one_shot(rows, lo, hi, window)
    for m in range(0, rows.shape[1] + 1, 10):
        m1 = np.full(len(lo), m, dtype=np.int64)
        out, *_ = run_in_pieces(resume, rows, lo, hi, window, m1, m1 + 7, family,
                                resumable.tail(family, window), np.nan)
        assert_same_bits(out, want)
