"""An Arrow IPC stream of feature rows (see :mod:`qlib_server.transfer`) → the frame Qlib gives.

Batches are copied one by one into arrays allocated once for every row (the schema says how many),
so the client holds the frame being built and one batch. The rows come sorted by date; the frame is
sorted by instrument then date, with Qlib's index names and the requested field names as columns.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa


def empty_frame(columns: list[str]) -> pd.DataFrame:
    """Qlib's frame of no rows (as its dataset processor builds it)."""
    index = pd.MultiIndex.from_arrays([[], []], names=("instrument", "datetime"))
    return pd.DataFrame(index=index, columns=columns, dtype=np.float32)


def read_frame(source, fields: list[str]) -> pd.DataFrame:
    """Read the stream from the file-like ``source`` into the frame of ``fields`` (Qlib's column names)."""
    reader = pa.ipc.open_stream(source)
    schema = reader.schema
    rows = int(schema.metadata[b"rows"])
    names = schema.names[2:]
    if rows == 0:
        for _ in reader:  # read to the end of the stream
            pass
        return empty_frame(fields)
    dtypes = {schema.field(n).type.to_pandas_dtype() for n in names}
    single = len(dtypes) == 1
    # one block in Fortran order: each column contiguous, and the frame's block without a copy
    block = np.empty((rows, len(names)), dtype=dtypes.pop(), order="F") if single else None
    columns = None if single else {n: np.empty(rows, schema.field(n).type.to_pandas_dtype()) for n in names}
    dates = np.empty(rows, dtype=schema.field("datetime").type.to_pandas_dtype())
    codes = np.empty(rows, dtype=np.int32)
    instruments: dict[str, int] = {}
    position = 0
    for batch in reader:
        end = position + batch.num_rows
        dates[position:end] = batch.column(0).to_numpy()
        inst = batch.column(1)
        local = np.array([instruments.setdefault(c, len(instruments)) for c in inst.dictionary.to_pylist()], np.int32)
        codes[position:end] = local[inst.indices.to_numpy()]
        for j, name in enumerate(names):
            values = batch.column(j + 2).to_numpy(zero_copy_only=False)
            if single:
                block[position:end, j] = values
            else:
                columns[name][position:end] = values
        position = end
    if position != rows:
        raise ConnectionError(f"the feature stream ended after {position} of {rows} rows")
    codes, levels = _by_name(codes, list(instruments))
    order = np.lexsort((dates, codes))
    if np.any(order != np.arange(rows)):
        codes, dates = codes[order], dates[order]
        for j in range(len(names)):  # one column at a time: never a second copy of the frame
            if single:
                block[:, j] = block[order, j]
            else:
                columns[names[j]] = columns[names[j]][order]
    date_level, date_codes = np.unique(dates, return_inverse=True)
    index = pd.MultiIndex(levels=[pd.Index(levels), pd.DatetimeIndex(date_level)], codes=[codes, date_codes],
                          names=["instrument", "datetime"], verify_integrity=False)
    frame = pd.DataFrame(block, index=index, columns=names, copy=False) if single else \
        pd.DataFrame(columns, index=index, copy=False)
    return _as_fields(frame, fields)


def _by_name(codes: np.ndarray, names: list[str]) -> tuple[np.ndarray, list[str]]:
    """Renumber instrument codes so that their order is the order of the sorted names."""
    ranks = np.empty(len(names), dtype=np.int32)
    ordered = sorted(range(len(names)), key=names.__getitem__)
    ranks[ordered] = np.arange(len(names), dtype=np.int32)
    return ranks[codes], [names[i] for i in ordered]


def _as_fields(frame: pd.DataFrame, fields: list[str]) -> pd.DataFrame:
    """Columns named and ordered as the requested fields (a repeated field repeats its column)."""
    cache_names = [f.replace(" ", "") for f in fields]
    if cache_names != list(frame.columns):
        frame = frame.loc[:, cache_names]
    frame.columns = list(fields)
    return frame
