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


def dataset(provider, instruments, fields, start_time, end_time, freq: str, inst_processors=()) -> pd.DataFrame:
    """``provider.dataset(instruments, fields, start_time, end_time, freq, inst_processors)`` for Qlib's
    ``LocalDatasetProvider`` ``provider``, built without a frame per instrument (with no ``inst_processors``)."""
    from qlib.data.data import Cal, ExpressionD, LocalExpressionProvider
    from qlib.utils import normalize_cache_fields, remove_fields_space

    from ..engine import features
    from ..engine.values import Unsupported

    def by_qlib():
        return provider.dataset(instruments, fields, start_time, end_time, freq, inst_processors=list(inst_processors))

    window = Cal.calendar(start_time, end_time, freq)
    if inst_processors or type(getattr(ExpressionD, "_provider", None)) is not LocalExpressionProvider \
            or not provider.align_time or len(window) == 0:
        return by_qlib()
    instruments_d = provider.get_instruments_d(instruments, freq)
    column_names = provider.get_column_names(fields)
    names = normalize_cache_fields(column_names)
    spans_of = instruments_d if isinstance(instruments_d, dict) else dict.fromkeys(instruments_d)
    times = pd.DatetimeIndex(Cal.calendar(freq=freq)).to_numpy()  # the unit pandas infers, as for Qlib's frames
    codes: list[np.ndarray] = []
    positions: list[np.ndarray] = []
    columns: list[list[np.ndarray]] = [[] for _ in names]
    try:
        for block in features.of_qlib(sorted(spans_of), names, window[0], window[-1], freq):
            rows = np.logical_or.reduce(block.present)  # (instruments, days): where any field has an entry
            days = times[block.start:block.end + 1]
            for i, inst in enumerate(block.instruments):
                if spans_of[inst] is not None:
                    rows[i] &= _within(days, spans_of[inst])
            which, day = np.nonzero(rows)  # instrument by instrument, days in order
            codes.append(np.array(block.instruments, dtype=object)[which])
            positions.append(day + block.start)
            for values, column in zip(block.values, columns):
                column.append(values[rows])
    except Unsupported:
        return by_qlib()
    where = np.concatenate(positions) if positions else np.array([], dtype=np.int64)
    if not len(where):
        return by_qlib()  # Qlib's own empty frame (it evaluates the expressions again: they gave no rows)
    index = pd.MultiIndex.from_arrays([np.concatenate(codes), pd.DatetimeIndex(times[where])],
                                      names=["instrument", "datetime"])
    column_of = {name: j for j, name in enumerate(names)}
    data = np.empty((len(column_names), len(where)), dtype=np.float32)  # pandas keeps a frame's columns so
    for j, column in enumerate(column_names):
        data[j] = np.concatenate(columns[column_of[remove_fields_space(column)]])
    return pd.DataFrame(data.T, index=index, columns=[str(c) for c in column_names], copy=False)


def _within(times: np.ndarray, spans) -> np.ndarray:
    """Which of ``times`` fall in one of the instrument's listing ``spans`` (both ends included)."""
    keep = np.zeros(len(times), dtype=bool)
    for begin, end in spans:
        keep |= (times >= pd.Timestamp(begin).to_datetime64()) & (times <= pd.Timestamp(end).to_datetime64())
    return keep
