"""The dataset cache as ``qlib_server.client`` reads it: one file of columns, mapped, not parsed.

A worker writes ``<uri>.records`` beside Qlib's files of the same cache (:mod:`qlib_server.worker.datacache`);
the front streams its rows (:mod:`qlib_server.front.transfer`). Qlib's HDF5 file is written only for the
stock pyqlib client, which reads it from a shared mount; this one costs a copy of the values to write and
nothing to read: the rows of a date range are one slice of each column. Layout, little-endian, each
section starting on a multiple of :data:`ALIGN` bytes::

    datetime    int64 x rows: each row's day
    instrument  int32 x rows: each row's instrument, a position in the footer's ``codes``
    values      float32 x rows x columns (row-major: a row's values are contiguous)
    days        int64 x days: each day of the rows (calendar order)
    ends        int64 x days: the row after each day's last row
    footer      JSON: rows, days, the datetime unit, the columns, the ``codes`` (sorted) and ``counts``
                (rows of each code)
    8 bytes     the footer's length
    8 bytes     :data:`MAGIC`

Rows are sorted by day, then instrument, as in Qlib's cache. The file is written under a temporary name and
renamed into place when complete.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

SUFFIX = ".records"
MAGIC = b"QSREC002"
ALIGN = 64
_TAIL = 16


def path_of(cache_path: Path) -> Path:
    return cache_path.with_suffix(SUFFIX)


def _pwrite(fd: int, data, offset: int) -> None:
    """Write all of ``data`` (a contiguous array or bytes) at ``offset``."""
    view = memoryview(data).cast("B")
    while len(view):
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _aligned(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN


def _sections(rows: int, columns: int) -> tuple[int, int, int, int]:
    """Where the instrument, values and days sections start, and where the values end."""
    instrument = _aligned(8 * rows)
    values = _aligned(instrument + 4 * rows)
    end = values + 4 * rows * columns
    return instrument, values, _aligned(end), end


@dataclass(frozen=True)
class Records:
    """A records file, mapped: ``datetime``, ``instrument`` and ``values`` (rows x columns), each day's rows
    (``days``, ``ends``), the ``codes`` the instrument column points into and their ``counts``."""

    datetime: np.ndarray
    instrument: np.ndarray
    values: np.ndarray
    days: np.ndarray
    ends: np.ndarray
    columns: list
    codes: list
    counts: np.ndarray

    def __len__(self) -> int:
        return len(self.instrument)

    def rows(self, start_time, end_time) -> tuple[int, int]:
        """Rows ``[start, stop)`` holding the days from ``start_time`` to ``end_time`` (None: open)."""
        first = 0 if start_time is None else int(np.searchsorted(self.days, np.datetime64(start_time), "left"))
        last = len(self.days) if end_time is None else int(np.searchsorted(self.days, np.datetime64(end_time),
                                                                            "right"))
        if last <= first:
            return 0, 0
        return (int(self.ends[first - 1]) if first else 0), int(self.ends[last - 1])


def read(path: Path) -> Records:
    """Map the records file at ``path`` (raises ``ValueError`` when it is not one, or not complete)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size < _TAIL:
            raise ValueError(f"{path.name}: not a records file")
        f.seek(size - _TAIL)
        tail = f.read(_TAIL)
        if tail[8:] != MAGIC:
            raise ValueError(f"{path.name}: not a records file")
        length = int.from_bytes(tail[:8], "little")
        f.seek(size - _TAIL - length)
        footer = json.loads(f.read(length))
    rows, days, columns = footer["rows"], footer["days"], footer["columns"]
    instrument_at, values_at, days_at, _ = _sections(rows, len(columns))
    if rows:
        whole = np.memmap(path, dtype=np.uint8, mode="r", shape=(days_at,))
        datetime = whole[:8 * rows].view(f"<M8[{footer['unit']}]")
        instrument = whole[instrument_at:instrument_at + 4 * rows].view("<i4")
        values = whole[values_at:values_at + 4 * rows * len(columns)].view("<f4").reshape(rows, len(columns))
    else:
        datetime, instrument = np.empty(0, f"<M8[{footer['unit']}]"), np.empty(0, "<i4")
        values = np.empty((0, len(columns)), "<f4")
    stamps = np.fromfile(path, dtype="<i8", count=2 * days, offset=days_at)
    return Records(datetime, instrument, values, stamps[:days].view(f"M8[{footer['unit']}]"), stamps[days:],
                   columns, footer["codes"], np.array(footer["counts"], dtype=np.int64))


class Writer:
    """Writes a records file of ``rows`` rows from parts of consecutive days (:meth:`add`); :meth:`close`
    completes it under its name, :meth:`abandon` leaves nothing."""

    def __init__(self, path: Path, columns: list, codes: list, unit: str, rows: int):
        self.path = path
        self.temporary = path.with_name(path.name + ".tmp")
        self.columns, self.codes, self.unit = list(columns), list(codes), unit
        if self.codes != sorted(self.codes):
            raise ValueError("the codes of a records file must be sorted")
        self.expected = rows
        self.instrument_at, self.values_at, self.days_at, _ = _sections(rows, len(self.columns))
        self.counts = np.zeros(len(self.codes), dtype=np.int64)
        self.days: list[np.ndarray] = []
        self.ends: list[np.ndarray] = []
        self.rows = 0
        self.buffer = np.empty((0, len(self.columns)), dtype="<f4")
        self.fd: Optional[int] = os.open(self.temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self.fd, self.days_at)

    def add(self, datetimes: np.ndarray, which: np.ndarray, values: np.ndarray) -> None:
        """Rows sorted by day then instrument: their days, their instruments (positions in ``codes``) and
        ``values[column, row]``; the days follow those of the rows added before."""
        n = len(which)
        if n == 0:
            return
        if self.fd is None or self.rows + n > self.expected:
            self.abandon()
            raise ValueError(f"more than the {self.expected} rows announced")
        if len(self.buffer) < n:  # one buffer for every part: fresh memory costs page faults
            self.buffer = np.empty((n, len(self.columns)), dtype="<f4")
        rows = self.buffer[:n]
        rows[...] = values.T
        stamps = np.ascontiguousarray(datetimes.astype(f"<M8[{self.unit}]")).view("<i8")
        _pwrite(self.fd, stamps, 8 * self.rows)
        _pwrite(self.fd, np.ascontiguousarray(which, dtype="<i4"), self.instrument_at + 4 * self.rows)
        _pwrite(self.fd, rows, self.values_at + 4 * len(self.columns) * self.rows)
        starts = np.flatnonzero(np.diff(stamps, prepend=stamps[0] - 1))
        self.days.append(stamps[starts])
        self.ends.append(self.rows + np.append(starts[1:], n))
        self.counts += np.bincount(which, minlength=len(self.codes))
        self.rows += n

    def close(self) -> None:
        days = np.concatenate(self.days) if self.days else np.empty(0, "<i8")
        ends = np.concatenate(self.ends) if self.ends else np.empty(0, "<i8")
        if self.rows != self.expected or (len(days) > 1 and np.any(np.diff(days) <= 0)):
            self.abandon()
            raise ValueError(f"{self.rows} rows of {self.expected} announced, or added out of day order")
        footer = json.dumps({"rows": self.rows, "days": len(days), "unit": self.unit, "columns": self.columns,
                             "codes": self.codes, "counts": self.counts.tolist()}, separators=(",", ":")).encode()
        fd, self.fd = self.fd, None
        assert fd is not None, "closed twice"
        _pwrite(fd, np.concatenate([days, ends]).astype("<i8").tobytes() + footer + len(footer).to_bytes(8, "little")
                + MAGIC, self.days_at)
        os.close(fd)
        os.replace(self.temporary, self.path)

    def abandon(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.temporary.unlink(missing_ok=True)
