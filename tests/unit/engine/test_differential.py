"""The engine against Qlib itself: every field, every instrument, the same index, NaN in the same places and the
same float32 values (bit for bit; where an operator is allowed 1 ulp, the test says so and why).

A table per operator (the operator at the root of each field as Qlib parses it; fields, values compared, values
off by 1 ulp) is printed at the end of the run. Every operator Qlib registers by default has a row, but `PFeature`
and `TResample`, which the engine leaves to Qlib.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from .conftest import by_engine, by_qlib, ulps

#: operator -> [fields, values compared, values 1 ulp off, (field, block) pairs the engine left to Qlib]
TABLE: dict = collections.defaultdict(lambda: [0, 0, 0, 0])
# Operators allowed to be 1 float32 ulp off Qlib: none (the kernels reproduce pandas' and Qlib's arithmetic,
# down to libm's pow(v, 0.5) where pandas calls it instead of sqrt).
ONE_ULP: set = set()


def operator_of(name: str) -> str:
    """The operator at the root of the field as Qlib parses it (``$close + $neg`` is Qlib's ``Add``)."""
    from qlib.data.data import ExpressionD

    return type(ExpressionD.get_expression_instance(name)).__name__


def assert_same_as_qlib(names, codes, start_time=None, end_time=None, label=None, allow_fallback=False):
    ours, fallbacks = by_engine(names, codes, start_time, end_time)
    if not allow_fallback:
        assert fallbacks == 0, f"the engine left {fallbacks} (field, block) pairs to Qlib"
    for name in names:
        op = label or operator_of(name)
        row = TABLE[op]
        row[0] += 1
        row[3] += fallbacks // len(names)
        for code in codes:
            theirs = by_qlib(name, code, start_time, end_time)
            mine = ours[name][code]
            assert mine.index.tolist() == theirs.index.tolist(), f"{name} of {code}: another index"
            a, b = mine.to_numpy(), theirs.to_numpy()
            assert theirs.dtype == np.float32
            np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=f"{name} of {code}: NaN elsewhere")
            off = ulps(a, b)
            allowed = 1 if op in ONE_ULP else 0
            assert off.max(initial=0) <= allowed, (
                f"{name} of {code}: {int((off > allowed).sum())} values differ, "
                f"e.g. at {np.flatnonzero(off > allowed)[:3]}"
                f" ours {a[off > allowed][:3]} Qlib's {b[off > allowed][:3]}")
            row[1] += len(a)
            row[2] += int((off == 1).sum())


def alpha158():
    from qlib.contrib.data.loader import Alpha158DL

    fields, _ = Alpha158DL.get_feature_config()
    return fields + ["Ref($close, -2)/Ref($close, -1) - 1"]


def alpha360():
    from qlib.contrib.data.loader import Alpha360DL

    fields, _ = Alpha360DL.get_feature_config()
    return fields


def test_every_alpha158_field_equals_qlibs(codes):
    assert_same_as_qlib(alpha158(), codes, label="Alpha158")


def test_every_alpha360_field_equals_qlibs(codes):
    assert_same_as_qlib(alpha360(), codes, label="Alpha360")


def test_alpha158_over_a_window_in_the_middle_equals_qlibs(codes):
    # A start after the first day: each field's query starts at its own look-back (running states differ).
    assert_same_as_qlib(alpha158(), codes, "2018-04-02", "2018-09-28", label="Alpha158 (mid window)")


WINDOWS = [0, 1, 2, 3, 5, 20, 400]
ROLLING = ["Mean", "Sum", "Std", "Var", "Max", "Min", "IdxMax", "IdxMin", "Med", "Mad", "Rank", "Count",
           "Slope", "Rsquare", "Resi", "WMA", "EMA"]


def per_operator():
    cases = []
    for op in ROLLING:
        cases += [f"{op}($close, {n})" for n in WINDOWS] + [f"{op}($neg, 5)", f"{op}($volume, 10)",
                                                           f"{op}($change, 0)"]
    cases += [f"Skew($close, {n})" for n in (0, 3, 5, 20, 400)] + ["Skew($neg, 5)", "Kurt($neg, 6)"]
    cases += [f"Kurt($close, {n})" for n in (0, 5, 20, 400)]
    cases += [f"Quantile($close, {n}, {q})" for n in (0, 1, 5, 20) for q in (0.0, 0.2, 0.5, 0.8, 1.0)]
    cases += ["Quantile($neg, 7, 0.25)"]
    cases += [f"{op}($close, $volume, {n})" for op in ("Corr", "Cov") for n in (1, 2, 5, 20, 400)]
    cases += ["Cov($neg, $change, 10)", "Corr($close, $open, 10)"]
    cases += [f"Rolling($close, 5, '{f}')" for f in ("count", "sum", "mean", "median", "var", "std", "min",
                                                     "max", "skew", "kurt", "sem", "rank")]
    cases += ["Rolling($neg, 0, 'rank')", "Mean($close, 0.5)", "Std($close, 0.3)", "EMA($close, 0.2)"]
    cases += ["Ref($close, 1)", "Ref($close, 0)", "Ref($close, -3)", "Ref($neg, 2)", "Ref($neg, 400)"]
    cases += ["Delta($close, 1)", "Delta($close, 0)", "Delta($neg, 5)", "Delta($close, -2)"]
    cases += ["$close", "$neg", "$volume"]
    cases += ["Abs($neg)", "Sign($neg)", "Log($volume)", "Log($neg)", "Log($close > $open)", "Power($close, 2)",
              "Power($neg, 0.5)",
              "Power($close, $neg)", "$close + $neg", "$close - 1", "1 - $close", "$close * $neg", "$close / $neg",
              "$neg / 0", "Greater($close, $neg)", "Less($neg, 0)", "$close > $open", "$neg >= 0", "$neg < 0.5",
              "$close <= $open", "$neg == 0", "$neg != 0", "Not($close > $open)", "Not($neg >= 0)",
              "And($close > $open, $high > $vwap)",
              "Or($open > $close, $close < 10)",
              "If($close > $open, $close, $open)", "If($neg > 0, 1, 0)", "If($neg, $neg, -1)",
              "Mask($close, 'SH600000')", "ChangeInstrument('SH600000', $close)",
              "$close / ChangeInstrument('SH600000', $close)",
              "Mean($close > $open, 5)", "Sum(If($neg > 0, 1, 0), 10)", "Cov($neg, $change, 10)",
              "Corr($neg, $neg * $neg, 5)", "Ref(If($neg > 0, 1, 0), 2)", "$neg + $close * 2"]
    return cases


# What the engine leaves to Qlib: booleans shifted into objects, & and | of differently indexed series (pandas
# aligns them into objects), and what Qlib itself refuses (comparing or correlating differently indexed series).
LEFT_TO_QLIB = ["Ref($close > $open, 1)", "And($close > $open, $neg > 0)", "Or($neg > 0, $close < 10)",
                "$neg <= $change", "Corr($neg, $close, 5)"]


@pytest.mark.parametrize("name", per_operator())
def test_each_operator_equals_qlibs(codes, name):
    assert_same_as_qlib([name], codes)


def test_every_operator_qlib_registers_by_default_has_a_case_of_its_own(codes):
    """A Qlib upgrade that registers an operator makes this fail until the engine is compared on it."""
    from qlib.data.ops import OpsList

    left_to_qlib = {"PFeature", "TResample"}  # point-in-time fields and resampling: computed by Qlib
    assert {op.__name__ for op in OpsList} - left_to_qlib <= {operator_of(name) for name in per_operator()}


@pytest.mark.parametrize("name", LEFT_TO_QLIB)
def test_what_the_engine_leaves_to_qlib_is_left_to_qlib(codes, name):
    """Each such field is computed by Qlib: equal to Qlib's, or refused as Qlib refuses it."""
    try:
        theirs = {code: by_qlib(name, code) for code in codes}
    except Exception as refusal:
        with pytest.raises(type(refusal)):
            by_engine([name], codes)
        return
    ours, fallbacks = by_engine([name], codes)
    assert fallbacks > 0
    for code in codes:
        assert ours[name][code].equals(theirs[code].astype(np.float32))


# -- random expression trees ----------------------------------------------------------------------------------

_LEAVES = st.sampled_from(["$close", "$open", "$high", "$volume", "$neg", "$change", "$vwap"])
_WINDOW = st.sampled_from([0, 1, 2, 3, 7, 30, 400])


def _trees(children):
    unary_window = st.tuples(st.sampled_from(ROLLING + ["Ref", "Delta"]), children, _WINDOW).map(
        lambda t: f"{t[0]}({t[1]}, {t[2]})")
    moments = st.tuples(st.sampled_from(["Skew", "Kurt"]), children, st.sampled_from([0, 5, 9])).map(
        lambda t: f"{t[0]}({t[1]}, {t[2]})")
    pair_window = st.tuples(st.sampled_from(["Corr", "Cov"]), children, children, st.sampled_from([2, 5, 20])).map(
        lambda t: f"{t[0]}({t[1]}, {t[2]}, {t[3]})")
    arithmetic = st.tuples(children, st.sampled_from(["+", "-", "*", "/", ">", "<"]), children).map(
        lambda t: f"({t[0]} {t[1]} {t[2]})")
    with_number = st.tuples(children, st.sampled_from(["+", "*", "/", "-"]),
                            st.sampled_from(["1", "2", "0.5", "1e-12", "-3"])).map(lambda t: f"({t[0]} {t[1]} {t[2]})")
    elementwise = st.tuples(st.sampled_from(["Abs", "Sign", "Log"]), children).map(lambda t: f"{t[0]}({t[1]})")
    choice = st.tuples(st.sampled_from(["Greater", "Less"]), children, children).map(
        lambda t: f"{t[0]}({t[1]}, {t[2]})")
    condition = st.tuples(children, children, children).map(lambda t: f"If({t[0]} > {t[1]}, {t[2]}, {t[1]})")
    return unary_window | moments | pair_window | arithmetic | with_number | elementwise | choice | condition


EXPRESSIONS = st.recursive(_LEAVES, _trees, max_leaves=5)


@settings(max_examples=120, deadline=None)
@given(EXPRESSIONS)
def test_random_expressions_equal_qlibs_or_are_refused_as_qlib_refuses_them(codes, name):
    try:
        for code in codes[:6]:
            by_qlib(name, code)
    except Exception as refusal:  # e.g. comparing series of different indexes: the engine leaves it to Qlib
        with pytest.raises(type(refusal)):
            by_engine([name], codes[:6])
        return
    # A tree may align a boolean with a series of another range (pandas makes objects of them): the engine
    # leaves that field to Qlib, counted in the table; every value is still compared with Qlib's.
    assert_same_as_qlib([name], codes[:6], label="random trees", allow_fallback=True)
