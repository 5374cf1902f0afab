"""The dataset cache as ``qlib_server.client`` reads it: files of columns, mapped, not parsed.

A worker writes them beside Qlib's files of the same cache (:mod:`qlib_server.worker.datacache`); the front
streams their rows (:mod:`qlib_server.front.transfer`). Qlib's HDF5 file is written only for the stock pyqlib
client, which reads it from a shared mount; these cost a copy of the values to write and nothing to read: the
rows of a date range are one slice of each column.

``<uri>.records`` is a small JSON manifest listing the cache's *segments* in row order, each the first ``rows``
rows of a segment file ``<uri>.records.<token>``: a cache computed in full is one segment; extending it by
appended days (:mod:`qlib_server.worker.extension`) adds a segment of the rows that changed and trims the
rows they replace from the one before, so that nothing already written is copied or changed. A manifest is
replaced atomically: a reader sees the old cache or the new one. A segment file, little-endian, each section
starting on a multiple of :data:`ALIGN` bytes::

    datetime    int64 x rows: each row's day
    instrument  int32 x rows: each row's instrument, a position in the footer's ``codes``
    values      float32 x columns x rows (column-major: a column's rows are contiguous, as a transfer sends
                them and a frame holds them)
    days        int64 x days: each day of the rows (calendar order)
    ends        int64 x days: the row after each day's last row
    footer      JSON: rows, days, the datetime unit, the columns, the ``codes`` (sorted) and ``counts``
                (rows of each code)
    8 bytes     the footer's length
    8 bytes     :data:`MAGIC`

Rows are sorted by day, then instrument, as in Qlib's cache.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

SUFFIX = ".records"
MAGIC = b"QSREC004"
#: the manifest's ``format``: a cache written by a version of another layout is not read (it is computed again)
FORMAT = 4
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
class Segment:
    """The first ``len(instrument)`` rows of a segment file, mapped: ``datetime``, ``instrument``, ``values``
    (columns x rows), each day's rows (``days``, ``ends``) and the rows of each code (``counts``)."""

    datetime: np.ndarray
    instrument: np.ndarray
    values: np.ndarray  # values[column, row]: each column a contiguous view
    days: np.ndarray
    ends: np.ndarray
    counts: np.ndarray


@dataclass(frozen=True)
class Records:
    """A cache's segments, in row order (``offsets``: the first row of each), the ``columns`` of their values,
    the ``codes`` their instrument columns point into, all the days (``days``, ``ends``) and ``counts``."""

    segments: list
    offsets: list
    files: list  # the segment files' names (in the cache's directory)
    columns: list
    codes: list
    unit: str
    days: np.ndarray
    ends: np.ndarray
    counts: np.ndarray

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def rows(self, start_time, end_time) -> tuple[int, int]:
        """Rows ``[start, stop)`` holding the days from ``start_time`` to ``end_time`` (None: open)."""
        first = 0 if start_time is None else int(np.searchsorted(self.days, np.datetime64(start_time), "left"))
        last = len(self.days) if end_time is None else int(np.searchsorted(self.days, np.datetime64(end_time),
                                                                            "right"))
        if last <= first:
            return 0, 0
        return (int(self.ends[first - 1]) if first else 0), int(self.ends[last - 1])

    def pieces(self, start: int, stop: int):
        """``(segment, first, last)`` of each segment holding part of rows ``[start, stop)``, in order."""
        for segment, offset in zip(self.segments, self.offsets):
            first, last = max(start, offset), min(stop, offset + len(segment.instrument))
            if first < last:
                yield segment, first - offset, last - offset


    def take(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Copies of rows ``[start, stop)``: their days, instruments and values (rows x columns, each column
        contiguous)."""
        parts = [(s.datetime[a:b], s.instrument[a:b], s.values[:, a:b]) for s, a, b in self.pieces(start, stop)]
        if not parts:
            return (np.empty(0, f"<M8[{self.unit}]"), np.empty(0, "<i4"),
                    np.empty((len(self.columns), 0), "<f4").T)
        datetime, instrument, values = zip(*parts)
        return np.concatenate(datetime), np.concatenate(instrument), np.concatenate(values, axis=1).T


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
    segments, offsets, footer, at = [], [], None, 0
    for entry in manifest["segments"]:
        segment, footer = _segment(cache_path.parent / entry["file"], entry["rows"])
        segments.append(segment)
        offsets.append(at)
        at += len(segment.instrument)
    if footer is None:
        raise ValueError(f"{cache_path.name}: a cache of no segment")
    days = np.concatenate([s.days for s in segments])
    ends = np.concatenate([s.ends + o for s, o in zip(segments, offsets)])
    if len(days) > 1 and np.any(np.diff(days.view("<i8")) <= 0):
        raise ValueError(f"{cache_path.name}: segments out of day order")
    return Records(segments, offsets, [e["file"] for e in manifest["segments"]], footer["columns"], footer["codes"],
                   footer["unit"], days, ends,
                   np.sum([s.counts for s in segments], axis=0).astype(np.int64))


def _segment(path: Path, used: int) -> tuple[Segment, dict]:
    """The first ``used`` rows of the segment file at ``path`` (whole days), and its footer."""
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
    rows, days, columns, unit = footer["rows"], footer["days"], footer["columns"], footer["unit"]
    if not 0 <= used <= rows:
        raise ValueError(f"{path.name}: {used} rows used of {rows}")
    instrument_at, values_at, days_at, _ = _sections(rows, len(columns))
    stamps = np.fromfile(path, dtype="<i8", count=2 * days, offset=days_at)
    kept = int(np.searchsorted(stamps[days:], used, side="right"))  # the days whose rows are all used
    if kept and stamps[days + kept - 1] != used or not kept and used:
        raise ValueError(f"{path.name}: {used} rows used, not whole days")
    if used:
        whole = np.memmap(path, dtype=np.uint8, mode="r", shape=(days_at,))
        datetime = whole[:8 * used].view(f"<M8[{unit}]")
        instrument = whole[instrument_at:instrument_at + 4 * used].view("<i4")
        values = whole[values_at:values_at + 4 * rows * len(columns)].view("<f4").reshape(len(columns), rows)[:, :used]
    else:
        datetime, instrument = np.empty(0, f"<M8[{unit}]"), np.empty(0, "<i4")
        values = np.empty((len(columns), 0), "<f4")
    counts = (np.array(footer["counts"], dtype=np.int64) if used == rows
              else np.bincount(instrument, minlength=len(footer["codes"])).astype(np.int64))
    return Segment(datetime, instrument, values, stamps[:kept].view(f"M8[{unit}]"), stamps[days:days + kept],
                   counts), footer


def segment_path(cache_path: Path) -> Path:
    """A new segment file's name for the cache."""
    return cache_path.with_name(f"{cache_path.name}{SUFFIX}.{uuid.uuid4().hex[:12]}")


def segment_files(cache_path: Path) -> list[Path]:
    """Every segment file of the cache on disk (listed in its manifest or not)."""
    return sorted(cache_path.parent.glob(f"{cache_path.name}{SUFFIX}.*"))


def publish(cache_path: Path, segments: list[tuple[Path, int]]) -> None:
    """Make ``segments`` (segment file, rows used) the cache's rows: replace its manifest atomically, then
    delete the segment files it no longer lists (a transfer reading one keeps it until it is done)."""
    target = path_of(cache_path)
    temporary = target.with_name(target.name + ".tmp")
    temporary.write_text(json.dumps({"format": FORMAT,
                                     "segments": [{"file": p.name, "rows": int(n)} for p, n in segments]}))
    os.replace(temporary, target)
    listed = {p.name for p, _ in segments}
    for path in segment_files(cache_path):
        if path.name not in listed and not path.name.endswith(".tmp"):
            path.unlink(missing_ok=True)


class Writer:
    """Writes a segment file (:func:`segment_path`) of ``rows`` rows from parts of consecutive days
    (:meth:`add`); :meth:`close` completes it under its name (:func:`publish` makes it the cache's),
    :meth:`abandon` leaves nothing."""

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
        stamps = np.ascontiguousarray(datetimes.astype(f"<M8[{self.unit}]")).view("<i8")
        _pwrite(self.fd, stamps, 8 * self.rows)
        _pwrite(self.fd, np.ascontiguousarray(which, dtype="<i4"), self.instrument_at + 4 * self.rows)
        for k, column in enumerate(values):  # each column's part where that column's rows go on
            _pwrite(self.fd, np.ascontiguousarray(column, dtype="<f4"),
                    self.values_at + 4 * (k * self.expected + self.rows))
        starts = np.flatnonzero(np.diff(stamps, prepend=stamps[0] - 1))
        days, ends = stamps[starts], self.rows + np.append(starts[1:], n)
        if self.days and self.days[-1][-1] == days[0]:  # the part goes on with the last day of the one before
            self.ends[-1][-1] = ends[0]
            days, ends = days[1:], ends[1:]
        self.days.append(days)
        self.ends.append(ends)
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
