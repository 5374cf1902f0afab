"""A feature set computed as Qlib's ``LocalDatasetProvider.dataset`` computes it (the same values,
index, columns and dtypes), without a DataFrame per instrument.

Qlib evaluates each instrument's expressions, then builds, re-indexes and masks one frame per
instrument and concatenates them all: the frames took half of a cold task. Here Qlib evaluates the
expressions as usual, only their arrays are kept, and the frame is built once. Whatever this module
does not build itself (an expression cache in between, a value that is not float32, an index that is
not increasing calendar positions) is computed by Qlib's own code instead.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


class _Unusual(Exception):
    """A series this module does not assemble itself."""


def dataset(provider, instruments, fields, start_time, end_time, freq: str, inst_processors=()) -> pd.DataFrame:
    """``provider.dataset(instruments, fields, start_time, end_time, freq, inst_processors)`` for Qlib's
    ``LocalDatasetProvider`` ``provider``, built without a frame per instrument (with no ``inst_processors``)."""
    from qlib.data.data import Cal, ExpressionD, LocalExpressionProvider
    from qlib.utils import normalize_cache_fields, remove_fields_space

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
    kept, positions, values = [], [], []
    try:
        for inst in sorted(spans_of):
            series = [ExpressionD.expression(inst, name, window[0], window[-1], freq) for name in names]
            where, arrays = _aligned(series)
            if len(where) and spans_of[inst] is not None:
                keep = _within(times[where], spans_of[inst])
                where, arrays = where[keep], [a[keep] for a in arrays]
            if len(where):
                kept.append(inst)
                positions.append(where)
                values.append(arrays)
    except _Unusual:
        return by_qlib()
    if not kept:
        return by_qlib()  # Qlib's own empty frame (it evaluates the expressions again: they gave no rows)
    where = np.concatenate(positions)
    index = pd.MultiIndex.from_arrays(
        [np.repeat(np.array(kept, dtype=object), [len(p) for p in positions]), pd.DatetimeIndex(times[where])],
        names=["instrument", "datetime"])
    column_of = {name: j for j, name in enumerate(names)}
    block = np.empty((len(where), len(column_names)), dtype=np.float32)
    for j, column in enumerate(column_names):
        k = column_of[remove_fields_space(column)]
        block[:, j] = np.concatenate([arrays[k] for arrays in values])
    return pd.DataFrame(block, index=index, columns=[str(c) for c in column_names])


def _aligned(series: list[pd.Series]) -> tuple[np.ndarray, list[np.ndarray]]:
    """The calendar positions of one instrument's rows and each expression's values on them: the
    union of their indexes, missing values NaN (as a DataFrame of these series holds them)."""
    for s in series:
        if s.dtype != np.float32 or not pd.api.types.is_integer_dtype(s.index.dtype) \
                or not (s.index.is_monotonic_increasing and s.index.is_unique):
            raise _Unusual
    first = series[0].index
    if all(s.index.equals(first) for s in series[1:]):
        return first.to_numpy(dtype=np.int64), [s.to_numpy() for s in series]
    where = np.unique(np.concatenate([s.index.to_numpy(dtype=np.int64) for s in series]))
    return where, [s.reindex(where).to_numpy() for s in series]


def _within(times: np.ndarray, spans) -> np.ndarray:
    """Which of ``times`` fall in one of the instrument's listing ``spans`` (both ends included)."""
    keep = np.zeros(len(times), dtype=bool)
    for begin, end in spans:
        keep |= (times >= pd.Timestamp(begin).to_datetime64()) & (times <= pd.Timestamp(end).to_datetime64())
    return keep
