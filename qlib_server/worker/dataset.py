"""A feature set computed as Qlib's ``LocalDatasetProvider.dataset`` computes it (the same values,
index, columns and dtypes), without a DataFrame per instrument.

Qlib evaluates each instrument's expressions, then builds, re-indexes and masks one frame per
instrument and concatenates them all. Here the engine (:mod:`qlib_server.engine`) evaluates the
expressions for blocks of instruments at once (Qlib, field by field, where the engine leaves one to it)
and the frame is built once. What this module does not build itself (an expression cache in between,
``inst_processors``, a provider that does not align to the calendar) is computed by Qlib's own code.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd

from ..errors import ComputeError

#: a feature set larger than this is held in a scratch file (mapped) while it is computed, not in memory
IN_MEMORY_BYTES = 1 << 30
#: rows of one piece of the cache written at a time: about this many bytes of values, at most ``CHUNK_ROWS`` rows
#: (a piece's arrays are made again for every piece: small ones are reused memory, not fresh pages)
CHUNK_BYTES = 32 << 20
CHUNK_ROWS = 1 << 16
#: the ``attrs`` key of a piece holding the length of the longest instrument code of all the pieces
CODE_WIDTH = "instrument_width"


@dataclass
class Computed:
    """A feature set computed by the engine: ``dense[k, i, d]`` is field ``names[k]`` of ``codes[i]`` on
    calendar position ``start + d``; ``rows[i, d]`` says whether that row exists in Qlib's frame."""

    codes: list
    names: list
    times: np.ndarray  # the whole calendar, as Qlib's frames hold it
    start: int
    rows: np.ndarray
    dense: Optional[np.ndarray]  # None when the rows went straight to a records file
    checkpoint: object = None  # the engine's checkpoint (``engine.checkpoint.Checkpoint``), when asked for
    written: Optional[tuple] = None  # that records file and its days

    @property
    def held(self) -> np.ndarray:
        assert self.dense is not None, "the rows went straight to a records file"
        return self.dense

    def by_instrument(self, column_names: list) -> pd.DataFrame:
        """Qlib's ``dataset`` frame: rows by instrument then day, the requested columns in their order."""
        from qlib.utils import remove_fields_space

        which, day = np.nonzero(self.rows)
        index = pd.MultiIndex.from_arrays(
            [np.array(self.codes, dtype=object)[which], pd.DatetimeIndex(self.times[day + self.start])],
            names=["instrument", "datetime"])
        column_of = {name: k for k, name in enumerate(self.names)}
        data = np.empty((len(column_names), len(day)), dtype=np.float32)  # pandas keeps a frame's columns so
        for j, name in enumerate(column_names):
            data[j] = self.held[column_of[remove_fields_space(name)]][self.rows]
        return pd.DataFrame(data.T, index=index, columns=[str(c) for c in column_names], copy=False)

    def date_parts(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The rows in the order of Qlib's dataset cache (by day, then instrument), in parts of consecutive days
        of about :data:`CHUNK_BYTES` (at most :data:`CHUNK_ROWS` rows): each part's days (datetime64),
        instruments (positions in ``codes``) and ``values[field, row]``, the fields sorted (Qlib's layout)."""
        per_day = self.rows.sum(axis=0)
        fields = sorted(range(len(self.names)), key=self.names.__getitem__)
        target = max(1, min(CHUNK_ROWS, CHUNK_BYTES // (4 * max(1, len(self.names)))))
        first = 0
        while first < len(per_day):
            last = first + max(1, int(np.searchsorted(np.cumsum(per_day[first:]), target, side="right")))
            day, which = np.nonzero(self.rows[:, first:last].T)  # (days, instruments)
            if len(day):
                width = last - first
                taken = which * width + day  # positions in each field's (instruments, days) piece
                data = np.empty((len(self.names), len(day)), dtype=np.float32)
                for j, k in enumerate(fields):
                    np.take(np.ascontiguousarray(self.held[k, :, first:last]).reshape(-1), taken, out=data[j])
                yield self.times[day + first + self.start], which, data
            first = last

    def instrument_parts(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The rows in the records' order (by instrument, then day), in parts of consecutive instruments of about
        :data:`CHUNK_BYTES` (at most :data:`CHUNK_ROWS` rows, an instrument's rows in one part): each part's days
        (datetime64), instruments (positions in ``codes``) and ``values[field, row]``. Every part's values are in
        one buffer (fresh memory costs page faults): a part is valid only until the next is asked for."""
        per_instrument = self.rows.sum(axis=1)
        target = max(1, min(CHUNK_ROWS, CHUNK_BYTES // (4 * max(1, len(self.names)))))
        buffer = np.empty((len(self.names), 0), dtype=np.float32)
        first = 0
        while first < len(per_instrument):
            last = first + max(1, int(np.searchsorted(np.cumsum(per_instrument[first:]), target, side="right")))
            mask = self.rows[first:last]
            which, day = np.nonzero(mask)  # (instruments, days): by instrument, then day
            if len(day):
                if buffer.shape[1] < len(day):
                    buffer = np.empty((len(self.names), max(len(day), target)), dtype=np.float32)
                data = buffer[:, :len(day)]
                taken = np.flatnonzero(mask)
                for k in range(len(self.names)):
                    np.take(self.held[k, first:last].reshape(-1), taken, out=data[k])
                yield self.times[day + self.start], which + first, data
            first = last

    def by_date(self) -> Iterator[pd.DataFrame]:
        """The frame in the dataset cache's layout (:func:`cache_layout`), in the pieces of :meth:`date_parts`."""
        codes = np.array(self.codes, dtype=object)
        width = max(len(code) for code in self.codes)
        for datetimes, which, data in self.date_parts():
            index = pd.MultiIndex.from_arrays([pd.DatetimeIndex(datetimes), codes[which]],
                                              names=["datetime", "instrument"])
            piece = pd.DataFrame(data.T, index=index, columns=sorted(self.names), copy=False)
            piece.attrs[CODE_WIDTH] = width
            yield piece


@dataclass
class CacheRows:
    """A feature set to write as a dataset cache, in its two forms: ``parts()`` for the records file
    (:meth:`Computed.instrument_parts`) and ``frames()`` for Qlib's HDF5 file (:meth:`Computed.by_date`)."""

    columns: list  # the cache's columns: each field once, spaces removed (in the order of the request computing it)
    codes: list  # sorted
    unit: str  # of the days
    rows: int
    parts: Callable[[], Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]]  # each valid until the next
    frames: Callable[[], Iterator[pd.DataFrame]]
    checkpoint: object = None  # what extends the cache when days are appended (the engine's), if anything
    written: Optional[tuple] = None  # the records file already written as the engine computed (and its days)


def cache_rows(provider, instruments, fields, start_time, end_time, freq: str, inst_processors=(),
               scratch: Optional[Path] = None, segment: Optional[Path] = None) -> CacheRows:
    """The feature set of a dataset cache, computed by the engine (by Qlib where it must be), with the engine's
    checkpoint for a later extension. With ``segment`` (no HDF5 form wanted), the engine writes its rows there
    block by block, and ``frames`` is not to be asked for."""
    from qlib.utils import normalize_cache_fields

    computed = compute(provider, instruments, fields, start_time, end_time, freq, inst_processors, scratch,
                       checkpoint=True, segment=segment)
    if computed is not None:
        return CacheRows(computed.names, computed.codes, np.datetime_data(computed.times.dtype)[0],
                         int(computed.rows.sum()), computed.instrument_parts,
                         computed.by_date, computed.checkpoint, computed.written)
    frame = cache_layout(provider.dataset(instruments, fields, start_time, end_time, freq,
                                          inst_processors=list(inst_processors)))
    other = [(c, t) for c, t in frame.dtypes.items() if t != np.float32] if inst_processors else []
    if other:  # a cache holds float32 values: served, they would not be what local Qlib gives
        raise ComputeError(f"inst_processors left column {str(other[0][0])[:60]!r} as {other[0][1]}: the server "
                           "serves float32 values, as Qlib computes them (cast the processor's result)")
    if frame.empty:
        return CacheRows(normalize_cache_fields(fields), [], "ns", 0, lambda: iter(()), lambda: iter(()))
    which, codes = pd.factorize(frame.index.get_level_values("instrument"), sort=True)
    days = frame.index.get_level_values("datetime").to_numpy()

    def parts():  # by instrument, then day
        order = np.lexsort((days, which))
        yield days[order], which[order], frame.to_numpy(np.float32)[order].T

    return CacheRows(list(frame.columns), list(codes), np.datetime_data(days.dtype)[0], len(frame), parts,
                     lambda: iter([frame]))


def compute(provider, instruments, fields, start_time, end_time, freq: str, inst_processors=(),
            scratch: Optional[Path] = None, checkpoint: bool = False,
            segment: Optional[Path] = None) -> Optional[Computed]:
    """The feature set computed by the engine, or None where Qlib must compute it (``inst_processors``, an
    expression cache, a provider that does not align to the calendar, a field Qlib left in another dtype, no
    rows at all). A set over :data:`IN_MEMORY_BYTES` is held in a file under ``scratch`` (deleted at once,
    mapped while it lives), so a worker's memory stays bounded whatever the market's size. With ``segment``, the
    rows are not held: each block's are written to that records file as it comes (``written``)."""
    from qlib.data.data import Cal, ExpressionD, LocalExpressionProvider
    from qlib.utils import remove_fields_space

    from ..engine import features
    from ..engine.checkpoint import Checkpoint
    from ..engine.kernels import rows as kernel_rows
    from ..engine.values import Unsupported
    from ..state import records

    window = Cal.calendar(start_time, end_time, freq)
    if inst_processors or type(getattr(ExpressionD, "_provider", None)) is not LocalExpressionProvider \
            or not provider.align_time or len(window) == 0:
        return None
    instruments_d = provider.get_instruments_d(instruments, freq)
    names = list(dict.fromkeys(remove_fields_space(provider.get_column_names(fields))))  # in the request's order:
    # what a client of this order maps as it is (a client of another order reads the columns by name)
    spans_of = instruments_d if isinstance(instruments_d, dict) else dict.fromkeys(instruments_d)
    codes = sorted(spans_of)
    times = pd.DatetimeIndex(Cal.calendar(freq=freq)).to_numpy()  # the unit pandas infers, as for Qlib's frames
    rows = np.zeros((len(codes), len(window)), dtype=bool)  # where a row exists: any field has an entry there
    unit = np.datetime_data(times.dtype)[0]
    writer = records.Writer(segment, names, codes, unit, rows.size, at_most=True) if segment else None
    dense = None if writer else _dense((len(names), len(codes), len(window)), scratch)
    buffer = np.empty(0, dtype=np.float32)
    first = start = 0
    saved = []
    try:
        for block in features.of_qlib(codes, names, window[0], window[-1], freq, checkpoint=checkpoint):
            saved.append(block.checkpoint)
            start = block.start  # the window's first calendar position
            n = len(block.instruments)
            mine = rows[first:first + n]
            np.logical_or.reduce(block.present, out=mine)
            mine &= listed(times[block.start:block.end + 1], [spans_of[inst] for inst in block.instruments])
            if dense is not None:
                for k, values in enumerate(block.values):
                    dense[k, first:first + n] = values
            elif writer is not None:  # the block's rows, by instrument then day, in memory reused from block to block
                which, day = np.nonzero(mine)
                if buffer.size < len(names) * len(day):
                    buffer = np.empty(len(names) * len(day), dtype=np.float32)
                data = buffer[:len(names) * len(day)].reshape(len(names), len(day))
                for k, values in enumerate(block.values):
                    kernel_rows.compress(values, mine, data[k])
                writer.add(times[day + start], which + first, data, times[np.flatnonzero(mine.any(axis=0)) + start])
            first += n
        if not rows.any():
            raise Unsupported("no rows")  # Qlib's own empty frame (it evaluates the expressions again)
        written = (segment, writer.close()) if writer else None
    except BaseException as failed:
        if writer:
            writer.abandon()
        if isinstance(failed, Unsupported):
            return None
        raise
    kept = Checkpoint(list(names), start, start + len(window) - 1, saved) if checkpoint else None
    return Computed(codes, list(names), times, start, rows, dense, kept, written)


def _dense(shape: tuple, scratch: Optional[Path]) -> np.ndarray:
    """An uninitialised float32 array of ``shape``: in memory, or (large, with ``scratch``) mapped from a
    file that is unlinked at once (the mapping keeps it until the array goes; a crash leaves nothing)."""
    if scratch is None or 4 * int(np.prod(shape)) <= IN_MEMORY_BYTES:
        return np.empty(shape, dtype=np.float32)
    with tempfile.NamedTemporaryFile(dir=scratch, prefix=".engine-", delete=True) as backing:
        return np.memmap(backing, dtype=np.float32, mode="w+", shape=shape)


def dataset(provider, instruments, fields, start_time, end_time, freq: str, inst_processors=()) -> pd.DataFrame:
    """``provider.dataset(instruments, fields, start_time, end_time, freq, inst_processors)`` for Qlib's
    ``LocalDatasetProvider`` ``provider``, built without a frame per instrument (with no ``inst_processors``)."""
    computed = compute(provider, instruments, fields, start_time, end_time, freq, inst_processors)
    if computed is None:
        return provider.dataset(instruments, fields, start_time, end_time, freq, inst_processors=list(inst_processors))
    return computed.by_instrument(provider.get_column_names(fields))


def cache_layout(frame: pd.DataFrame) -> pd.DataFrame:
    """A frame of Qlib's ``dataset`` laid out as Qlib's ``gen_dataset_cache`` writes it: rows sorted by
    ``(datetime, instrument)``, columns renamed without spaces, each once, sorted."""
    from qlib.utils import remove_fields_space

    if frame.empty:
        return frame
    frame = frame.swaplevel("instrument", "datetime").sort_index()
    frame = frame.set_axis(remove_fields_space(frame.columns), axis=1)
    frame = frame.loc[:, ~frame.columns.duplicated()]
    return frame[sorted(frame.columns)]


def listed(times: np.ndarray, spans_of: list) -> np.ndarray:
    """``[instrument, time]``: whether each of ``times`` (sorted) falls in one of the instrument's listing spans
    (both ends included; spans ``None``: always)."""
    keep = np.zeros((len(spans_of), len(times)), dtype=bool)
    owners, begins, ends = [], [], []
    for i, spans in enumerate(spans_of):
        if spans is None:
            keep[i] = True
        for begin, end in spans or ():
            owners.append(i)
            begins.append(begin)
            ends.append(end)
    if owners:  # compared at the finer unit, as ``times >= begin`` compares
        exact = times.astype("M8[ns]")
        first = np.searchsorted(exact, pd.DatetimeIndex(begins).as_unit("ns").to_numpy(), "left").tolist()
        after = np.searchsorted(exact, pd.DatetimeIndex(ends).as_unit("ns").to_numpy(), "right").tolist()
        for i, a, b in zip(owners, first, after):
            keep[i, a:b] = True
    return keep
