"""An Arrow IPC stream of feature rows (see :mod:`qlib_server.front.transfer`) → the frame Qlib gives.

The frame is sorted by instrument, then date. The schema says how many rows each instrument has, so each
row of a batch is copied once, straight to its place in arrays allocated once for every row: the client
holds the frame being built and one batch, and never sorts or copies the frame again. The rows come in
the frame's order (a batch is a run of its rows, each column copied as a whole); rows in another order (by
date, as earlier servers send them) are placed row by row. Columns get the requested field names, in
their order.

The ``datetime`` level has the resolution local Qlib's frames have with the client's pandas (see
:func:`datetime_unit`), whatever resolution the server's cache stores.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pyarrow as pa


def datetime_unit(pandas_version: str = pd.__version__) -> str:
    """The resolution of the ``datetime`` level of the frames local Qlib (pyqlib 0.9.x) builds on pandas
    ``pandas_version``: ``"ns"`` before pandas 3, ``"us"`` from pandas 3 on.

    Qlib indexes an instrument's frame by its calendar (``Cal.calendar(freq=freq)[positions]``): a numpy
    object array of ``pd.Timestamp`` parsed from the calendar file's lines (``"2019-01-02"``, or
    ``"2019-01-02 09:31:00"``), which pandas turns into a ``DatetimeIndex`` (the levels of ``pd.concat``
    keep it). pandas 2 (and 1) makes every index inferred from objects nanoseconds; pandas 3 keeps the
    Timestamps' unit, and parses a string with at most microsecond digits as microseconds.
    """
    match = re.match(r"\s*(\d+)", pandas_version)
    if match is None:
        raise ValueError(f"not a pandas version: {pandas_version!r}")
    return "ns" if int(match.group(1)) < 3 else "us"


def empty_frame(columns: list[str]) -> pd.DataFrame:
    """Qlib's frame of no rows (as its dataset processor builds it)."""
    index = pd.MultiIndex.from_arrays([[], []], names=("instrument", "datetime"))
    return pd.DataFrame(index=index, columns=columns, dtype=np.float32)


class _Places:
    """Where each row of a batch goes: after the rows of the instruments sorted before its own and
    after the rows of its own instrument already placed."""

    def __init__(self, counts: np.ndarray) -> None:
        self.counts = counts
        self.first = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
        self.placed = np.zeros(len(counts), dtype=np.int64)

    def of(self, codes: np.ndarray) -> np.ndarray | slice:
        """The frame's rows for a batch's rows of ``codes``: a slice where they come in the frame's own order."""
        if codes.size and (codes.min() < 0 or codes.max() >= len(self.counts)):
            raise ConnectionError("the feature stream names an instrument it did not announce")
        if codes.size and np.all(codes[1:] >= codes[:-1]):  # by instrument: in order if each earlier one is full
            first, last = int(codes[0]), int(codes[-1])
            full = self.placed[first:last] + np.bincount(codes, minlength=last + 1)[first:last] \
                == self.counts[first:last]
            if full.all() and (first == last or self.placed[last] == 0):
                at = int(self.first[first] + self.placed[first])
                self.placed += np.bincount(codes, minlength=len(self.counts))
                if np.any(self.placed > self.counts):
                    raise ConnectionError("the feature stream sent more rows of an instrument than it announced")
                return slice(at, at + len(codes))
        order = np.argsort(codes, kind="stable")
        ordered = codes[order]
        starts = np.flatnonzero(np.diff(ordered, prepend=-1))  # first row of each instrument in the batch
        rank = np.arange(len(codes)) - np.repeat(starts, np.diff(np.append(starts, len(codes))))
        places = np.empty(len(codes), dtype=np.int64)
        places[order] = self.first[ordered] + self.placed[ordered] + rank
        self.placed += np.bincount(codes, minlength=len(self.counts))
        if np.any(self.placed > self.counts):
            raise ConnectionError("the feature stream sent more rows of an instrument than it announced")
        return places


class _Days:
    """The frame's datetime level and each row's code in it. Rows by day (as earlier servers send them) give
    the level in the order they come and a row's code as a running count; rows in another order (by
    instrument) by hashing the days at the end."""

    def __init__(self, rows: int, dtype) -> None:
        self.dtype = dtype
        self.stamps = np.empty(rows, dtype=np.int64)
        self.codes: np.ndarray | None = np.empty(rows, dtype=np.int64)
        self.seen: list[np.ndarray] = []
        self.count = 0

    def add(self, stamps: np.ndarray, at: np.ndarray | slice) -> None:
        self.stamps[at] = stamps
        if self.codes is None or not len(stamps):
            return
        last = self.seen[-1][-1] if self.seen else None
        if (last is not None and stamps[0] < last) or np.any(stamps[1:] < stamps[:-1]):
            self.codes = None  # not by day: sorted at the end
            return
        new = np.empty(len(stamps), dtype=bool)
        new[0] = last is None or stamps[0] != last
        np.not_equal(stamps[1:], stamps[:-1], out=new[1:])
        self.codes[at] = np.cumsum(new) + (self.count - 1)
        self.seen.append(stamps[new])
        self.count += int(np.count_nonzero(new))

    def level(self) -> tuple[np.ndarray, np.ndarray]:
        if self.codes is None:
            return day_level(self.stamps, self.dtype)
        return np.concatenate(self.seen).view(self.dtype), self.codes


def day_level(stamps: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
    """The distinct days of ``stamps`` (int64) as ``dtype``, sorted, and each row's position among them: found by
    hashing, then sorted, with no sort of every row."""
    codes, found = pd.factorize(stamps)
    order = np.argsort(found)
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return found[order].view(dtype), rank[codes]


def frame_of(names: list[str], counts: np.ndarray, days: tuple[np.ndarray, np.ndarray], arrays: list,
             fields: list[str], unit: str) -> pd.DataFrame:
    """The frame of ``arrays`` (``[(cache columns, rows x columns)]``) whose rows are by instrument (``names``,
    ``counts`` rows each), then day (``days``: the day level and each row's position in it)."""
    date_level, date_codes = days
    codes = np.repeat(np.arange(len(names), dtype=np.int32), counts)
    index = pd.MultiIndex(levels=[pd.Index(names), pd.DatetimeIndex(date_level.astype(f"datetime64[{unit}]"))],
                          codes=[codes, date_codes], names=["instrument", "datetime"], verify_integrity=False)
    frames = [pd.DataFrame(array, index=index, columns=columns, copy=False) for columns, array in arrays]
    frame = frames[0] if len(frames) == 1 else pd.concat(frames, axis=1, copy=False)
    return _as_fields(frame, fields)


def read_frame(source, fields: list[str], unit: str | None = None) -> pd.DataFrame:
    """Read the stream from the file-like ``source`` into the frame of ``fields`` (Qlib's column names),
    its ``datetime`` level of resolution ``unit`` (by default local Qlib's with this pandas)."""
    reader = pa.ipc.open_stream(source)
    schema = reader.schema
    rows = int(schema.metadata[b"rows"])
    if rows == 0:
        for _ in reader:  # read to the end of the stream
            pass
        return empty_frame(fields)
    instruments = json.loads(schema.metadata[b"instruments"])
    names = [code for code, _ in instruments]
    places = _Places(np.array([n for _, n in instruments], dtype=np.int64))
    arrays, groups = _destinations(rows, list(schema)[2:], [f.replace(" ", "") for f in fields])
    days = _Days(rows, schema.field("datetime").type.to_pandas_dtype())
    received = 0
    for batch in reader:
        at = places.of(batch.column(1).to_numpy())
        days.add(batch.column(0).view(pa.int64()).to_numpy(), at)
        for targets, values in zip(groups, batch.columns[2:]):
            values = _flat(values).to_numpy(zero_copy_only=False)
            if len(targets) == 1:  # a column on its own (the server sends each so)
                targets[0][at] = values
                continue
            for column, value in zip(targets, values.reshape(-1, len(targets)).T.copy()):  # column by column:
                column[at] = value  # each is contiguous where it goes
        received += batch.num_rows
    if received != rows or np.any(places.placed != places.counts):
        raise ConnectionError(f"the feature stream ended after {received} of {rows} rows")
    return frame_of(names, places.counts, days.level(), arrays, fields, unit or datetime_unit())


def _flat(lists: pa.FixedSizeListArray) -> pa.Array:
    """The values of a column of fixed-size lists (the server sends no null list), sliced out of its child
    array: ``flatten()`` goes through pyarrow's compute functions, tens of microseconds per column and batch."""
    if lists.null_count:
        raise ConnectionError("the feature stream holds a null row")
    width = lists.type.list_size
    return lists.values.slice(lists.offset * width, len(lists) * width)


def _destinations(rows: int, fields: list[pa.Field], wanted: list[str]) -> tuple[list, list]:
    """Where the values of the stream's column groups (``fields``) go: one array per dtype, its columns the
    ``wanted`` ones (cache names, in the request's order) of that dtype, column-major (Fortran order), so that
    the frame holds each column contiguous, as the frames local Qlib builds do (``pd.concat`` of an
    instrument's frames): numpy reductions over a frame's values (Qlib's ``ZScoreNorm`` takes ``np.nanmean``
    of them) sum in an order that depends on the layout, and give local Qlib's last bits only on local Qlib's
    layout. Returns ``[(columns, array) per dtype]`` and, per group, the column of an array each of its columns
    goes to (a contiguous view)."""
    streamed = [(json.loads(f.metadata[b"columns"]), np.dtype(f.type.value_type.to_pandas_dtype())) for f in fields]
    dtype_of = {name: dtype for columns, dtype in streamed for name in columns}
    asked = set(wanted)
    odd = [name for name in wanted if name not in dtype_of] + [name for name in dtype_of if name not in asked]
    if odd:  # the server sends the requested columns, each once
        raise ConnectionError(f"the feature stream's columns are not the request's ({odd[0][:60]!r})")
    arrays: dict[np.dtype, tuple[list[str], np.ndarray]] = {}
    for dtype in dict.fromkeys(dtype_of[name] for name in wanted):
        columns = list(dict.fromkeys(name for name in wanted if dtype_of[name] == dtype))
        arrays[dtype] = (columns, np.empty((rows, len(columns)), dtype=dtype, order="F"))
    column_of = {name: array[:, k] for columns, array in arrays.values() for k, name in enumerate(columns)}
    groups = [[column_of[name] for name in columns] for columns, _ in streamed]
    return list(arrays.values()), groups


def _as_fields(frame: pd.DataFrame, fields: list[str]) -> pd.DataFrame:
    """Columns named and ordered as the requested fields (a repeated field repeats its column)."""
    cache_names = [f.replace(" ", "") for f in fields]
    if cache_names != list(frame.columns):
        frame = frame.loc[:, cache_names]
    frame.columns = list(fields)
    return frame
