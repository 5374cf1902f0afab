"""A feature request's frame built on the server's dataset cache files, mapped: for a client on the server's
host, which asks where the rows lie (``POST /features?delivery=files``) instead of having them streamed.

Each file is opened, checked to be the very file the server named (device, inode, size and mtime: a file
the server replaced in between, or another host's file of the same name, is not read) and mapped
copy-on-write: the frame's values are the file's pages, shared with the page cache the worker wrote them to,
and writing to the frame changes this process's copy only. All of a cache's rows of one file (a cache
computed at once, asked for whole) are a view of it; other rows (a date range, a cache extended by segments)
are copied out of the mapped files into the frame. Anything that cannot be mapped as told raises
:class:`Unplaceable` (an ``OSError``), and the client asks for the stream instead.
"""

from __future__ import annotations

import mmap
import os

import numpy as np
import pandas as pd

from .frames import day_level, empty_frame, frame_of


class Unplaceable(OSError):
    """The rows cannot be read where the server says they lie."""


def read_placed(placement: dict, fields: list[str], unit: str) -> pd.DataFrame:
    """The frame of ``fields`` (Qlib's column names) from a placement (see
    :mod:`qlib_server.front.placement`), its ``datetime`` level of resolution ``unit``."""
    try:
        rows = int(placement["rows"])
        if rows == 0:
            return empty_frame(fields)
        names = [str(code) for code, _ in placement["instruments"]]
        counts = np.array([int(n) for _, n in placement["instruments"]], dtype=np.int64)
        files = [(str(f["path"]), [int(v) for v in f["identity"]], int(f["values"]), int(f["stride"]))
                 for f in placement["files"]]
        positions = [int(p) for p in placement["columns"]]
        pieces = [(int(f), int(a), int(b)) for f, a, b in placement["pieces"]]
        unit_of_file, columns = str(placement["unit"]), list(placement["names"])
    except (KeyError, TypeError, ValueError) as exc:
        raise Unplaceable(f"not a placement: {exc!r}") from None
    if counts.sum() != rows or sum(b - a for _, a, b in pieces) != rows or len(columns) != len(positions):
        raise Unplaceable("the placement's rows do not add up")
    maps = [_mapped(path, identity) for path, identity, _, _ in files]
    stamps, values = _rows(maps, files, positions, pieces, rows)
    days = day_level(stamps, np.dtype(f"M8[{unit_of_file}]"))
    return frame_of(names, counts, days, [(columns, values)], fields, unit)


def _mapped(path: str, identity: list[int]) -> mmap.mmap:
    """The file at ``path``, mapped copy-on-write, if it is the one of ``identity`` (device, inode, size, mtime)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns] != identity:
            raise Unplaceable(f"{path} is not the file the server named")
        return mmap.mmap(fd, st.st_size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


def _rows(maps: list, files: list, positions: list[int], pieces: list, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows' days (int64) and values (rows x columns, each column contiguous): views of the file where the
    rows are one piece and the columns follow each other in it, else copied out piece by piece."""
    if min(positions, default=0) < 0:
        raise Unplaceable("a column out of its file")
    top = max(positions, default=-1) + 1
    first = positions[0] if positions else 0
    consecutive = positions == list(range(first, first + len(positions)))

    def piece(f: int, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """The days and the first ``top`` columns' values of rows ``a`` to ``b`` of file ``f``."""
        if not 0 <= f < len(maps) or not 0 <= a <= b <= files[f][3]:
            raise Unplaceable(f"a piece out of its file: {[f, a, b]}")
        at, stride = files[f][2], files[f][3]
        try:
            return (np.ndarray((b - a,), "<i8", maps[f], 8 * a),
                    np.ndarray((b - a, top), "<f4", maps[f], at + 4 * a, (4, 4 * stride)))
        except (TypeError, ValueError) as exc:  # beyond the end of the file
            raise Unplaceable(f"a piece out of its file: {exc}") from None

    if len(pieces) == 1 and consecutive:
        days, block = piece(*pieces[0])
        return days, block[:, first:top]
    stamps = np.empty(rows, dtype=np.int64)
    values = np.empty((rows, len(positions)), dtype=np.float32, order="F")
    at = 0
    for f, a, b in pieces:
        days, block = piece(f, a, b)
        stamps[at:at + b - a] = days
        if consecutive:
            values[at:at + b - a] = block[:, first:top]
        else:
            for j, p in enumerate(positions):
                values[at:at + b - a, j] = block[:, p]
        at += b - a
    return stamps, values
