"""A feature set computed as Qlib's ``LocalDatasetProvider.dataset`` computes it (the same values,
index, columns and dtypes), without a DataFrame per instrument.

Qlib evaluates each instrument's expressions, then builds, re-indexes and masks one frame per
instrument and concatenates them all. Here the engine (:mod:`qlib_server.engine`) evaluates the
expressions for blocks of instruments at once (Qlib, field by field, where the engine leaves one to it)
and the frame is built once. What this module does not build itself (an expression cache in between,
``inst_processors``, a provider that does not align to the calendar) is computed by Qlib's own code.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def dataset(provider, instruments, fields, start_time, end_time, freq: str, inst_processors=(),
            by_date: bool = False) -> pd.DataFrame:
    """``provider.dataset(instruments, fields, start_time, end_time, freq, inst_processors)`` for Qlib's
    ``LocalDatasetProvider`` ``provider``, built without a frame per instrument (with no ``inst_processors``).

    ``by_date``: the same rows and values laid out as Qlib's dataset cache holds them (see :func:`by_date`)."""
    from qlib.data.data import Cal, ExpressionD, LocalExpressionProvider
    from qlib.utils import normalize_cache_fields, remove_fields_space

    from ..engine import features
    from ..engine.values import Unsupported

    def by_qlib():
        frame = provider.dataset(instruments, fields, start_time, end_time, freq, inst_processors=list(inst_processors))
        return cache_layout(frame) if by_date else frame

    window = Cal.calendar(start_time, end_time, freq)
    if inst_processors or type(getattr(ExpressionD, "_provider", None)) is not LocalExpressionProvider \
            or not provider.align_time or len(window) == 0:
        return by_qlib()
    instruments_d = provider.get_instruments_d(instruments, freq)
    column_names = provider.get_column_names(fields)
    names = normalize_cache_fields(column_names)
    spans_of = instruments_d if isinstance(instruments_d, dict) else dict.fromkeys(instruments_d)
    codes = sorted(spans_of)
    times = pd.DatetimeIndex(Cal.calendar(freq=freq)).to_numpy()  # the unit pandas infers, as for Qlib's frames
    dense = None  # (fields, instruments, days): every block's values, then the rows picked out of it
    rows = np.zeros((len(codes), len(window)), dtype=bool)  # where a row exists: any field has an entry there
    first = start = 0
    try:
        for block in features.of_qlib(codes, names, window[0], window[-1], freq):
            if dense is None:
                start = block.start  # the window's first calendar position
                dense = np.empty((len(names), len(codes), block.end - block.start + 1), dtype=np.float32)
            n = len(block.instruments)
            mine = rows[first:first + n]
            np.logical_or.reduce(block.present, out=mine)
            days = times[block.start:block.end + 1]
            for i, inst in enumerate(block.instruments):
                if spans_of[inst] is not None:
                    mine[i] &= _within(days, spans_of[inst])
            for k, values in enumerate(block.values):
                dense[k, first:first + n] = values
            first += n
    except Unsupported:
        return by_qlib()
    if dense is None or not rows.any():
        return by_qlib()  # Qlib's own empty frame (it evaluates the expressions again: they gave no rows)
    if by_date:  # day by day, instruments in order within a day
        day, which = np.nonzero(rows.T)
        taken = which * rows.shape[1] + day  # the rows' positions in each field's (instruments, days) array
        levels = [pd.DatetimeIndex(times[day + start]), np.array(codes, dtype=object)[which]]
        index = pd.MultiIndex.from_arrays(levels, names=["datetime", "instrument"])
        data = np.empty((len(names), len(day)), dtype=np.float32)
        for k in range(len(names)):
            np.take(dense[k].reshape(-1), taken, out=data[k])
        return pd.DataFrame(data.T, index=index, columns=list(names), copy=False)
    which, day = np.nonzero(rows)  # instrument by instrument, days in order
    index = pd.MultiIndex.from_arrays([np.array(codes, dtype=object)[which], pd.DatetimeIndex(times[day + start])],
                                      names=["instrument", "datetime"])
    column_of = {name: k for k, name in enumerate(names)}
    data = np.empty((len(column_names), len(day)), dtype=np.float32)  # pandas keeps a frame's columns so
    for j, name in enumerate(column_names):
        data[j] = dense[column_of[remove_fields_space(name)]][rows]
    return pd.DataFrame(data.T, index=index, columns=[str(c) for c in column_names], copy=False)


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


def _within(times: np.ndarray, spans) -> np.ndarray:
    """Which of ``times`` fall in one of the instrument's listing ``spans`` (both ends included)."""
    keep = np.zeros(len(times), dtype=bool)
    for begin, end in spans:
        keep |= (times >= pd.Timestamp(begin).to_datetime64()) & (times <= pd.Timestamp(end).to_datetime64())
    return keep
