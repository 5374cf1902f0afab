"""The records form of a dataset cache: segment files of columns behind a manifest, written and read back
row for row (by instrument, then day), trimmed to whole days, replaced atomically, and what a manifest no
longer lists deleted."""

import json

import numpy as np
import pytest

from qlib_server.state import records

CODES = ["SH600000", "SH600001", "SZ000002"]
COLUMNS = ["$close", "Mean($close,5)"]


def rows(days: int, first_day: int = 0, seed: int = 0):
    """Rows by code then day: every code on every day but SZ000002 on odd days."""
    stamps, which = [], []
    for i in range(3):
        for day in range(first_day, first_day + days):
            if i < 2 or day % 2 == 0:
                stamps.append(np.datetime64("2020-01-01", "us") + np.timedelta64(day, "D"))
                which.append(i)
    values = np.random.default_rng(seed).normal(size=(len(COLUMNS), len(which))).astype(np.float32)
    return np.array(stamps), np.array(which), values


def write_segment(cache, days, first_day=0, seed=0):
    stamps, which, values = rows(days, first_day, seed)
    segment = records.segment_path(cache)
    writer = records.Writer(segment, COLUMNS, CODES, "us", len(which))
    half = len(which) // 2 + 1  # a code's rows go on in the next part
    writer.add(stamps[:half], which[:half], values[:, :half])
    writer.add(stamps[half:], which[half:], values[:, half:])
    assert writer.close() == days
    return segment, (stamps, which, values)


def test_a_cache_of_one_segment_reads_back_row_for_row(tmp_path):
    cache = tmp_path / "c"
    segment, (stamps, which, values) = write_segment(cache, 10)
    records.publish(cache, [(segment, 10)])
    table = records.read(cache)
    datetime, instrument, got = table.take()
    assert np.array_equal(datetime, stamps) and np.array_equal(instrument, which)
    assert np.array_equal(got, values.T) and table.columns == COLUMNS and table.codes == CODES
    assert table.counts.tolist() == np.bincount(which).tolist() and len(table.days) == 10
    assert [(a, b) for _, a, b in table.select().pieces] == [(0, len(which))]  # all of it: one slice
    dates = table.select("2020-01-03", "2020-01-04")  # days 2 and 3: each code's rows of them
    assert dates.counts.tolist() == [2, 2, 1]
    assert [(a, b) for _, a, b in dates.pieces] == [(2, 4), (12, 14), (21, 22)]  # SZ000002: days 0, 2, ...
    assert table.select("2020-02-01", None).rows == 0 and table.take("2020-02-01", None)[2].shape == (0, 2)


def test_segments_trimmed_to_whole_days_read_as_one_table(tmp_path):
    cache = tmp_path / "c"
    base, (stamps, which, values) = write_segment(cache, 10)
    tail, (tail_stamps, tail_which, tail_values) = write_segment(cache, 4, first_day=8, seed=1)  # replaces 8, 9
    records.publish(cache, [(base, 8), (tail, 4)])
    table = records.read(cache)
    kept = stamps < tail_stamps.min()
    order = np.lexsort((np.concatenate([stamps[kept], tail_stamps]), np.concatenate([which[kept], tail_which])))
    assert len(table) == kept.sum() + len(tail_which) and len(table.days) == 12
    datetime, instrument, got = table.take()
    assert np.array_equal(datetime, np.concatenate([stamps[kept], tail_stamps])[order])
    assert np.array_equal(instrument, np.concatenate([which[kept], tail_which])[order])
    assert np.array_equal(got, np.concatenate([values[:, kept], tail_values], axis=1)[:, order].T)
    assert table.counts.tolist() == np.bincount(np.concatenate([which[kept], tail_which])).tolist()
    # days 6 and 7 of the first file, day 8 of the second: each code's rows of both, in turn
    assert [b - a for _, a, b in table.select("2020-01-07", "2020-01-09").pieces] == [2, 1, 2, 1, 1, 1]


def test_a_manifest_using_more_days_than_a_segment_holds_is_refused(tmp_path):
    cache = tmp_path / "c"
    segment, _ = write_segment(cache, 4)
    records.publish(cache, [(segment, 5)])
    with pytest.raises(ValueError, match="5 days used of 4"):
        records.read(cache)


@pytest.mark.parametrize("parts", ["by day", "a part before the one added last", "a day again"])
def test_rows_added_out_of_order_are_not_written(tmp_path, parts):
    cache = tmp_path / "c"
    stamps, which, values = rows(3)
    writer = records.Writer(records.segment_path(cache), COLUMNS, CODES, "us", len(which) + 10, at_most=True)
    if parts == "by day":  # not a records file's order
        order = np.argsort(stamps, kind="stable")
        writer.add(stamps[order], which[order], values[:, order])
    elif parts == "a part before the one added last":
        writer.add(stamps[3:], which[3:], values[:, 3:])
        writer.add(stamps[:3], which[:3], values[:, :3])
    else:  # SH600000's second day twice, each in its own part
        writer.add(stamps[:2], which[:2], values[:, :2])
        writer.add(stamps[1:], which[1:], values[:, 1:])
    with pytest.raises(ValueError, match="out of order"):
        writer.close()
    assert list(tmp_path.iterdir()) == []


def test_a_new_manifest_deletes_the_segments_it_no_longer_lists(tmp_path):
    cache = tmp_path / "c"
    old, _ = write_segment(cache, 6)
    records.publish(cache, [(old, 6)])
    new, (_, which, _) = write_segment(cache, 8, seed=2)
    records.publish(cache, [(new, 8)])
    assert records.segment_files(cache) == [new] and len(records.read(cache)) == len(which)


def test_a_segment_left_unfinished_is_abandoned_without_a_trace(tmp_path):
    cache = tmp_path / "c"
    writer = records.Writer(records.segment_path(cache), COLUMNS, CODES, "us", 10)
    stamps, which, values = rows(2)
    writer.add(stamps, which, values)
    with pytest.raises(ValueError, match="rows of 10 announced"):
        writer.close()
    assert list(tmp_path.iterdir()) == []


def test_records_of_an_earlier_layout_are_not_read_so_their_cache_is_computed_again(tmp_path):
    """Rows held row-major (format 3) or by day (format 4) would read as other rows: a manifest not of this
    layout is not this version's cache."""
    cache = tmp_path / "c"
    segment, (stamps, which, values) = write_segment(cache, 6)
    records.publish(cache, [(segment, 6)])
    assert records.of_this_layout(cache)
    assert np.array_equal(records.read(cache).take()[2], values.T)
    for earlier in ({"segments": [{"file": segment.name, "rows": len(which)}]},  # format 3
                    {"format": 4, "segments": [{"file": segment.name, "rows": len(which)}]}):  # rows by day
        records.path_of(cache).write_text(json.dumps(earlier))
        assert not records.of_this_layout(cache)
        with pytest.raises(ValueError, match="another layout"):
            records.read(cache)
