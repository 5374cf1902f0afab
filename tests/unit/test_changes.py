"""Telling a daily update (an append: extend the cache) from a change of the past (recompute it), from the
record of a cache's sources (stats as ``cache_sources`` takes them, and :func:`changes.digests`), and the
data updates of :mod:`qlib_server.datagen_updates` that make each kind of change."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qlib_server.datagen import generate_dataset
from qlib_server.datagen_updates import (
    add_field,
    append_days,
    change_factor,
    delist_instrument,
    list_instrument,
    read_bin,
    read_calendar,
    read_spans,
    rewrite_value,
)
from qlib_server.worker.changes import APPEND, CURRENT, REWRITE, classify, digests
from qlib_server.worker.datacache import cache_sources

FIELDS = ["$open", "$close", "$high", "$low", "$volume", "$vwap", "$factor", "Ref($change, 1)"]
MARKET = {"market": "csi300", "filter_pipe": []}
DAYS = 120
CSI300 = "instruments/csi300.txt"


def make_data(root: Path) -> Path:
    """12 instruments over 120 days; csi300 lists 9 (SH600000 and SZ000007 delisted on 2018-05-29, before
    the last day 2018-06-18; SZ000001 to SZ000003 one span each; the later ones two)."""
    return generate_dataset(root, instruments=12, days=DAYS)


def age(root: Path) -> None:
    """Date every file a day back, as data written by yesterday's update: any write now changes the mtime."""
    past = time.time_ns() - 86_400 * 10**9
    for path in root.rglob("*"):
        if path.is_file():
            os.utime(path, ns=(past, past))


def record(root: Path, fields=FIELDS) -> tuple[dict, dict]:
    """A cache's record of its sources, as stored (through JSON)."""
    age(root)
    files = cache_sources(root, MARKET, fields, "day")
    return json.loads(json.dumps(files)), json.loads(json.dumps(digests(root, files)))


@pytest.fixture
def data(tmp_path):
    return make_data(tmp_path / "data")


def replace_line(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


# -- the daily update --------------------------------------------------------------------------------

def test_a_cache_whose_files_are_untouched_is_current(data):
    files, sums = record(data)
    assert classify(files, sums, data).kind == CURRENT


@pytest.mark.parametrize("days", [1, 5])
def test_days_appended_by_the_daily_update_are_an_append_of_those_days(data, days):
    files, sums = record(data)
    before = read_calendar(data)
    append_days(data, days)
    change = classify(files, sums, data)
    assert change.kind == APPEND, change.reason
    assert (change.old_length, change.new_length) == (DAYS, DAYS + days)
    assert change.new_days == tuple(read_calendar(data)[DAYS:]) and len(change.new_days) == days
    assert change.new_days[0] > before[-1]
    # 7 listed instruments trading on x 8 raw fields grown; 7 spans in csi300 extended
    assert f"{days} day(s) appended" in change.reason and "56 files grown, 7 spans extended" in change.reason


def test_append_days_grows_what_trades_on_the_last_day_and_leaves_delisted_instruments_alone(data):
    stat = {p: p.stat() for p in data.rglob("*.bin")}
    append_days(data, 3)
    calendar = read_calendar(data)
    assert len(calendar) == DAYS + 3
    for path, before in stat.items():
        start, values = read_bin(path)
        trades = path.parent.name not in ("sh600000", "sz000007")
        assert path.stat().st_size == before.st_size + (12 if trades else 0), path
        assert calendar[start + len(values) - 1] == ("2018-06-21" if trades else "2018-05-29")
    close = read_bin(data / "features" / "sz000003" / "close.day.bin")[1]
    assert np.isfinite(close).all() and (close > 0).all()
    for market in ("all", "csi300", "csi100"):
        spans = read_spans(data / "instruments" / f"{market}.txt")
        assert all(end in ("2018-05-29", "2018-06-21") or end < "2018-05-29" for _, _, end in spans)
        assert not any(end == "2018-06-18" for _, _, end in spans)
    assert ["SZ000007", "2018-04-10", "2018-05-29"] in read_spans(data / "instruments" / "csi300.txt")


def test_the_data_updates_are_deterministic(tmp_path):
    def updated(root):
        make_data(root)
        append_days(root, 2, seed=4)
        list_instrument(root, "csi300", "SZ000099", first_day=60)
        change_factor(root, "SZ000003", 90, 2.0)
        add_field(root, "turnover")
        return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    assert updated(tmp_path / "a") == updated(tmp_path / "b")


def test_an_instrument_delisted_before_the_old_last_day_does_not_stop_an_append(data):
    files, sums = record(data)
    delisted = "features/sz000007/close.day.bin"
    append_days(data, 1)
    assert (data / delisted).stat().st_size == files[delisted][0]  # no value after its last day
    assert classify(files, sums, data).kind == APPEND


def test_a_suspended_instrument_whose_files_did_not_grow_is_still_an_append(data):
    files, sums = record(data)
    append_days(data, 2, suspended=["SZ000003"])
    assert (data / "features/sz000003/close.day.bin").stat().st_size == files["features/sz000003/close.day.bin"][0]
    assert ["SZ000003", "2018-01-02", "2018-06-20"] in read_spans(data / CSI300)
    change = classify(files, sums, data)
    assert change.kind == APPEND and change.new_length == DAYS + 2, change.reason


def test_a_value_rewritten_on_a_new_day_is_part_of_the_append(data):
    files, sums = record(data)
    append_days(data, 2)
    rewrite_value(data, "SZ000003", "close", DAYS + 1, 7.5)  # new rows are computed from the files as they are
    assert classify(files, sums, data).kind == APPEND


def test_an_update_seen_half_done_is_caught_as_a_rewrite_once_it_is_finished(data):
    """The calendar written first: the cache is extended without one instrument's values (as if suspended);
    once its files grow, the values land on a day that is old for the extended cache's record."""
    files, sums = record(data)
    append_days(data, 1, suspended=["SZ000003"])
    assert classify(files, sums, data).kind == APPEND
    files, sums = record(data)  # the extended cache's record
    path = data / "features/sz000003/close.day.bin"
    with open(path, "ab") as f:
        np.array([10.0], "<f4").tofile(f)
    change = classify(files, sums, data)
    assert change.kind == REWRITE
    assert change.reason == "features/sz000003/close.day.bin: values added after 2018-06-18, before the old " \
                            "last day 2018-06-19"


# -- the same bytes ----------------------------------------------------------------------------------

def test_files_touched_with_their_bytes_unchanged_are_an_append_of_no_days(data):
    """``current`` means the record holds; a new mtime over the same bytes changes no row: the caller
    re-records (an append of nothing)."""
    files, sums = record(data)
    os.utime(data / "features/sz000003/close.day.bin")
    (data / CSI300).write_text((data / CSI300).read_text())  # the market file rewritten with the same content
    change = classify(files, sums, data)
    assert change.kind == APPEND and change.new_days == () and change.old_length == change.new_length == DAYS
    assert change.reason == "no day appended: 0 files grown past the calendar, 1 touched (same bytes)"


def test_a_market_file_rewritten_with_the_same_content_during_an_update_is_still_an_append(data):
    files, sums = record(data)
    append_days(data, 1)
    (data / CSI300).write_text((data / CSI300).read_text())
    assert classify(files, sums, data).kind == APPEND


def test_values_appended_past_the_end_of_the_calendar_change_no_row(data):
    files, sums = record(data)
    with open(data / "features/sz000003/close.day.bin", "ab") as f:
        np.array([10.0, 11.0], "<f4").tofile(f)
    change = classify(files, sums, data)
    assert change.kind == APPEND and change.new_days == ()


def test_a_same_size_rewrite_that_keeps_its_mtime_is_not_seen_as_the_stats_decide_current(data):
    """A documented limit, as for ``is_current``: a checker reading every byte on every look would not have it."""
    files, sums = record(data)
    path = data / "features/sz000003/close.day.bin"
    mtime = path.stat().st_mtime_ns
    rewrite_value(data, "SZ000003", "close", 50, 1.0)
    os.utime(path, ns=(mtime, mtime))
    assert classify(files, sums, data).kind == CURRENT


# -- changes of the past -----------------------------------------------------------------------------

def test_a_value_rewritten_in_the_past_is_a_rewrite_naming_its_file(data):
    files, sums = record(data)
    rewrite_value(data, "SH600002", "factor", 50, 3.0)
    change = classify(files, sums, data)
    assert change.kind == REWRITE
    assert change.reason == "features/sh600002/factor.day.bin: value rewritten in its first 484 bytes"


def test_a_value_rewritten_in_the_past_during_a_daily_update_is_a_rewrite(data):
    files, sums = record(data)
    append_days(data, 1)
    rewrite_value(data, "SH600002", "close", DAYS - 1, 3.0)
    change = classify(files, sums, data)
    assert change.kind == REWRITE
    assert change.reason == "features/sh600002/close.day.bin: value rewritten in its first 484 bytes"


def test_a_value_rewritten_outside_an_instruments_days_is_refused(data):
    with pytest.raises(IndexError):
        rewrite_value(data, "SH600000", "close", DAYS - 1, 1.0)  # delisted on day 101


@pytest.mark.parametrize("fields, first", [(FIELDS, "change"), (["$factor"], "factor")])
def test_an_adjustment_factor_changed_in_the_past_is_a_rewrite(data, fields, first):
    files, sums = record(data, fields)
    before = {f: read_bin(data / "features/sz000003" / f"{f}.day.bin")[1] for f in ("close", "volume", "factor",
                                                                                     "change")}
    change_factor(data, "SZ000003", 80, 2.0)
    after = {f: read_bin(data / "features/sz000003" / f"{f}.day.bin")[1] for f in before}
    np.testing.assert_allclose(after["close"][80:], before["close"][80:] * 2, rtol=1e-6)
    np.testing.assert_allclose(after["volume"][80:], before["volume"][80:] / 2, rtol=1e-6)
    np.testing.assert_array_equal(after["close"][:80], before["close"][:80])
    np.testing.assert_allclose(after["factor"][80:] * (after["volume"][80:]), before["factor"][80:] *
                               before["volume"][80:], rtol=1e-6)  # the raw volume is unchanged
    assert after["change"][80] == pytest.approx(after["close"][80] / after["close"][79] - 1, rel=1e-5)
    np.testing.assert_array_equal(after["change"][81:], before["change"][81:])
    change = classify(files, sums, data)
    assert change.kind == REWRITE
    assert change.reason == f"features/sz000003/{first}.day.bin: value rewritten in its first 484 bytes"


def test_an_instrument_listed_in_the_market_is_a_rewrite(data):
    files, sums = record(data)
    list_instrument(data, "csi300", "SZ000099", first_day=60)
    calendar = read_calendar(data)
    assert ["SZ000099", calendar[60], calendar[-1]] in read_spans(data / "instruments" / "all.txt")
    assert read_bin(data / "features/sz000099/volume.day.bin")[0] == 60
    change = classify(files, sums, data)
    assert (change.kind, change.reason) == (REWRITE, "instruments/csi300.txt: SZ000099 added")


def test_an_instrument_of_another_market_joining_this_one_is_a_rewrite(data):
    files, sums = record(data)
    size = (data / "features/sz000011/close.day.bin").stat().st_size
    list_instrument(data, "csi300", "SZ000011", first_day=100)
    assert (data / "features/sz000011/close.day.bin").stat().st_size == size  # its files are kept
    assert classify(files, sums, data).reason == "instruments/csi300.txt: SZ000011 added"


def test_an_instrument_listed_on_a_new_day_is_a_rewrite(data):
    files, sums = record(data)
    append_days(data, 1)
    list_instrument(data, "csi300", "SZ000099", first_day=DAYS)
    assert classify(files, sums, data).reason == "instruments/csi300.txt: SZ000099 added"


def test_an_instrument_removed_from_the_market_is_a_rewrite(data):
    files, sums = record(data)
    delist_instrument(data, "csi300", "SZ000003")
    change = classify(files, sums, data)
    assert (change.kind, change.reason) == (REWRITE, "instruments/csi300.txt: SZ000003 no longer listed")


def test_an_instrument_whose_span_ends_earlier_is_a_rewrite(data):
    files, sums = record(data)
    delist_instrument(data, "csi300", "SZ000003", last_day=100)
    change = classify(files, sums, data)
    assert change.kind == REWRITE
    assert change.reason == f"instruments/csi300.txt: the span of SZ000003 now ends on {read_calendar(data)[100]}, " \
                            "not 2018-06-18"


def test_an_instrument_delisted_on_the_old_last_day_during_a_daily_update_is_still_an_append(data):
    """Its span was not extended: the new rows are computed without it, the old ones are unchanged."""
    files, sums = record(data)
    append_days(data, 2)
    delist_instrument(data, "csi300", "SH600004", last_day=DAYS - 1)
    assert classify(files, sums, data).kind == APPEND


def test_an_instrument_delisted_before_the_old_last_day_during_a_daily_update_is_a_rewrite(data):
    files, sums = record(data)
    append_days(data, 2)
    delist_instrument(data, "csi300", "SH600004", last_day=DAYS - 2)
    change = classify(files, sums, data)
    assert change.kind == REWRITE
    assert change.reason == "instruments/csi300.txt: the span of SH600004 now ends on 2018-06-15, not 2018-06-18"


def test_a_second_span_removed_is_a_rewrite(data):
    files, sums = record(data)
    delist_instrument(data, "csi300", "SH600004", last_day=60)  # its second span starts on day 80
    change = classify(files, sums, data)
    assert change.kind == REWRITE
    assert change.reason.startswith("instruments/csi300.txt: spans changed other than by extending")


def test_a_field_file_added_that_the_cache_reads_is_a_rewrite(data):
    files, sums = record(data, [*FIELDS, "$turnover"])
    assert files["features/sh600000/turnover.day.bin"] is None
    add_field(data, "turnover")
    change = classify(files, sums, data)
    assert (change.kind, change.reason) == (REWRITE, "features/sh600000/turnover.day.bin: appeared")


def test_a_field_file_added_that_the_cache_does_not_read_changes_nothing(data):
    files, sums = record(data)
    add_field(data, "turnover")
    assert classify(files, sums, data).kind == CURRENT


# -- the calendar ------------------------------------------------------------------------------------

def test_a_calendar_changed_in_the_middle_is_a_rewrite(data):
    files, sums = record(data)
    replace_line(data / "calendars/day.txt", "2018-03-01\n", "2018-03-03\n")
    change = classify(files, sums, data)
    assert (change.kind, change.reason) == (REWRITE, "calendars/day.txt: a day rewritten in its first 1320 bytes")


def test_a_calendar_changed_in_the_middle_during_a_daily_update_is_a_rewrite(data):
    files, sums = record(data)
    append_days(data, 1)
    replace_line(data / "calendars/day.txt", "2018-03-01\n", "2018-03-03\n")
    assert classify(files, sums, data).reason == "calendars/day.txt: a day rewritten in its first 1320 bytes"


def test_a_day_appended_out_of_order_is_a_rewrite(data):
    files, sums = record(data)
    with open(data / "calendars/day.txt", "a") as f:
        f.write("2018-06-10\n")
    assert classify(files, sums, data).reason == "calendars/day.txt: day 2018-06-10 appended after 2018-06-18"


def test_a_calendar_without_a_final_newline_may_grow_by_whole_lines_only(data):
    calendar = data / "calendars/day.txt"
    calendar.write_text(calendar.read_text().rstrip("\n"))
    files, sums = record(data)
    with open(calendar, "a") as f:
        f.write("\n2018-06-19\n")
    assert classify(files, sums, data).new_days == ("2018-06-19",)
    calendar.write_text(calendar.read_text().replace("2018-06-18\n2018-06-19\n", "2018-06-18 15:00:00\n"))
    change = classify(files, sums, data)
    assert (change.kind, change.reason) == (REWRITE, "calendars/day.txt: its last day 2018-06-18 rewritten as "
                                                     "2018-06-18 15:00:00")


def test_a_calendar_that_shrank_or_vanished_is_a_rewrite(data):
    files, sums = record(data)
    calendar = data / "calendars/day.txt"
    calendar.write_text("\n".join(read_calendar(data)[:-1]) + "\n")
    assert classify(files, sums, data).reason == "calendars/day.txt: shrank from 1320 to 1309 bytes"
    calendar.unlink()
    assert classify(files, sums, data).reason == "calendars/day.txt: vanished"


# -- spans -------------------------------------------------------------------------------------------

def test_a_span_extended_beyond_the_new_last_day_is_a_rewrite(data):
    files, sums = record(data)
    append_days(data, 1)
    replace_line(data / CSI300, "SZ000003\t2018-01-02\t2018-06-19", "SZ000003\t2018-01-02\t2018-06-29")
    change = classify(files, sums, data)
    assert change.reason == ("instruments/csi300.txt: the span of SZ000003 ends on 2018-06-29, after the "
                             "calendar's last day 2018-06-19")


def test_a_span_that_ended_before_the_old_last_day_extended_to_a_new_day_is_a_rewrite(data):
    files, sums = record(data)
    append_days(data, 1)
    replace_line(data / CSI300, "SZ000007\t2018-04-10\t2018-05-29", "SZ000007\t2018-04-10\t2018-06-19")
    change = classify(files, sums, data)
    assert change.kind == REWRITE
    assert change.reason.startswith("instruments/csi300.txt: spans changed other than by extending those that "
                                    "ended on 2018-06-18")


def test_a_span_added_from_a_new_day_is_a_rewrite(data):
    files, sums = record(data)
    append_days(data, 1)
    with open(data / CSI300, "a") as f:
        f.write("SZ000007\t2018-06-19\t2018-06-19\n")
    assert classify(files, sums, data).reason == "instruments/csi300.txt: a span of SZ000007 added from 2018-06-19"


def test_a_span_extended_while_the_calendar_did_not_grow_is_a_rewrite(data):
    files, sums = record(data)
    replace_line(data / CSI300, "SZ000003\t2018-01-02\t2018-06-18", "SZ000003\t2018-01-02\t2018-06-19")
    assert classify(files, sums, data).kind == REWRITE


# -- feature files -----------------------------------------------------------------------------------

def test_a_feature_file_grown_by_part_of_a_value_is_a_rewrite(data):
    files, sums = record(data)
    with open(data / "features/sz000003/close.day.bin", "ab") as f:
        f.write(b"\0\0")
    assert classify(files, sums, data).reason == ("features/sz000003/close.day.bin: grew from 484 to 486 bytes, "
                                                  "not by whole values after a start index")


def test_values_added_to_an_instrument_delisted_before_the_old_last_day_are_a_rewrite(data):
    files, sums = record(data)
    append_days(data, 1)
    with open(data / "features/sz000007/close.day.bin", "ab") as f:
        np.array([10.0], "<f4").tofile(f)
    assert classify(files, sums, data).reason == ("features/sz000007/close.day.bin: values added after 2018-05-29, "
                                                  "before the old last day 2018-06-18")


def test_a_feature_file_that_shrank_or_vanished_is_a_rewrite(data):
    files, sums = record(data)
    path = data / "features/sz000003/close.day.bin"
    path.write_bytes(path.read_bytes()[:-4])
    assert classify(files, sums, data).reason == "features/sz000003/close.day.bin: shrank from 484 to 480 bytes"
    path.unlink()
    assert classify(files, sums, data).reason == "features/sz000003/close.day.bin: vanished"


def test_a_feature_file_whose_start_index_changed_is_a_rewrite(data):
    files, sums = record(data)
    path = data / "features/sz000003/close.day.bin"
    values = np.fromfile(path, "<f4")
    values[0] = 1
    values.tofile(path)
    assert classify(files, sums, data).reason == "features/sz000003/close.day.bin: value rewritten in its first " \
                                                 "484 bytes"


def test_a_changed_file_without_a_recorded_digest_is_a_rewrite(data):
    files, _ = record(data)
    assert classify(files, {}, data).kind == CURRENT
    append_days(data, 1)
    assert classify(files, {}, data).reason == "calendars/day.txt: changed, and no digest of it was recorded"


def test_point_in_time_files_changed_in_any_way_are_a_rewrite(data):
    pit = data / "financial/sz000003"
    pit.mkdir(parents=True)
    (pit / "roewa_q.data").write_bytes(b"\1" * 64)
    (pit / "roewa_q.index").write_bytes(b"\2" * 16)
    files, sums = record(data, ["$close", "P($$roewa_q)"])
    assert "financial/sz000003/roewa_q.data" in files
    os.utime(pit / "roewa_q.index")
    assert classify(files, sums, data).kind == APPEND  # touched
    with open(pit / "roewa_q.data", "ab") as f:
        f.write(b"\3" * 16)
    assert classify(files, sums, data).reason == ("financial/sz000003/roewa_q.data: grew from 64 to 80 bytes (only "
                                                  "feature files are appended to)")


def test_the_digests_name_missing_files_none_and_follow_the_bytes(data):
    names = ["calendars/day.txt", "features/sz000003/close.day.bin", "features/nothing/close.day.bin"]
    first = digests(data, names)
    assert first["features/nothing/close.day.bin"] is None and len(set(first.values())) == 3
    assert digests(data, names) == first
    rewrite_value(data, "SZ000003", "close", 10, 1.0)
    assert digests(data, names)["features/sz000003/close.day.bin"] != first["features/sz000003/close.day.bin"]


# -- any sequence of updates -------------------------------------------------------------------------

OPERATIONS = st.lists(st.one_of(
    st.tuples(st.just("append"), st.integers(1, 3)),
    st.tuples(st.just("rewrite"), st.integers(0, 8), st.sampled_from(["close", "factor", "volume"]),
              st.integers(0, 10_000)),
    st.tuples(st.just("list"), st.integers(0, DAYS - 1)),
    st.tuples(st.just("delist"), st.integers(0, 8), st.booleans()),
    st.tuples(st.just("factor"), st.integers(0, 8), st.integers(0, 10_000), st.sampled_from([1.25, 2.0])),
    st.tuples(st.just("field"),),
), min_size=1, max_size=5)


def apply(root: Path, codes: list[str], operation: tuple, listed: list) -> None:
    """One update that changes the cache's data (each kind of change made so that it does change it)."""
    kind, *args = operation
    if kind == "append":
        append_days(root, args[0], seed=args[0])
    elif kind in ("rewrite", "factor"):
        code = codes[args[0]]
        start, values = read_bin(root / "features" / code.lower() / "close.day.bin")
        day = start + args[2 if kind == "rewrite" else 1] % min(len(values), DAYS - start)  # an old day
        if kind == "rewrite":
            rewrite_value(root, code, args[1], day, -1.0 - args[2])  # no value is negative but change
        else:
            change_factor(root, code, day, args[2])
    elif kind == "list":
        listed.append(f"SZ{900000 + len(listed)}")
        list_instrument(root, "csi300", listed[-1], first_day=args[0])
    elif kind == "delist":
        code, cut = codes[args[0]], args[1]
        spans = [s for s in read_spans(root / CSI300) if s[0] == code]
        if cut and spans:  # its last span ends a day earlier, and before the old last day
            delist_instrument(root, "csi300", code, min(read_calendar(root).index(spans[-1][2]), DAYS - 1) - 1)
        else:
            delist_instrument(root, "csi300", code)
    else:
        add_field(root, "turnover")


@settings(deadline=None)
@given(operations=OPERATIONS)
def test_any_sequence_of_updates_is_an_append_if_and_only_if_it_only_appended_days(operations):
    with tempfile.TemporaryDirectory() as directory:
        root = make_data(Path(directory) / "data")
        files, sums = record(root, [*FIELDS, "$turnover"])
        codes = [line.split()[0] for line in (root / CSI300).read_text().splitlines()]
        codes = list(dict.fromkeys(codes))
        listed: list[str] = []
        for operation in operations:
            apply(root, codes, operation, listed)
        change = classify(files, sums, root)
        appended = sum(o[1] for o in operations if o[0] == "append")
        if all(o[0] == "append" for o in operations):
            assert change.kind == APPEND, change.reason
            assert change.new_length == DAYS + appended and len(change.new_days) == appended
        else:
            assert change.kind == REWRITE, (operations, change)
