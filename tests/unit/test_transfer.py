"""Feature rows inline: a dataset cache streamed by ``qlib_server.front.transfer`` and read by the client
gives the frame Qlib reads from the same file; only the asked dates and fields travel."""

from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pandas as pd
import pandas.testing as pdt
import pyarrow as pa
import pytest
from qlib.data.cache import DiskDatasetCache

from qlib_server.client.connection import ServerConnection, same_host
from qlib_server.client.frames import datetime_unit, read_frame
from qlib_server.front import transfer
from qlib_server.protocol import request_id
from qlib_server.state import records

FIELDS = ["$close", "Mean($close,5)", "Ref($close,1)/$close-1"]


@pytest.fixture(autouse=True)
def closed_after():
    yield
    transfer._layouts.clear()


def write_cache(path, codes=("SH600000", "SZ000001", "SH6"), days=40, fields=FIELDS, frame=None,
                dates_unit="us", segments=1) -> None:
    """A cache in Qlib's layout (sorted by date, then instrument), as a processor writes it."""
    dates = pd.bdate_range("2019-01-01", periods=days).as_unit(dates_unit)
    index = pd.MultiIndex.from_product([dates, sorted(codes)], names=["datetime", "instrument"])
    rng = np.random.default_rng(0)
    if frame is None:
        frame = pd.DataFrame(rng.normal(size=(len(index), len(fields))).astype(np.float32), index=index,
                             columns=sorted(fields))
        frame.iloc[::7, 1] = np.nan
    else:
        frame.index = index
    with pd.HDFStore(path, mode="w") as store:
        store.append("df", frame, append=False)
    spans = pd.DataFrame({"start": np.arange(days, dtype=np.int32) * len(codes),
                          "end": np.arange(1, days + 1, dtype=np.int32) * len(codes)}, index=dates)
    spans.to_hdf(path.with_suffix(".index"), key="df", mode="w", format="table")
    path.with_suffix(".meta").write_bytes(pickle.dumps({"info": {"fields": list(frame.columns)}}))
    which = pd.factorize(frame.index.get_level_values("instrument"), sort=True)[0]
    write_segments(path, frame.index.get_level_values("datetime").to_numpy(), which, frame.to_numpy(np.float32),
                   list(frame.columns), sorted(codes), dates_unit, segments)


def write_segments(path, datetimes, which, values, columns, codes, unit, segments=1):
    """The cache's records (rows given by day, then instrument) in ``segments`` segments (cut at day boundaries),
    as extensions leave them, each holding its rows by instrument, then day; each segment file holds one extra
    day that the next segment replaces (its days used stop before it)."""
    days = np.unique(datetimes)
    cuts = [0] + [int(np.searchsorted(datetimes, days[len(days) * k // segments])) for k in range(1, segments)]
    cuts.append(len(which))
    listed = []
    for first, stop in zip(cuts, cuts[1:]):
        last = stop if stop == len(which) else int(np.searchsorted(datetimes, datetimes[stop], side="right"))
        order = first + np.lexsort((datetimes[first:last], which[first:last]))
        segment = records.segment_path(path)
        writer = records.Writer(segment, columns, codes, unit, last - first)
        writer.add(datetimes[order], which[order], values[order].T)
        writer.close()
        listed.append((segment, len(np.unique(datetimes[first:stop]))))
    records.publish(path, listed)


def served(path, fields, start, end, compression="lz4", unit=None) -> tuple[pd.DataFrame, bytes]:
    where = transfer.layout(path)
    data = b"".join(transfer.stream(where, transfer.cache_columns(fields), where.select(start, end), compression))
    return read_frame(io.BytesIO(data), fields, unit), data


@pytest.mark.parametrize("version, unit", [
    ("1.5.3", "ns"), ("2.0.0", "ns"), ("2.2.3", "ns"), ("2.3.3", "ns"), ("2.3.0.dev0+12.gabc", "ns"),
    ("3.0.0rc1", "us"), ("3.0.0", "us"), ("3.1.1", "us"), ("4.0.0", "us"),
])
def test_the_datetime_resolution_is_the_one_local_qlib_gets_on_each_pandas_version(version, unit):
    assert datetime_unit(version) == unit


def test_the_resolution_rule_is_how_this_pandas_indexes_a_frame_by_qlibs_calendar():
    # local Qlib's path: calendar file lines -> pd.Timestamp -> numpy object array -> a frame's index
    calendar = np.array([pd.Timestamp(line) for line in ("2019-01-02", "2019-01-03", "2019-01-03 09:31:00")])
    frame = pd.DataFrame({"$close": np.ones(3, dtype=np.float32)})
    frame.index = calendar[np.arange(3)]
    assert frame.index.dtype == np.dtype(f"datetime64[{datetime_unit(pd.__version__)}]")
    assert pd.concat({"SH600000": frame}, names=["instrument"]).index.levels[1].dtype == frame.index.dtype


@pytest.mark.parametrize("unit", ["ns", "us"])  # the rule of pandas 2, and of pandas 3
@pytest.mark.parametrize("stored", ["ns", "us", "s"])  # whatever the server's cache holds
def test_streamed_frames_get_the_datetime_resolution_of_the_clients_pandas(tmp_path, unit, stored):
    path = tmp_path / "abc"
    write_cache(path, dates_unit=stored)
    frame, _ = served(path, FIELDS, "2019-01-10", "2019-02-05", unit=unit)
    expected = DiskDatasetCache.read_data_from_cache(path, "2019-01-10", "2019-02-05", FIELDS)
    assert frame.index.levels[1].dtype == np.dtype(f"datetime64[{unit}]")
    assert list(frame.index.dtypes) == [expected.index.levels[0].dtype, np.dtype(f"datetime64[{unit}]")]
    expected.index = expected.index.set_levels(expected.index.levels[1].as_unit(unit), level=1)
    pdt.assert_frame_equal(frame, expected)  # levels with their dtypes, values, columns and dtypes
    assert frame.equals(expected)


@pytest.mark.parametrize("fields", [FIELDS, ["Ref($close, 1) / $close - 1", "$close"], ["$close", "$close"]])
@pytest.mark.parametrize("window", [(None, None), ("2019-01-10", "2019-02-05"), ("2019-01-15", None)])
def test_streamed_rows_read_as_the_frame_qlib_reads_from_the_file(tmp_path, fields, window):
    path = tmp_path / "abc"
    write_cache(path)
    frame, _ = served(path, fields, *window)
    pdt.assert_frame_equal(frame, DiskDatasetCache.read_data_from_cache(path, *window, fields))
    assert list(frame.columns) == fields and frame.index.names == ["instrument", "datetime"]


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_many_small_chunks_give_the_same_frame_zstd_and_uncompressed_too(tmp_path, monkeypatch, compression):
    path = tmp_path / "abc"
    write_cache(path, days=400)
    monkeypatch.setattr(transfer, "CHUNK_BYTES", 1)  # the smallest chunk: 1024 rows
    frame, data = served(path, FIELDS, None, None, compression=compression)
    batches = list(pa.ipc.open_stream(io.BytesIO(data)))
    assert len(batches) == 2 and max(b.num_rows for b in batches) == 1024
    pdt.assert_frame_equal(frame, DiskDatasetCache.read_data_from_cache(path, None, None, FIELDS))


def test_only_the_asked_dates_and_fields_are_sent(tmp_path):
    path = tmp_path / "abc"
    write_cache(path, days=400)
    _, everything = served(path, FIELDS, None, None)
    frame, part = served(path, ["$close"], "2019-03-01", "2019-03-08")
    table = pa.ipc.open_stream(io.BytesIO(part)).read_all()
    assert table.num_rows == 6 * 3 and table.column_names == ["datetime", "instrument", "block0"]
    assert table.schema.field("block0").metadata[b"columns"] == b'["$close"]'
    assert len(part) < len(everything) / 10 and len(frame) == 18


def test_a_window_with_no_rows_is_qlibs_empty_frame(tmp_path):
    path = tmp_path / "abc"
    write_cache(path)
    frame, _ = served(path, FIELDS, "2030-01-01", "2030-02-01")
    assert frame.empty and list(frame.columns) == FIELDS and frame.index.names == ["instrument", "datetime"]
    assert set(frame.dtypes) == {np.dtype(np.float32)}


def test_a_truncated_stream_is_an_error_not_a_short_frame(tmp_path):
    path = tmp_path / "abc"
    write_cache(path, days=400)
    _, data = served(path, FIELDS, None, None)
    with pytest.raises(OSError):  # ConnectionError when cut between batches
        read_frame(io.BytesIO(data[: len(data) // 2]), FIELDS)


def test_a_wide_cache_asked_for_a_subset_in_another_order_reads_as_qlib_reads_it(tmp_path):
    """Many fields (every column float32: Qlib casts each field to float32)."""
    path = tmp_path / "abc"
    wide = [f"Mean($close,{n})" for n in range(2, 87)]
    rng = np.random.default_rng(1)
    rows = 30 * 4
    frame = pd.DataFrame({f: rng.normal(size=rows).astype(np.float32) for f in sorted(wide + ["$volume"])})
    write_cache(path, codes=("SZ3", "SH1", "SH2", "SZ0"), days=30, frame=frame)
    asked = ["$volume", *wide[::-1][:43], wide[7]]
    for window in [(None, None), ("2019-01-08", "2019-01-31")]:
        got, data = served(path, asked, *window)
        pdt.assert_frame_equal(got, DiskDatasetCache.read_data_from_cache(path, *window, asked))
    assert len(pa.ipc.open_stream(io.BytesIO(data)).schema) == 2 + 45  # each column on its own


def test_a_stream_with_more_rows_of_an_instrument_than_announced_is_an_error(tmp_path):
    path = tmp_path / "abc"
    write_cache(path, days=10)
    where = transfer.layout(path)
    rows = where.records.select()
    announced = records.Selection(rows.pieces, rows.counts - np.array([1, 0, 0]))  # one row of SH6 too few
    with pytest.raises(ConnectionError):
        read_frame(io.BytesIO(b"".join(transfer.stream(where, ["$close"], announced, "lz4"))), ["$close"])


def test_pieces_made_ahead_in_a_thread_arrive_in_order_and_are_closed_when_the_reader_stops():
    spawn = transfer._spawner("threading")
    closed = []

    def pieces():
        try:
            yield from (bytes([i]) for i in range(10))
        finally:
            closed.append(True)

    assert b"".join(transfer.ahead(pieces(), spawn)) == bytes(range(10)) and closed == [True]
    early = transfer.ahead(pieces(), spawn)
    assert next(early) == b"\x00"
    early.close()
    assert closed == [True, True]


def test_the_client_compresses_feature_rows_only_when_the_server_is_on_another_host():
    assert same_host("127.0.0.1", 9710) and same_host("localhost", 9710)
    assert not same_host("192.0.2.1", 9710)  # TEST-NET-1: never this host
    assert not same_host("no-such-host.invalid", 9710)
    assert ServerConnection("localhost", 9710).compression == "none"
    assert ServerConnection("192.0.2.1", 9710).compression == "lz4"
    assert ServerConnection("localhost", 9710, compression="zstd").compression == "zstd"


def test_request_ids_are_short_strings_or_none():
    assert request_id({"head": {"version": "0.9.7", "id": "abc"}}) == "abc"
    assert request_id({"head": {"version": "0.9.7"}}) is None
    assert request_id({"head": {"id": "x" * 65}}) is None and request_id({"head": {"id": 5}}) is None
    assert request_id("junk") is None and request_id({"head": "junk"}) is None


@pytest.mark.parametrize("segments", [1, 3], ids=["one segment", "three segments"])
@pytest.mark.parametrize("compression", ["none", "lz4"])
def test_every_column_of_a_cache_asked_in_another_order_reads_as_qlib_reads_it(tmp_path, compression, segments):
    """Each column travels on its own, in the requested order (a repeated field once), compressed or not."""
    path = tmp_path / "abc"
    wide = [f"Mean($close,{n})" for n in range(2, 47)]
    rng = np.random.default_rng(2)
    frame = pd.DataFrame({f: rng.normal(size=30 * 4).astype(np.float32) for f in sorted(wide)})
    write_cache(path, codes=("SZ3", "SH1", "SH2", "SZ0"), days=30, frame=frame, segments=segments)
    assert len(transfer.layout(path).records.segments) == segments
    asked = [wide[3], *wide[::-1]]  # a repeated field, and an order that is not the file's
    for window in [(None, None), ("2019-01-08", "2019-01-31"), ("2019-01-21", "2019-01-28")]:
        got, data = served(path, asked, *window, compression=compression)
        pdt.assert_frame_equal(got, DiskDatasetCache.read_data_from_cache(path, *window, asked))
        schema = pa.ipc.open_stream(io.BytesIO(data)).schema
        assert [json.loads(f.metadata[b"columns"]) for f in list(schema)[2:]] == [[c] for c in dict.fromkeys(asked)]


def test_streamed_frames_hold_each_column_contiguous_as_qlibs_frames_do_so_reductions_give_the_same_bits(tmp_path):
    """Qlib builds a frame by ``pd.concat`` of each instrument's frame (a column per field): each column is
    contiguous, and ``frame.values`` is column-major. numpy sums an array's axis in an order that depends on
    its layout, so ``np.nanmean(frame.values, axis=0)`` (Qlib's ``ZScoreNorm.fit``) gives local Qlib's last bits
    only on local Qlib's layout."""
    path = tmp_path / "abc"
    wide = [f"Mean($close,{n})" for n in range(2, 51)]
    rng = np.random.default_rng(2)
    codes, days = ("SZ3", "SH1", "SH2"), 300
    frame = pd.DataFrame({f: (1 + rng.normal(size=days * len(codes)) / 100).astype(np.float32) for f in sorted(wide)})
    write_cache(path, codes=codes, days=days, frame=frame)
    got, _ = served(path, wide[::-1], None, None)
    by_code = [got.xs(code, level="instrument", drop_level=False) for code in sorted(codes)]
    qlibs = pd.concat([pd.DataFrame({f: part[f].to_numpy().copy() for f in got.columns}, index=part.index)
                       for part in by_code])
    assert qlibs.equals(got) and qlibs.to_numpy().flags.f_contiguous
    assert got.to_numpy().flags.f_contiguous and all(got[f].to_numpy().flags.c_contiguous for f in got.columns)
    assert np.array_equal(np.nanmean(got.to_numpy(), axis=0), np.nanmean(qlibs.to_numpy(), axis=0))


def test_a_stream_of_several_fields_per_list_from_a_server_of_an_earlier_version_reads_the_same_frame(tmp_path):
    """Servers before the column-major records sent the rows of several fields as one ``fixed_size_list`` (rows by
    day, then instrument): the client reads such streams too."""
    path = tmp_path / "abc"
    write_cache(path, days=30)
    where = transfer.layout(path)
    datetime, instrument, values = where.records.take()
    by_day = np.argsort(datetime, kind="stable")
    datetime, instrument, values = datetime[by_day], instrument[by_day], values[by_day]
    first, stop = 0, len(datetime)
    columns = sorted(transfer.cache_columns(FIELDS))
    schema = pa.schema([pa.field("datetime", pa.timestamp("us")), pa.field("instrument", pa.int32()),
                        pa.field("block0", pa.list_(pa.float32(), len(columns)), nullable=False,
                                 metadata={"columns": json.dumps(columns)})],
                       metadata={"rows": str(stop - first), "instruments": json.dumps(
                           [[c, int(n)] for c, n in zip(where.records.codes, where.records.counts.tolist())])})
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, schema) as writer:
        for a in range(0, stop - first, 37):
            rows = np.ascontiguousarray(values[a:a + 37, [where.position[c] for c in columns]])
            writer.write_batch(pa.RecordBatch.from_arrays(
                [pa.array(datetime[a:a + 37]), pa.array(instrument[a:a + 37]),
                 pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), len(columns))], schema=schema))
    got = read_frame(io.BytesIO(sink.getvalue()), FIELDS)
    assert got.equals(served(path, FIELDS, None, None)[0])
    pdt.assert_frame_equal(got, DiskDatasetCache.read_data_from_cache(path, None, None, FIELDS))


def test_rows_by_day_as_earlier_servers_send_them_read_as_the_frame_qlib_reads(tmp_path):
    """The server sends rows in the frame's order (by instrument, then day: each batch copied as a whole); rows
    by day, as servers before the instrument-major records sent them, give the same frame."""
    path = tmp_path / "abc"
    write_cache(path, days=30)
    where = transfer.layout(path)
    datetime, instrument, values = where.records.take()
    order = np.argsort(datetime, kind="stable")
    columns = list(where.records.columns)
    schema = pa.schema([pa.field("datetime", pa.timestamp("us")), pa.field("instrument", pa.int32())]
                       + [pa.field(f"block{k}", pa.list_(pa.float32(), 1), nullable=False,
                                   metadata={"columns": json.dumps([c])}) for k, c in enumerate(columns)],
                       metadata={"rows": str(len(order)), "instruments": json.dumps(
                           [[c, int(n)] for c, n in zip(where.records.codes, where.records.counts.tolist())])})
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, schema) as writer:
        for a in range(0, len(order), 29):
            rows = order[a:a + 29]
            writer.write_batch(pa.RecordBatch.from_arrays(
                [pa.array(datetime[rows]), pa.array(instrument[rows])]
                + [pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(values[rows, k])), 1)
                   for k in range(len(columns))], schema=schema))
    got = read_frame(io.BytesIO(sink.getvalue()), FIELDS)
    assert got.equals(served(path, FIELDS, None, None)[0])
    pdt.assert_frame_equal(got, DiskDatasetCache.read_data_from_cache(path, None, None, FIELDS))


def test_the_values_of_a_column_of_lists_are_read_as_pyarrow_flattens_them_and_a_null_row_is_refused():
    from qlib_server.client.frames import _flat

    lists = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(12, dtype=np.float32)), 3)
    for part in (lists, lists.slice(1, 2), lists.slice(3)):
        assert _flat(part).equals(part.flatten())
    with pytest.raises(ConnectionError, match="null row"):
        _flat(pa.array([[1.0, 2.0], None], type=pa.list_(pa.float32(), 2)))
