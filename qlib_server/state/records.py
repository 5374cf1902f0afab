"""The dataset cache as ``qlib_server.client`` reads it: files of columns, mapped, not parsed.

A worker writes them beside Qlib's files of the same cache (:mod:`qlib_server.worker.datacache`); the front
streams their rows (:mod:`qlib_server.front.transfer`). Qlib's HDF5 file is written only for the stock pyqlib
client, which reads it from a shared mount; these cost a copy of the values to write and nothing to read.

Rows are held in the order of the frame a client builds (Qlib's ``dataset`` frame): by instrument, then day.
A worker writes each block of instruments as the engine finishes it, a transfer sends slices of the file as
they are, and the client copies each of them to its place at once; the rows of a date range are one slice of
each instrument's rows.

``<uri>.records`` is a small JSON manifest listing the cache's *segments* in day order, each the rows of its
first ``days`` days of a segment file ``<uri>.records.<token>``: a cache computed in full is one segment;
extending it by appended days (:mod:`qlib_server.worker.extension`) adds a segment of the days that changed
and keeps the days before them of the segments before, so that nothing already written is copied or changed.
An instrument's rows are those of each segment in turn. A manifest is replaced atomically: a reader sees the
old cache or the new one. A segment file, little-endian, each section starting on a multiple of :data:`ALIGN`
bytes::

    datetime    int64 x rows: each row's day
    instrument  int32 x rows: each row's instrument, a position in the footer's ``codes``
    values      float32 x columns x stride (column-major: a column's rows are contiguous, as a transfer sends
                them and a frame holds them; a column's room, ``stride``, may be more than its rows)
    starts      int64 x (codes + 1): the first row of each code (and the number of rows)
    days        int64 x days: the days of the rows (ascending)
    footer      JSON: rows, stride, days, the datetime unit, the columns and the ``codes`` (sorted)
    8 bytes     the footer's length
    8 bytes     :data:`MAGIC`
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

SUFFIX = ".records"
MAGIC = b"QSREC005"
#: the manifest's ``format``: a cache written by a version of another layout is not read (it is computed again)
FORMAT = 5
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


def _sections(stride: int, columns: int) -> tuple[int, int, int]:
    """Where the instrument, values and starts sections begin, for room for ``stride`` rows."""
    instrument = _aligned(8 * stride)
    values = _aligned(instrument + 4 * stride)
    return instrument, values, _aligned(values + 4 * stride * columns)


@dataclass(frozen=True)
class Segment:
    """A segment file, mapped: ``datetime``, ``instrument``, ``values`` (columns x rows) of all its rows, and of
    those used (its first ``len(days)`` days), each code's ``[starts, stops)``."""

    datetime: np.ndarray
    instrument: np.ndarray
    values: np.ndarray  # values[column, row]: each column a contiguous view
    starts: np.ndarray  # per code
    stops: np.ndarray
    days: np.ndarray
    file: Optional[Path] = None  # where it is mapped from: what a client on this host maps (``placement``)
    identity: tuple = ()  # the file's (device, inode, size, mtime in ns) when it was mapped
    values_at: int = 0  # the byte where its values begin
    stride: int = 0  # a column's room, in rows

    @property
    def counts(self) -> np.ndarray:
        return self.stops - self.starts

    def within(self, start_time, end_time) -> tuple[np.ndarray, np.ndarray]:
        """Each code's rows ``[first, last)`` from ``start_time`` to ``end_time`` (None: open)."""
        if not len(self.days):
            return self.starts, self.starts
        start = self.days[0] if start_time is None else np.datetime64(start_time)
        end = self.days[-1] if end_time is None else np.datetime64(end_time)
        if start > self.days[-1] or end < self.days[0]:
            return self.starts, self.starts
        whole_from, whole_to = start <= self.days[0], end >= self.days[-1]
        first, last = self.starts.copy(), self.stops.copy()
        for code in np.flatnonzero(self.stops > self.starts).tolist():
            stamps = self.datetime[self.starts[code]:self.stops[code]]
            if not whole_from:
                first[code] += np.searchsorted(stamps, start, "left")
            if not whole_to:
                last[code] = self.starts[code] + np.searchsorted(stamps, end, "right")
        return first, np.maximum(first, last)


@dataclass(frozen=True)
class Selection:
    """The rows of a date range in a client's order: ``pieces`` ``(segment, first, last)`` (by code, then
    segment; pieces that follow each other in a file joined) and ``counts``, the rows of each code."""

    pieces: list
    counts: np.ndarray

    @property
    def rows(self) -> int:
        return int(self.counts.sum())


@dataclass(frozen=True)
class Records:
    """A cache's segments, in day order, the ``columns`` of their values, the ``codes`` their instrument
    columns point into, all the days (``days``) and the rows of each code (``counts``)."""

    segments: list
    files: list  # the segment files' names (in the cache's directory)
    columns: list
    codes: list
    unit: str
    days: np.ndarray
    counts: np.ndarray

    def __len__(self) -> int:
        return int(self.counts.sum())

    def select(self, start_time=None, end_time=None) -> Selection:
        """The rows from ``start_time`` to ``end_time`` (None: open)."""
        bounds = [segment.within(start_time, end_time) for segment in self.segments]
        counts = np.zeros(len(self.codes), dtype=np.int64)
        for first, last in bounds:
            counts += last - first
        pieces: list = []
        for code in np.flatnonzero(counts).tolist():
            for segment, (first, last) in zip(self.segments, bounds):
                a, b = int(first[code]), int(last[code])
                if a == b:
                    continue
                if pieces and pieces[-1][0] is segment and pieces[-1][2] == a:
                    pieces[-1] = (segment, pieces[-1][1], b)
                else:
                    pieces.append((segment, a, b))
        return Selection(pieces, counts)

    def take(self, start_time=None, end_time=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Copies of the rows from ``start_time`` to ``end_time``, by instrument then day: their days,
        instruments and values (rows x columns, each column contiguous)."""
        return take(self.select(start_time, end_time).pieces, self.unit, len(self.columns))


def take(pieces: list, unit: str, columns: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Copies of the rows of ``pieces`` (``(segment, first, last)``), in their order."""
    if not pieces:
        return np.empty(0, f"<M8[{unit}]"), np.empty(0, "<i4"), np.empty((columns, 0), "<f4").T
    return (np.concatenate([s.datetime[a:b] for s, a, b in pieces]),
            np.concatenate([s.instrument[a:b] for s, a, b in pieces]),
            np.concatenate([s.values[:, a:b] for s, a, b in pieces], axis=1).T)


def of_this_layout(cache_path: Path) -> bool:
    """Whether the cache has a manifest of this version's layout (one of an older version is computed again)."""
    try:
        return json.loads(path_of(cache_path).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read(cache_path: Path) -> Records:
    """Map the segments of the cache at ``cache_path`` (``FileNotFoundError`` when it has none, ``ValueError``
    when a file is not what it should be)."""
    manifest = json.loads(path_of(cache_path).read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{cache_path.name}: records of another layout ({manifest.get('format', 3)}, not {FORMAT})")
    return of_segments([(cache_path.parent / entry["file"], entry["days"]) for entry in manifest["segments"]])


def of_segments(listed: list) -> Records:
    """The records of the segment files ``listed`` (``(path, days used)``, in day order)."""
    segments, footer = [], None
    for path, used in listed:
        segment, footer = _segment(path, used)
        segments.append(segment)
    if footer is None:
        raise ValueError("a cache of no segment")
    days = np.concatenate([s.days for s in segments])
    if len(days) > 1 and np.any(np.diff(days.view("<i8")) <= 0):
        raise ValueError(f"{listed[0][0].name}: segments out of day order")
    return Records(segments, [p.name for p, _ in listed], footer["columns"], footer["codes"], footer["unit"], days,
                   np.sum([s.counts for s in segments], axis=0).astype(np.int64))


def _segment(path: Path, used: int) -> tuple[Segment, dict]:
    """The rows of the first ``used`` days of the segment file at ``path``, and its footer."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        size, identity = st.st_size, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if size < _TAIL:
            raise ValueError(f"{path.name}: not a records file")
        f.seek(size - _TAIL)
        tail = f.read(_TAIL)
        if tail[8:] != MAGIC:
            raise ValueError(f"{path.name}: not a records file")
        length = int.from_bytes(tail[:8], "little")
        f.seek(size - _TAIL - length)
        footer = json.loads(f.read(length))
    rows, stride, days, columns, unit, codes = footer["rows"], footer["stride"], footer["days"], footer["columns"], \
        footer["unit"], len(footer["codes"])
    if not 0 <= used <= days:
        raise ValueError(f"{path.name}: {used} days used of {days}")
    instrument_at, values_at, starts_at = _sections(stride, len(columns))
    bounds = np.fromfile(path, dtype="<i8", count=codes + 1 + days, offset=starts_at)
    starts, stamps = bounds[:codes + 1], bounds[codes + 1:].view(f"M8[{unit}]")
    if starts[0] != 0 or starts[-1] != rows or np.any(np.diff(starts) < 0):
        raise ValueError(f"{path.name}: not a records file")
    if rows:
        whole = np.memmap(path, dtype=np.uint8, mode="r", shape=(starts_at,))
        datetime = whole[:8 * rows].view(f"<M8[{unit}]")
        instrument = whole[instrument_at:instrument_at + 4 * rows].view("<i4")
        values = whole[values_at:values_at + 4 * stride * len(columns)].view("<f4").reshape(len(columns), stride)
        values = values[:, :rows]
    else:
        datetime, instrument = np.empty(0, f"<M8[{unit}]"), np.empty(0, "<i4")
        values = np.empty((len(columns), 0), "<f4")
    stops = starts[1:].copy()
    if used < days:  # each code's rows up to the last day used
        last = stamps[used - 1] if used else None
        for code in range(codes):
            kept = 0 if last is None else np.searchsorted(datetime[starts[code]:stops[code]], last, "right")
            stops[code] = starts[code] + kept
    return Segment(datetime, instrument, values, starts[:-1], stops, stamps[:used], path, identity, values_at,
                   stride), footer


def segment_path(cache_path: Path) -> Path:
    """A new segment file's name for the cache."""
    return cache_path.with_name(f"{cache_path.name}{SUFFIX}.{uuid.uuid4().hex[:12]}")


def segment_files(cache_path: Path) -> list[Path]:
    """Every segment file of the cache on disk (listed in its manifest or not)."""
    return sorted(cache_path.parent.glob(f"{cache_path.name}{SUFFIX}.*"))


def publish(cache_path: Path, segments: list[tuple[Path, int]]) -> None:
    """Make ``segments`` (segment file, days used) the cache's rows: replace its manifest atomically, then
    delete the segment files it no longer lists (a transfer reading one keeps it until it is done)."""
    target = path_of(cache_path)
    temporary = target.with_name(target.name + ".tmp")
    temporary.write_text(json.dumps({"format": FORMAT,
                                     "segments": [{"file": p.name, "days": int(n)} for p, n in segments]}))
    os.replace(temporary, target)
    listed = {p.name for p, _ in segments}
    for path in segment_files(cache_path):
        if path.name not in listed and not path.name.endswith(".tmp"):
            path.unlink(missing_ok=True)


class Writer:
    """Writes a segment file (:func:`segment_path`) of ``rows`` rows (with ``at_most``, up to ``rows``: the parts
    of the file it does not fill are holes) from parts of consecutive rows by instrument then day (:meth:`add`);
    :meth:`close` completes it under its name and returns its days (:func:`publish` makes it the cache's),
    :meth:`abandon` leaves nothing."""

    def __init__(self, path: Path, columns: list, codes: list, unit: str, rows: int, at_most: bool = False):
        self.path = path
        self.temporary = path.with_name(path.name + ".tmp")
        self.columns, self.codes, self.unit = list(columns), list(codes), unit
        if self.codes != sorted(self.codes):
            raise ValueError("the codes of a records file must be sorted")
        self.expected, self.at_most = rows, at_most
        self.instrument_at, self.values_at, self.starts_at = _sections(rows, len(self.columns))
        self.counts = np.zeros(len(self.codes), dtype=np.int64)
        self.days: list[np.ndarray] = []
        self.last: Optional[tuple[int, int]] = None  # the code and day of the last row added
        self.in_order = True
        self.rows = 0
        self.fd: Optional[int] = os.open(self.temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self.fd, self.starts_at)

    def add(self, datetimes: np.ndarray, which: np.ndarray, values: np.ndarray,
            days: Optional[np.ndarray] = None) -> None:
        """Rows sorted by instrument then day: their days, their instruments (positions in ``codes``) and
        ``values[column, row]``; they follow the rows added before. ``days``: the distinct days of the rows, where
        the caller knows them."""
        n = len(which)
        if n == 0:
            return
        if self.fd is None or self.rows + n > self.expected:
            self.abandon()
            raise ValueError(f"more than the {self.expected} rows announced")
        stamps = np.ascontiguousarray(datetimes.astype(f"<M8[{self.unit}]", copy=False)).view("<i8")
        which = np.ascontiguousarray(which, dtype="<i4")
        _pwrite(self.fd, stamps, 8 * self.rows)
        _pwrite(self.fd, which, self.instrument_at + 4 * self.rows)
        for k, column in enumerate(values):  # each column's part where that column's rows go on
            _pwrite(self.fd, np.ascontiguousarray(column, dtype="<f4"),
                    self.values_at + 4 * (k * self.expected + self.rows))
        later = (which[1:] > which[:-1]) | ((which[1:] == which[:-1]) & (stamps[1:] > stamps[:-1]))
        self.in_order &= bool(later.all()) and (self.last is None or (int(which[0]), int(stamps[0])) > self.last)
        self.last = (int(which[-1]), int(stamps[-1]))
        if days is not None:
            self.days.append(np.asarray(days).astype(f"<M8[{self.unit}]").view("<i8"))
        else:
            self.days.append(pd.unique(stamps))  # by hashing: the rows' days are sorted once, at the end
        self.counts += np.bincount(which, minlength=len(self.codes))
        self.rows += n

    def close(self) -> int:
        if (self.rows != self.expected and not self.at_most) or not self.in_order:
            self.abandon()
            raise ValueError(f"{self.rows} rows of {self.expected} announced, or added out of order")
        days = np.unique(np.concatenate(self.days)) if self.days else np.empty(0, "<i8")
        footer = json.dumps({"rows": self.rows, "stride": self.expected, "days": len(days), "unit": self.unit,
                             "columns": self.columns, "codes": self.codes}, separators=(",", ":")).encode()
        fd, self.fd = self.fd, None
        assert fd is not None, "closed twice"
        starts = np.concatenate([[0], np.cumsum(self.counts)])
        _pwrite(fd, np.concatenate([starts, days]).astype("<i8").tobytes() + footer + len(footer).to_bytes(8, "little")
                + MAGIC, self.starts_at)
        os.close(fd)
        os.replace(self.temporary, self.path)
        return len(days)

    def abandon(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.temporary.unlink(missing_ok=True)
