"""The daily update: a full computation over T days, extended by 1 day, then 5, then 1 more, equals the full
computation over the longer data on every changed row (values, NaN and index entries), and the rows before
the first changed one are those the full computation over the longer data has.

The data for T days is a prefix of the data for T + k days: the generated dataset, with disturbances around
the last days (NaN runs and flat prices across day T, an instrument delisted in the appended days, one listed
in them), cut to its first T days.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings

from qlib_server.engine import features
from qlib_server.engine.checkpoint import Checkpoint
from qlib_server.engine.values import Unsupported

from .conftest import DAYS
from .test_differential import EXPRESSIONS, alpha158, alpha360, per_operator

T0 = DAYS - 8  # the first checkpoint's last day; then 1, 5 and 1 days are appended
STEPS = (1, 5, 1)


class Data:
    """The test dataset's feature files, disturbed around day T0, and readers of its first days."""

    def __init__(self, root, codes):
        self.root, self.codes, self.files = root, codes, {}

    def raw(self, code: str, field: str):
        if (code, field) not in self.files:
            path = self.root / "features" / code.lower() / f"{field.lower()}.day.bin"
            raw = np.fromfile(path, dtype="<f4") if path.exists() else None
            self.files[code, field] = None if raw is None else self._disturbed(self.codes.index(code), field, raw)
        return self.files[code, field]

    @staticmethod
    def _disturbed(i: int, field: str, raw: np.ndarray) -> np.ndarray:
        raw = raw.copy()
        first = int(raw[0])
        values = raw[1:]

        def at(position):
            return position - first

        if first + len(values) < T0 - 20:
            return raw  # delisted long before
        if i == 1:  # suspended across day T0
            values[at(T0 - 3):at(T0 + 3)] = np.nan
        if i == 2 and field != "volume":  # flat across day T0 (ties, zero variance)
            values[at(T0 - 12):at(T0 + 4)] = values[at(T0 - 12)]
        if i == 3:  # delisted among the appended days
            return raw[:1 + at(T0 + 3)]
        if i == 4:  # listed among the appended days
            return np.concatenate([[T0 + 3], values[at(T0 + 3):]]).astype("<f4")
        if i == 6:  # a NaN run ending on day T0, zero volume after it
            values[at(T0 - 30):at(T0 + 1)] = np.nan if field != "volume" else 0.0
        if i == 8 and field == "close":  # a NaN on the first appended day only
            values[at(T0 + 1)] = np.nan
        raw[1:] = values
        return raw

    def reader(self, end: int, tail: bool = True):
        """``read`` of the data whose last day is calendar position ``end`` (with ``tail``, as
        :class:`~qlib_server.engine.features.FeatureReader` has it)."""
        data = self

        class Read:
            def __call__(self, code: str, field: str):
                raw = data.raw(code, field)
                if raw is None or int(raw[0]) > end:
                    return None
                return raw[:1 + end - int(raw[0]) + 1]

            def tail(self, code: str, field: str, since: int):
                raw = self(code, field)
                if raw is None:
                    return None
                first = int(raw[0])
                return first, raw.size - 1, raw[1 + max(0, since - first):]

        read = Read()
        return read if tail else read.__call__


@pytest.fixture(scope="module")
def data(qlib_data, codes):
    return Data(qlib_data, codes)


def compute(data: Data, names: list, codes: list, end: int, checkpoint: bool = False, start: int = 0):
    """Every block of the full computation over ``[start, end]`` (a field left to Qlib: no values)."""
    from qlib.data.data import ExpressionD

    def extent_of(expression):
        left, right = expression.get_extended_window_size()
        if not (np.isfinite(left) and np.isfinite(right)):
            raise Unsupported("infinite window")
        return max(0, start - int(left)), end + int(right)

    def by_qlib(code, name):  # a field the engine leaves to Qlib: no values here (the test skips it)
        return pd.Series([], dtype=np.float32)

    before = features.fallbacks()
    blocks = list(features.blocks(codes, names, start, end, expression_of=ExpressionD.get_expression_instance,
                                  extent_of=extent_of, read=data.reader(end), by_qlib=by_qlib, size=5, threads=2,
                                  checkpoint=checkpoint))
    return blocks, features.fallbacks() - before


def by_code(blocks: list, c: int) -> dict:
    return {code: (b.values[c][i], b.present[c][i]) for b in blocks for i, code in enumerate(b.instruments)}


def assert_extends(data: Data, names: list, codes: list, tail: bool = True, start: int = 0,
                   steps: tuple = STEPS) -> str:
    """Extends ``names`` over STEPS and compares; returns "unsupported" where the full computation left a field
    to Qlib (and then the extension must refuse), "equal" otherwise."""
    from qlib.data.data import ExpressionD

    blocks, fallbacks = compute(data, names, codes, T0, checkpoint=True, start=start)
    saved = Checkpoint(names, start, T0, [b.checkpoint for b in blocks])
    if fallbacks:
        with pytest.raises(Unsupported):
            list(features.extend_blocks(saved, T0 + 1, expression_of=ExpressionD.get_expression_instance,
                                        read=data.reader(T0 + 1)))
        return "unsupported"
    end = T0
    for k in steps:
        old_blocks = blocks
        end += k
        saved = Checkpoint.from_bytes(saved.to_bytes())
        want, fallbacks = compute(data, names, codes, end, start=start)
        try:
            blocks = list(features.extend_blocks(saved, end, expression_of=ExpressionD.get_expression_instance,
                                                 read=data.reader(end, tail), rows=12))
        except Unsupported:
            assert fallbacks, "the extension refused what the full computation computes"
            return "unsupported"
        assert not fallbacks, "the extension computed what the full computation leaves to Qlib"
        first = blocks[0].start
        assert all(b.start == first and b.end == end for b in blocks)
        assert [b.instruments for b in blocks] == [b.instruments for b in old_blocks]
        col = first - start  # the full blocks' column of the first changed row
        for c, name in enumerate(names):
            full, ext, old = by_code(want, c), by_code(blocks, c), by_code(old_blocks, c)
            for code in codes:
                (w_values, w_present), (e_values, e_present), (o_values, o_present) = full[code], ext[code], old[code]
                assert np.array_equal(o_present[:col], w_present[:col]), f"{name} {code}: index before {first}"
                assert np.array_equal(o_values[:col], w_values[:col], equal_nan=True), f"{name} {code}: before"
                assert np.array_equal(e_present, w_present[col:]), f"{name} {code}: another index after {k} days"
                w_values = w_values[col:]
                same = np.isnan(e_values) & np.isnan(w_values) | (e_values.view(np.int32) == w_values.view(np.int32))
                if not (np.array_equal(e_values, w_values, equal_nan=True) and same.all()):  # bits, signed zeros
                    off = np.flatnonzero(~same)
                    raise AssertionError(f"{name} of {code} extended by {k} to {end}: differs at {first + off[:5]}, "
                                         f"{e_values[off[:3]]} != {w_values[off[:3]]}")
        saved = Checkpoint(names, start, end, [b.checkpoint for b in blocks])
        blocks = want  # the next round's rows before its first changed one
    return "equal"


def test_alpha158_with_a_label_extended_by_1_5_1_days_equals_the_full_computation(data, codes):
    assert assert_extends(data, alpha158(), codes) == "equal"


def test_alpha158_of_a_request_starting_mid_calendar_extended_by_0_2_1_days_equals_the_full_computation(data, codes):
    # each field's query starts at its own look-back: the running states start there, not at day 0
    assert assert_extends(data, alpha158() + WINDOWS_AT_ONCE[-4:], codes, start=120, steps=(0, 2, 1)) == "equal"


def test_alpha360_extended_by_1_5_1_days_equals_the_full_computation(data, codes):
    assert assert_extends(data, alpha360(), codes) == "equal"


def supported_per_operator():
    return [name for name in per_operator() if "ChangeInstrument" not in name and "Mask" not in name]


@pytest.mark.parametrize("name", supported_per_operator())
def test_each_operator_extended_equals_the_full_computation(data, codes, name):
    assert assert_extends(data, [name], codes) in ("equal", "unsupported")


@pytest.mark.parametrize("name", ["Mask($close, 'SH600000')", "$close / ChangeInstrument('SH600000', $close)"])
def test_another_instruments_series_is_not_extended(data, codes, name):
    from qlib.data.data import ExpressionD

    blocks, _ = compute(data, [name], codes, T0, checkpoint=True)
    saved = Checkpoint([name], 0, T0, [b.checkpoint for b in blocks])
    assert all(b.unsupported for b in saved.blocks)
    with pytest.raises(Unsupported, match="another instrument"):
        list(features.extend_blocks(saved, T0 + 1, expression_of=ExpressionD.get_expression_instance,
                                    read=data.reader(T0 + 1)))


WINDOWS_AT_ONCE = ["Mean($close, 0)", "Std($close, 0)", "Skew($neg, 0)", "Kurt($close, 0)", "Med($close, 0)",
                   "Quantile($neg, 0, 0.3)", "Rank($close, 0)", "IdxMax($neg, 0)", "Mad($close, 0)", "WMA($close, 0)",
                   "EMA($close, 0)", "Count($neg, 0)", "Max($neg, 0)", "Slope($close, 0)", "Rsquare($close, 0)",
                   "Std(Mean($close, 5) / $close, 20)", "Mean(Std($close, 3), 0)", "Med(Mean($close, 3), 0)",
                   "Ref(Mean(Ref($close, -2), 4), -3)", "Mean(Ref($close, -2), 5) - Ref(Sum($neg, 3), 2)",
                   "Corr(Ref($close, -1), $volume, 7)", "Delta(Mean($close, 3), 2)", "Ref(Std($close, 4), 0)",
                   "Rsquare(Ref($close, -2), 6)", "EMA(Ref($close, -1), 0.3)", "Mean($close, 0.4)",
                   "Cov(Mean($close, 2), $neg, 4)", "If(Mean($close, 3) > $close, Sum($close, 4), Ref($close, -1))"]


def test_a_request_of_many_windows_nested_and_looking_ahead_extended_equals_the_full_computation(data, codes):
    assert assert_extends(data, WINDOWS_AT_ONCE, codes) == "equal"


def test_first_values_extended_equal_the_full_computation_where_every_series_has_one(data, codes):
    # Delta(x, 0) of an empty series raises in Qlib: leave out the instrument listed after day T0
    names = ["Delta($close, 0)", "Delta(Mean($neg, 3), 0)", "Ref($neg, 0) + Ref(Ref($close, -1), 0)"]
    assert assert_extends(data, names, [c for i, c in enumerate(codes) if i != 4]) == "equal"


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(EXPRESSIONS, EXPRESSIONS)
def test_random_expressions_extended_equal_the_full_computation_or_are_refused(data, codes, one, two):
    # whole feature files read (a reader without tail), blocks computed one by one
    assert assert_extends(data, [one, two, f"Ref({one}, -2)"], codes, tail=False) in ("equal", "unsupported")


def test_the_feature_readers_tail_is_the_end_of_the_file_it_reads(qlib_data, tmp_path):
    read = features.feature_reader(qlib_data, "day")
    for code, field in [("SH600000", "close"), ("SZ000001", "neg"), ("SH600012", "volume")]:
        raw = read(code, field)
        first = int(raw[0])
        for since in (0, first - 1, first, first + 7, first + raw.size - 2, first + raw.size + 3):
            start, count, values = read.tail(code, field, since)
            assert (start, count) == (first, raw.size - 1)
            assert np.array_equal(values, raw[1 + max(0, since - first):], equal_nan=True)
    assert read.tail("SH699999", "close", 3) is None and read("SH699999", "close") is None
    empty = tmp_path / "features" / "sh600000"
    empty.mkdir(parents=True)
    (empty / "close.day.bin").write_bytes(b"")
    assert features.feature_reader(tmp_path, "day").tail("SH600000", "close", 0)[1] == -1


def steady(data: Data) -> str:
    """An undisturbed instrument listed until the last day."""
    def last(code):
        raw = Data.raw(data, code, "close")
        return int(raw[0]) + raw.size - 2

    return next(code for i, code in enumerate(data.codes) if (i in (0, 5, 7) or i > 8) and last(code) == DAYS - 1)


class Rewritten(Data):
    """The data after the append, with one value before day T0 changed (history rewritten)."""

    def raw(self, code: str, field: str):
        raw = super().raw(code, field)
        if code == steady(self) and field == "close" and raw is not None:
            raw = raw.copy()
            raw[1 + T0 - 2 - int(raw[0])] *= 1.5
        return raw


class Stalled(Data):
    """One instrument's volume file did not grow with the others (its last value on day T0)."""

    def raw(self, code: str, field: str):
        raw = super().raw(code, field)
        if code == steady(self) and field == "volume" and raw is not None:
            raw = raw[:1 + T0 + 1 - int(raw[0])]
        return raw


def test_history_rewritten_before_the_last_day_is_refused(data, qlib_data, codes):
    from qlib.data.data import ExpressionD

    names = ["Mean($close, 5)", "$close / Ref($close, 3)"]
    blocks, _ = compute(data, names, codes, T0, checkpoint=True)
    saved = Checkpoint(names, 0, T0, [b.checkpoint for b in blocks])
    with pytest.raises(Unsupported, match="history"):
        list(features.extend_blocks(saved, T0 + 1, expression_of=ExpressionD.get_expression_instance,
                                    read=Rewritten(qlib_data, codes).reader(T0 + 1)))


@pytest.mark.parametrize("name", ["$close + $volume", "Mean($volume, 5)", "Corr($close, $volume, 5)",
                                  "$close > $volume", "Cov($close, $volume, 4)"])
def test_a_feature_file_that_did_not_grow_extends_as_the_full_computation_computes(qlib_data, codes, name):
    # aligned operators extend; what Qlib refuses on the new data (Corr, comparison of different indexes) too
    assert assert_extends(Stalled(qlib_data, codes), [name], codes) in ("equal", "unsupported")
    if name in ("$close + $volume", "Mean($volume, 5)", "Cov($close, $volume, 4)"):
        assert assert_extends(Stalled(qlib_data, codes), [name], codes) == "equal"
