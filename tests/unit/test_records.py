"""The records form of a dataset cache: segment files of columns behind a manifest, written and read back
row for row, trimmed to whole days, replaced atomically, and what a manifest no longer lists deleted."""

import json

import numpy as np
import pytest

from qlib_server.state import records

CODES = ["SH600000", "SH600001", "SZ000002"]
COLUMNS = ["$close", "Mean($close,5)"]


def rows(days: int, first_day: int = 0, seed: int = 0):
    """Rows by day then code: every code on every day but SZ000002 on odd days."""
    stamps, which = [], []
    for day in range(first_day, first_day + days):
        for i in range(3):
            if i < 2 or day % 2 == 0:
                stamps.append(np.datetime64("2020-01-01", "us") + np.timedelta64(day, "D"))
                which.append(i)
    values = np.random.default_rng(seed).normal(size=(len(COLUMNS), len(which))).astype(np.float32)
    return np.array(stamps), np.array(which), values


def write_segment(cache, days, first_day=0, seed=0):
    stamps, which, values = rows(days, first_day, seed)
    segment = records.segment_path(cache)
    writer = records.Writer(segment, COLUMNS, CODES, "us", len(which))
    writer.add(stamps[: len(which) // 2], which[: len(which) // 2], values[:, : len(which) // 2])
    writer.add(stamps[len(which) // 2:], which[len(which) // 2:], values[:, len(which) // 2:])
    writer.close()
    return segment, (stamps, which, values)


def test_a_cache_of_one_segment_reads_back_row_for_row(tmp_path):
    cache = tmp_path / "c"
    segment, (stamps, which, values) = write_segment(cache, 10)
    records.publish(cache, [(segment, len(which))])
    table = records.read(cache)
    datetime, instrument, got = table.take(0, len(table))
    assert np.array_equal(datetime, stamps) and np.array_equal(instrument, which)
    assert np.array_equal(got, values.T) and table.columns == COLUMNS and table.codes == CODES
    assert table.counts.tolist() == np.bincount(which).tolist() and len(table.days) == 10
    first, stop = table.rows("2020-01-03", "2020-01-04")
    assert (first, stop) == (5, 10)  # days 0 and 1: 3 + 2 rows; days 2 and 3: 3 + 2 rows


def test_segments_trimmed_to_whole_days_read_as_one_table(tmp_path):
    cache = tmp_path / "c"
    base, (stamps, which, _) = write_segment(cache, 10)
    tail, (tail_stamps, tail_which, _) = write_segment(cache, 4, first_day=8, seed=1)  # replaces days 8 and 9
    used = int(np.searchsorted(stamps, tail_stamps[0]))
    records.publish(cache, [(base, used), (tail, len(tail_which))])
    table = records.read(cache)
    assert len(table) == used + len(tail_which) and len(table.days) == 12
    datetime, instrument, _ = table.take(0, len(table))
    assert np.array_equal(datetime, np.concatenate([stamps[:used], tail_stamps]))
    assert table.counts.tolist() == np.bincount(np.concatenate([which[:used], tail_which])).tolist()
    assert [(a, b) for _, a, b in table.pieces(used - 2, used + 3)] == [(used - 2, used), (0, 3)]


def test_rows_used_that_cut_a_day_are_refused(tmp_path):
    cache = tmp_path / "c"
    segment, _ = write_segment(cache, 4)
    records.publish(cache, [(segment, 4)])  # day 0 has 3 rows, day 1 has 2: row 4 is inside day 1
    with pytest.raises(ValueError, match="not whole days"):
        records.read(cache)


def test_a_new_manifest_deletes_the_segments_it_no_longer_lists(tmp_path):
    cache = tmp_path / "c"
    old, (_, which, _) = write_segment(cache, 6)
    records.publish(cache, [(old, len(which))])
    new, (_, which, _) = write_segment(cache, 8, seed=2)
    records.publish(cache, [(new, len(which))])
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
    """Rows held row-major (format 3, before the column-major layout) would read as other values: a manifest not
    of this layout is not this version's cache."""
    cache = tmp_path / "c"
    segment, (stamps, which, values) = write_segment(cache, 6)
    records.publish(cache, [(segment, len(which))])
    assert records.of_this_layout(cache)
    assert np.array_equal(records.read(cache).take(0, len(which))[2], values.T)
    records.path_of(cache).write_text(json.dumps({"segments": [{"file": segment.name, "rows": len(which)}]}))
    assert not records.of_this_layout(cache)
    with pytest.raises(ValueError, match="another layout"):
        records.read(cache)
