"""Feature data inline: ``POST /features`` streams the rows a feature request asks for out of its
dataset cache, as Arrow IPC record batches (lz4, zstd or uncompressed), so that clients need no
shared mount.

The body is a Socket.IO request event (``{"head": {"version": ...}, "body": <JSON text>}``) and goes
through the same admission (``allowed_networks``, or ``auth_token`` as ``Authorization: Bearer``) and
the same checks as every request. The cache itself is only ever computed through the pipeline: when
the request's dataset cache is not current here, the answer is 409 and the client sends the same
request as a ``feature_request`` event (computed once, de-duplicated), then asks again.

The stream holds exactly the requested dates and fields: one batch of about ``CHUNK_BYTES`` at a time
is read from the HDF5 file, encoded and written, so neither side holds more than a few chunks. Batch
columns: ``datetime``; ``instrument``, an int32 index into the schema metadata ``instruments`` (a JSON
list of ``[code, rows]`` sorted by code, from which the client places each row of a batch where it
belongs in the frame at once); then ``fixed_size_list`` columns, each a row of up to ``GROUP_COLUMNS``
requested fields of one values block of the cache (their names, spaces removed as in Qlib's cache
columns, in the field metadata ``columns``): rows are sent as the block holds them, not field by
field, and pyarrow compresses the groups of a batch on all cores. The schema metadata ``rows`` says
how many rows follow.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import pickle
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import tables
from flask import Response, request
from gevent.monkey import get_original
from qlib.data.cache import DatasetCache, DiskDatasetCache

from ..errors import RequestError
from ..state.sources import is_current
from . import guard

log = logging.getLogger(__name__)

CHUNK_BYTES = 2 << 20  # malloc reuses buffers of this size; 4 MB ones were mapped afresh (page faults) each time
MEDIA_TYPE = "application/vnd.apache.arrow.stream"
COMPRESSIONS = ("lz4", "zstd", "none")
GROUP_COLUMNS = 40


def dataset_uri(args: dict) -> str:
    """The file name of the dataset cache a processor computes for these (checked) feature arguments."""
    return DiskDatasetCache._uri(args["instruments"], args["fields"], None, None, args["freq"], 1)


def cache_columns(fields: list) -> list[str]:
    """The cache columns the requested fields are read from: each distinct field once, in request order."""
    from qlib.utils import remove_fields_space

    return list(dict.fromkeys(remove_fields_space(fields)))


@dataclass(frozen=True)
class Layout:
    """Where things are in one dataset cache file (pandas' HDF5 table format), read once per version."""

    spans: pd.DataFrame  # Qlib's index: date → [start, end) rows
    blocks: dict  # column → (values block, position in it)
    dtypes: dict  # column → numpy dtype
    date_dtype: np.dtype
    fields: frozenset  # the cache's columns, from its meta
    table: Any  # the open HDF5 table (read-only; closed when this layout leaves the cache); None: no rows
    lock: contextlib.AbstractContextManager  # one reader of the table at a time (pytables: not thread-safe); OS lock
    counts: OrderedDict  # (start, stop) → ``[code, rows]`` of each instrument in those rows (the windows sent last)

    def rows(self, start_time, end_time) -> tuple[int, int]:
        """Rows ``[start, stop)`` holding the dates from ``start_time`` to ``end_time``."""
        spans = self.spans.loc[start_time:end_time]
        if spans.shape[0] == 0:
            return 0, 0
        return int(spans["start"].iloc[0]), int(spans["end"].iloc[-1])


_layouts: OrderedDict[tuple, Layout] = OrderedDict()
_os_lock = get_original("threading", "Lock")  # a lock of OS threads, also where gevent patched threading


def layout(cache_path: Path) -> Layout:
    """The :class:`Layout` of the cache (kept for the 32 caches used last, by file size and mtime)."""
    st = cache_path.stat()
    version = (str(cache_path), st.st_size, st.st_mtime_ns)
    if version in _layouts:
        _layouts.move_to_end(version)
        return _layouts[version]
    spans = DiskDatasetCache.IndexManager(cache_path).get_index()
    fields = frozenset(pickle.loads(cache_path.with_suffix(".meta").read_bytes())["info"]["fields"])
    blocks, dtypes, date_dtype, table = {}, {}, np.dtype("M8[ns]"), None
    h5 = tables.open_file(cache_path, mode="r")
    node = f"/{DatasetCache.HDF_KEY}/table"
    if node in h5:  # a cache of no rows is in pandas' fixed format: no table, no rows to read
        table = h5.get_node(node)
        date_dtype = np.dtype(str(table.attrs.datetime_dtype))
        for name in table.colnames:
            if name.startswith("values_block_"):
                for position, column in enumerate(getattr(table.attrs, f"{name}_kind")):
                    blocks[column] = (name, position)
                    dtypes[column] = np.dtype(str(getattr(table.attrs, f"{name}_dtype")))
    else:
        h5.close()
    found = Layout(spans, blocks, dtypes, date_dtype, fields, table, _os_lock(), OrderedDict())
    _layouts[version] = found
    while len(_layouts) > 32:
        _close(_layouts.popitem(last=False)[1])
    return found


def _close(where: Layout) -> None:
    if where.table is not None:
        with where.lock:
            where.table._v_file.close()


@atexit.register
def close_layouts() -> None:
    """Close every cache file kept open."""
    while _layouts:
        _close(_layouts.popitem()[1])


def _factorize(codes: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Instrument codes (fixed-width bytes) → (int32 index of each, distinct codes as text)."""
    if codes.dtype.itemsize in (1, 2, 4, 8):  # as unsigned integers: a hash, not a sort of strings
        width = codes.dtype.itemsize
        index, distinct = pd.factorize(codes.view(f"u{width}"))
        return index.astype(np.int32), [c.decode() for c in distinct.view(f"S{width}")]
    distinct, index = np.unique(codes, return_inverse=True)
    return index.astype(np.int32), [c.decode() for c in distinct]


def _ranges(start: int, stop: int, rows: int):
    for offset in range(start, stop, rows):
        yield offset, min(stop, offset + rows)


def _instruments(where: Layout, start: int, stop: int, rows: int) -> list[list]:
    """``[code, rows]`` of every instrument in rows ``[start, stop)``, sorted by code: one pass over the
    instrument column, a chunk at a time, the first time these rows are sent."""
    found = where.counts.get((start, stop))
    if found is not None:
        return found
    counts: dict[str, int] = {}
    for first, last in _ranges(start, stop, rows):
        with where.lock:
            codes = where.table.read(first, last, field="instrument")
        index, distinct = _factorize(codes)
        for code, n in zip(distinct, np.bincount(index, minlength=len(distinct)).tolist()):
            counts[code] = counts.get(code, 0) + n
    found = [[code, counts[code]] for code in sorted(counts)]
    with where.lock:  # transfers run in several threads
        where.counts[start, stop] = found
        while len(where.counts) > 64:
            where.counts.popitem(last=False)
    return found


def _groups(where: Layout, columns: list[str]) -> list[tuple[str, list[str], list[int]]]:
    """(values block, requested columns in it, their positions in the block), at most
    ``GROUP_COLUMNS`` columns each (pyarrow compresses the groups of a batch on all cores)."""
    groups: dict[str, tuple[list, list]] = {}
    for column in columns:
        block, position = where.blocks[column]
        names, positions = groups.setdefault(block, ([], []))
        names.append(column)
        positions.append(position)
    return [(block, names[i:i + GROUP_COLUMNS], positions[i:i + GROUP_COLUMNS])
            for block, (names, positions) in groups.items() for i in range(0, len(names), GROUP_COLUMNS)]


def _schema(where: Layout, groups: list, instruments: list, rows: int) -> pa.Schema:
    fields = [pa.field("datetime", pa.from_numpy_dtype(where.date_dtype)), pa.field("instrument", pa.int32())]
    for i, (_, names, _) in enumerate(groups):
        value_type = pa.from_numpy_dtype(where.dtypes[names[0]])
        fields.append(pa.field(f"block{i}", pa.list_(value_type, len(names)), nullable=False,
                               metadata={"columns": json.dumps(names)}))
    return pa.schema(fields, metadata={"rows": str(rows), "instruments": json.dumps(instruments)})


def _batch(records: np.ndarray, groups: list, index_of: dict, where: Layout, schema: pa.Schema) -> pa.RecordBatch:
    local, distinct = _factorize(records["instrument"])
    codes = np.array([index_of[c] for c in distinct], dtype=np.int32)[local]
    arrays = [pa.array(records["datetime"].view(where.date_dtype)), pa.array(codes)]
    for block, names, positions in groups:
        values = records[block]
        span = slice(positions[0], positions[-1] + 1)
        values = values[:, span] if positions == list(range(span.start, span.stop)) else values[:, positions]
        flat = pa.array(np.ascontiguousarray(values).reshape(-1))
        arrays.append(pa.FixedSizeListArray.from_arrays(flat, len(names)))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


class _Chunks:
    """A write-only file for pyarrow's stream writer that hands back what was written since last asked."""

    closed = False

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def take(self) -> bytes:
        data, self.parts = b"".join(self.parts), []
        return data


def stream(where: Layout, columns: list[str], start: int, stop: int, compression: str):
    """Yield the Arrow IPC stream of rows ``[start, stop)`` and ``columns`` of the cache, chunk by chunk."""
    rows = max(1024, CHUNK_BYTES // (4 * max(1, len(where.blocks))))
    if stop > start:
        instruments = _instruments(where, start, stop, rows)
        groups = _groups(where, columns)
        schema = _schema(where, groups, instruments, stop - start)
    else:  # no rows: a stream of no batches
        instruments, groups, schema = [], [], pa.schema([], metadata={"rows": "0", "instruments": "[]"})
    chunks = _Chunks()
    options = pa.ipc.IpcWriteOptions(compression=None if compression == "none" else compression)
    writer = pa.ipc.new_stream(pa.PythonFile(chunks, mode="w"), schema, options=options)
    index_of = {code: i for i, (code, _) in enumerate(instruments)}
    for first, last in _ranges(start, stop, rows):
        with where.lock:
            records = where.table.read(first, last)
        writer.write_batch(_batch(records, groups, index_of, where, schema))
        yield chunks.take()
    writer.close()
    yield chunks.take()


def ahead(pieces, spawn):
    """Yield what the generator ``pieces`` yields, making each next piece in an OS thread
    (``spawn(call, *args)`` returns a handle whose ``result()`` waits for it) while the one before is sent."""
    pending = spawn(next, pieces, None)
    try:
        while (piece := pending.result()) is not None:
            pending = spawn(next, pieces, None)
            yield piece
    finally:  # also when the client went away: the thread is done with ``pieces`` before they close
        with contextlib.suppress(Exception):
            pending.result()
        pieces.close()


def _spawner(async_mode: str):
    """``spawn(call, *args)`` running ``call`` in an OS thread; waiting on its handle lets the handler's
    other clients go on (gevent's thread pool, or a plain one in threading mode; either handle, an AsyncResult
    or a Future, has ``result()``)."""
    if async_mode == "gevent":
        import gevent

        return lambda call, *args: gevent.get_hub().threadpool.spawn(call, *args)
    return ThreadPoolExecutor(8, thread_name_prefix="feature-transfer").submit


def body_limit(cfg) -> int:
    """Bytes of a ``POST /features`` body read at most: the envelope of a body of ``max_body_bytes``
    characters, whose JSON text escaped in it may take up to twice that (a quote becomes two characters)."""
    return min(cfg.max_message_bytes, 2 * cfg.max_body_bytes + 4096)


def register(handler) -> None:
    """Add ``POST /features`` to the handler's Flask app: admitted, the body read up to
    :func:`body_limit` and decoded (see :mod:`qlib_server.front.guard`), at most ``max_transfers`` at once
    (``max_transfers_per_client`` from one address), a client that stops reading released after
    ``transfer_timeout``."""
    cfg = handler.cfg
    spawn = _spawner(cfg.async_mode)
    limit = body_limit(cfg)
    what = f"POST /features ({'2 x max_body_bytes + 4 KiB' if limit < cfg.max_message_bytes else 'max_message_bytes'})"
    timeout = cfg.transfer_timeout if cfg.async_mode == "gevent" else None
    slots = guard.Slots(cfg.max_transfers, cfg.max_transfers_per_client, "feature transfers",
                        ("max_transfers", "max_transfers_per_client"))
    handler.transfer_slots = slots

    @handler.app.post("/features")
    def features():
        peer = request.remote_addr
        if not handler.admission.admits_http(peer, request.headers.get("Authorization"),
                                             request.query_string.decode(errors="replace")):
            handler.metrics.refused_connections.inc()
            log.warning("refused feature transfer to %s", peer)
            return guard.answer(403, 1, "connection refused: not in allowed_networks and no valid auth_token")
        try:
            free = _checked(peer)
        except guard.Refused as refused:
            if refused.code != 429:
                log.info("refused feature transfer to %s: %d %s", peer, refused.code, refused.info)
            return refused.response()
        try:
            response = _transfer(peer, free)
        except guard.Refused as refused:
            free()
            log.info("refused feature transfer to %s: %d %s", peer, refused.code, refused.info)
            return refused.response()
        except BaseException:
            free()
            raise
        return response

    def _checked(peer):
        """The request's cheap checks, then a slot taken: its ``free``."""
        if request.mimetype != "application/json":
            raise guard.Refused(400, f"request body must be application/json, not {request.mimetype[:60]!r}")
        if request.args.get("compression", "lz4") not in COMPRESSIONS:
            raise guard.Refused(400, f"compression must be one of {', '.join(COMPRESSIONS)}")
        if request.content_length is not None and request.content_length > limit:
            raise guard.Refused(413, f"request body of {request.content_length} bytes is over {limit} bytes, "
                                     f"the limit of {what}")
        return slots.take(peer)

    def _transfer(peer, free):
        payload = guard.json_body(guard.read_body(limit, what, timeout))
        try:
            args = handler.listener.parser.parse("feature", payload).args
        except RequestError as exc:
            raise guard.Refused(400, str(exc), exc.status) from None
        compression = request.args.get("compression", "lz4")
        directory = cfg.dataset_cache_dir
        if not directory.parent.is_dir():
            raise guard.Refused(503, "this handler does not see the data directory; ask a handler that does", 2)
        path = directory / dataset_uri(args)
        if not is_current(path):
            raise guard.Refused(409, "the dataset cache of this request is not computed; send it as a "
                                     "feature_request", 2)
        where = layout(path)
        start, stop = where.rows(args["start_time"], args["end_time"])
        columns = cache_columns(args["fields"])
        missing = set(columns) - where.fields if stop == start else set(columns) - set(where.blocks)
        if missing:  # a cache is keyed by its fields: only a bug gets here
            raise guard.Refused(500, f"the dataset cache has no column {sorted(missing)[0][:60]!r}", 2)
        started, sent = time.monotonic(), [0]

        def body():
            for piece in ahead(stream(where, columns, start, stop, compression), spawn):
                sent[0] += len(piece)
                yield piece
            log.info("feature transfer to %s: %d rows x %d fields, %.1f MB in %.1f ms", peer, stop - start,
                     len(columns), sent[0] / 1e6, (time.monotonic() - started) * 1000)

        def stalled():
            log.warning("feature transfer to %s released: the client took nothing of it for %g s (transfer_timeout)"
                        " after %.1f MB", peer, timeout, sent[0] / 1e6)

        response = Response(guard.paced(body(), timeout, stalled), mimetype=MEDIA_TYPE)
        response.call_on_close(free)
        return response
