"""The dataset cache as ``qlib_server.client`` reads it: one file of fixed-size records, mapped, not parsed.

A worker writes ``<uri>.records`` beside Qlib's files of the same cache (:mod:`qlib_server.worker.datacache`);
the front streams its rows (:mod:`qlib_server.front.transfer`). Qlib's HDF5 file is written only for the
stock pyqlib client, which reads it from a shared mount; this one costs a copy of the values to write and
nothing to read. Layout, all little-endian::

    records   rows x (datetime int64 | instrument code, NUL-padded bytes | values float32 x columns)
    days      int64 x days: each day of the rows (calendar order)
    ends      int64 x days: the row after each day's last row
    footer    JSON: rows, days, the datetime unit, the code width, the columns, ``[code, rows]`` of each instrument
    8 bytes   the footer's length
    8 bytes   :data:`MAGIC`

Rows are sorted by day, then instrument, as in Qlib's cache, so that the rows of a date range are one slice.
The file is written under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Optional

import numpy as np

SUFFIX = ".records"
MAGIC = b"QSREC001"
_TAIL = 16


def path_of(cache_path: Path) -> Path:
    return cache_path.with_suffix(SUFFIX)


def record_dtype(unit: str, width: int, columns: int) -> np.dtype:
    """One row: its day, its instrument's code (``width`` bytes) and ``columns`` float32 values."""
    return np.dtype([("datetime", f"<M8[{unit}]"), ("instrument", f"S{width}"), ("values", "<f4", (columns,))])


@dataclass(frozen=True)
class Records:
    """A records file, mapped: ``table`` (the rows), ``days`` and ``ends`` (each day's rows end there)."""

    table: np.ndarray
    days: np.ndarray
    ends: np.ndarray
    columns: list
    instruments: list  # [code, rows] of every instrument in the whole file, sorted by code

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
    dtype = record_dtype(footer["unit"], footer["width"], len(footer["columns"]))
    rows, days = footer["rows"], footer["days"]
    table = np.memmap(path, dtype=dtype, mode="r", shape=(rows,)) if rows else np.empty(0, dtype)
    offset = rows * dtype.itemsize
    stamps = np.fromfile(path, dtype="<i8", count=2 * days, offset=offset)
    return Records(table, stamps[:days].view(f"M8[{footer['unit']}]"), stamps[days:], footer["columns"],
                   footer["instruments"])


class Writer:
    """Writes a records file from parts of consecutive days (:meth:`add`); :meth:`close` completes it under
    its name, :meth:`abandon` leaves nothing."""

    def __init__(self, path: Path, columns: list, codes: list, unit: str):
        self.path = path
        self.temporary = path.with_name(path.name + ".tmp")
        self.columns = list(columns)
        self.codes = list(codes)
        width = -(-max([len(c.encode()) for c in self.codes] + [1]) // 4) * 4  # values on 4-byte boundaries
        self.dtype = record_dtype(unit, width, len(self.columns))
        self.unit = unit
        self.encoded = np.array([c.encode() for c in self.codes], dtype=f"S{width}")
        self.counts = np.zeros(len(self.codes), dtype=np.int64)
        self.days: list[np.ndarray] = []
        self.ends: list[np.ndarray] = []
        self.rows = 0
        self.buffer = np.empty(0, dtype=self.dtype)
        self.file: Optional[BinaryIO] = open(self.temporary, "wb")

    def add(self, datetimes: np.ndarray, which: np.ndarray, values: np.ndarray) -> None:
        """Rows sorted by day then instrument: their days, their instruments (positions in ``codes``) and
        ``values[column, row]``; the days follow those of the rows added before."""
        n = len(which)
        if n == 0:
            return
        if len(self.buffer) < n:  # one buffer for every part: fresh memory costs page faults
            self.buffer = np.empty(n, dtype=self.dtype)
        part = self.buffer[:n]
        part["datetime"] = datetimes
        part["instrument"] = self.encoded[which]
        part["values"] = values.T
        assert self.file is not None, "written after close"
        self.file.write(part.view(np.uint8).data)
        stamps = part["datetime"].view("<i8")
        starts = np.flatnonzero(np.diff(stamps, prepend=stamps[0] - 1))
        self.days.append(stamps[starts])
        self.ends.append(self.rows + np.append(starts[1:], n))
        self.counts += np.bincount(which, minlength=len(self.codes))
        self.rows += n

    def close(self) -> None:
        days = np.concatenate(self.days) if self.days else np.empty(0, "<i8")
        ends = np.concatenate(self.ends) if self.ends else np.empty(0, "<i8")
        if len(days) > 1 and np.any(np.diff(days) <= 0):
            self.abandon()
            raise ValueError("records added out of day order")
        instruments = [[c, int(n)] for c, n in sorted(zip(self.codes, self.counts.tolist())) if n]
        footer = json.dumps({"rows": self.rows, "days": len(days), "unit": self.unit,
                             "width": self.dtype["instrument"].itemsize, "columns": self.columns,
                             "instruments": instruments}, separators=(",", ":")).encode()
        f, self.file = self.file, None
        assert f is not None, "closed twice"
        f.write(days.astype("<i8").tobytes())
        f.write(ends.astype("<i8").tobytes())
        f.write(footer + len(footer).to_bytes(8, "little") + MAGIC)
        f.close()
        os.replace(self.temporary, self.path)

    def abandon(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        self.temporary.unlink(missing_ok=True)
