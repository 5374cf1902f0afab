"""Feature rows where they lie: a client on the server's host maps the dataset cache's files
(``qlib_server.front.placement``, ``qlib_server.client.placed``) and gets the frame Qlib reads from the same
cache, the streamed frame bit for bit, with nothing copied where the rows are one run of one file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pandas.testing as pdt
import pytest
from qlib.data.cache import DiskDatasetCache
from test_transfer import FIELDS, served, write_cache

from qlib_server.client.placed import Unplaceable, read_placed
from qlib_server.front import transfer
from qlib_server.front.placement import placement
from qlib_server.state import records


@pytest.fixture(autouse=True)
def closed_after():
    yield
    transfer._layouts.clear()


def placed_answer(path, fields, start=None, end=None) -> dict:
    """The placement the server answers, through JSON as it travels."""
    where = transfer.layout(path)
    return json.loads(json.dumps(placement(where, transfer.cache_columns(fields), where.select(start, end))))


def placed(path, fields, start=None, end=None, unit="us") -> pd.DataFrame:
    return read_placed(placed_answer(path, fields, start, end), fields, unit)


@pytest.mark.parametrize("segments", [1, 3], ids=["one segment", "three segments"])
@pytest.mark.parametrize("fields", [FIELDS, ["Ref($close, 1) / $close - 1", "$close"], ["$close", "$close"]])
@pytest.mark.parametrize("window", [(None, None), ("2019-01-10", "2019-02-05"), ("2019-01-15", None)])
def test_mapped_rows_read_as_the_frame_qlib_reads_and_the_streamed_frame(tmp_path, fields, window, segments):
    path = tmp_path / "abc"
    write_cache(path, segments=segments)
    frame = placed(path, fields, *window)
    expected = DiskDatasetCache.read_data_from_cache(path, *window, fields)
    pdt.assert_frame_equal(frame, expected)
    assert frame.equals(expected) and list(frame.columns) == fields
    streamed, _ = served(path, fields, *window, unit="us")
    assert frame.equals(streamed) and list(frame.index.dtypes) == list(streamed.index.dtypes)


@pytest.mark.parametrize("unit", ["ns", "us"])
def test_mapped_frames_get_the_datetime_resolution_of_the_clients_pandas(tmp_path, unit):
    path = tmp_path / "abc"
    write_cache(path, dates_unit="s")
    assert placed(path, FIELDS, unit=unit).index.levels[1].dtype == np.dtype(f"datetime64[{unit}]")


def test_a_whole_cache_of_one_file_is_a_copy_on_write_view_of_it(tmp_path):
    path = tmp_path / "abc"
    write_cache(path, days=50)
    frame = placed(path, FIELDS)
    values = frame.to_numpy()
    assert not values.flags.owndata  # a view (read-only, as pandas hands out every frame's values)
    segment = records.read(path).segments[0]
    before = np.array(segment.values)
    frame.iloc[0, 0] = 12345.0  # this process's copy only: the file (and every other reader) keeps its values
    assert frame.iloc[0, 0] == np.float32(12345.0)
    transfer._layouts.clear()
    assert np.array_equal(records.read(path).segments[0].values, before, equal_nan=True)
    assert placed(path, FIELDS).equals(DiskDatasetCache.read_data_from_cache(path, None, None, FIELDS))


def test_a_cache_written_as_computed_with_room_to_spare_reads_with_each_column_contiguous(tmp_path):
    """A worker writes a cache as the engine computes it, with room for as many rows as the market may have:
    a column's rows are followed by room. The mapped frame holds each column contiguous, as Qlib's frames do,
    so ``np.nanmean(frame.values, axis=0)`` (Qlib's ``ZScoreNorm.fit``) gives local Qlib's bits."""
    path = tmp_path / "abc"
    wide = [f"Mean($close,{n})" for n in range(2, 41)]
    rng = np.random.default_rng(5)
    codes, days = ("SZ3", "SH1", "SH2"), 200
    frame = pd.DataFrame({f: (1 + rng.normal(size=days * len(codes)) / 100).astype(np.float32) for f in sorted(wide)})
    write_cache(path, codes=codes, days=days, frame=frame)
    dense = records.read(path)
    sparse = records.segment_path(path)
    writer = records.Writer(sparse, dense.columns, dense.codes, dense.unit, 2 * len(dense), at_most=True)
    segment = dense.segments[0]
    writer.add(segment.datetime, segment.instrument, segment.values)
    records.publish(path, [(sparse, writer.close())])
    transfer._layouts.clear()
    assert records.read(path).segments[0].stride == 2 * len(dense)
    got = placed(path, wide[::-1])
    streamed, _ = served(path, wide[::-1], None, None, unit="us")
    assert got.equals(streamed) and streamed.to_numpy().flags.f_contiguous
    assert all(got[f].to_numpy().flags.c_contiguous for f in got.columns)
    assert np.array_equal(np.nanmean(got.to_numpy(), axis=0), np.nanmean(streamed.to_numpy(), axis=0))


def test_a_file_replaced_or_gone_is_not_read(tmp_path):
    path = tmp_path / "abc"
    write_cache(path)
    answer = placed_answer(path, FIELDS)
    file = answer["files"][0]
    file["identity"][3] += 1  # another file of the same name (as another host, or a container, would see)
    with pytest.raises(Unplaceable, match="not the file the server named"):
        read_placed(answer, FIELDS, "us")
    os.unlink(file["path"])
    with pytest.raises(FileNotFoundError):
        read_placed(placed_answer(path, FIELDS), FIELDS, "us")


def test_a_placement_names_by_absolute_path_only_the_files_its_rows_lie_in(tmp_path, monkeypatch):
    """A client in another directory than the server's (a relative ``provider_uri``) still finds the files;
    a window in the last of three segments names that one file, not the two it does not read."""
    monkeypatch.chdir(tmp_path)
    write_cache(tmp_path / "abc", segments=3)
    whole = placed_answer(Path("abc"), FIELDS)
    assert len(whole["files"]) == 3 and all(os.path.isabs(f["path"]) for f in whole["files"])
    last_days = placed_answer(Path("abc"), FIELDS, "2019-02-20", None)
    assert [f["path"] for f in last_days["files"]] == [whole["files"][2]["path"]]
    monkeypatch.chdir("/")
    expected = DiskDatasetCache.read_data_from_cache(tmp_path / "abc", "2019-02-20", None, FIELDS)
    assert read_placed(last_days, FIELDS, "us").equals(expected)


@pytest.mark.parametrize("damage", [
    lambda a: a["pieces"][0].__setitem__(2, 10 ** 9),  # beyond the file
    lambda a: a["pieces"][0].__setitem__(1, -1),
    lambda a: a["pieces"].append([5, 0, 1]),  # no such file
    lambda a: a["columns"].__setitem__(0, -1),
    lambda a: a["columns"].__setitem__(0, 10 ** 6),
    lambda a: a.__setitem__("rows", a["rows"] + 1),
    lambda a: a.pop("files"),
    lambda a: a.__setitem__("files", "junk"),
], ids=["past the end", "before the start", "no such file", "negative column", "column past the end",
        "rows", "no files", "junk files"])
def test_a_placement_that_does_not_fit_its_files_is_refused_not_read(tmp_path, damage):
    path = tmp_path / "abc"
    write_cache(path)
    answer = placed_answer(path, FIELDS)
    damage(answer)
    with pytest.raises(Unplaceable):
        read_placed(answer, FIELDS, "us")


def test_a_window_with_no_rows_is_qlibs_empty_frame(tmp_path):
    path = tmp_path / "abc"
    write_cache(path)
    frame = placed(path, FIELDS, "2030-01-01", "2030-02-01")
    assert frame.empty and list(frame.columns) == FIELDS
