"""Feature data inline: ``POST /features`` streams the rows a feature request asks for out of its
dataset cache, as Arrow IPC record batches (lz4, zstd or uncompressed), so that clients need no
shared mount.

The body is a Socket.IO request event (``{"head": {"version": ...}, "body": <JSON text>}``) and goes
through the same admission (``allowed_networks``, or ``auth_token`` as ``Authorization: Bearer``) and
the same checks as every request. The cache itself is only ever computed through the pipeline: when
the request's dataset cache is not current here, the answer is 409 and the client sends the same
request as a ``feature_request`` event (computed once, de-duplicated), then asks again.

The stream holds exactly the requested dates and fields, rows by instrument then date (the order of the
frame a client builds): one batch of about ``CHUNK_BYTES`` at a time is taken from the cache's records file
(mapped, see :mod:`qlib_server.state.records`), encoded and written, so neither side holds more than a few
chunks. Batch
columns: ``datetime``; ``instrument``, an int32 index into the schema metadata ``instruments`` (a JSON
list of ``[code, rows]`` sorted by code, from which the client places each row of a batch where it
belongs in the frame at once); then a ``fixed_size_list`` column of one field for each requested field
(its name, spaces removed as in Qlib's cache columns, in the field metadata ``columns``: clients read
lists of several fields too): each is a slice of the cache's column as the file holds it, sent without a
copy (the rows of several slices, a date range cut out of each instrument's rows, are gathered), and pyarrow
compresses the columns of a batch on all cores. The schema metadata ``rows`` says how many rows follow.

With ``?delivery=files`` (a client on the server's host) the answer is instead where those rows lie in the
cache's files, as JSON (:mod:`qlib_server.front.placement`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pyarrow as pa
from flask import Response, request
from gevent.monkey import get_original

from .. import dataset_keys
from ..errors import RequestError
from ..state import records
from ..state.sources import RECORDS, is_current
from . import guard
from .placement import placement

log = logging.getLogger(__name__)

CHUNK_BYTES = 8 << 20  # a batch (each requested column a slice of it; work per batch is per column): 16 MB was slower
MEDIA_TYPE = "application/vnd.apache.arrow.stream"
COMPRESSIONS = ("lz4", "zstd", "none")
DELIVERIES = ("stream", "files")


def dataset_uri(args: dict) -> str:
    """The file name of the dataset cache a processor computes for these (checked) feature arguments."""
    return dataset_keys.dataset_uri(args["instruments"], args["fields"], args["freq"],
                                    args.get("inst_processors", []), args["start_time"], args["end_time"])


def cache_columns(fields: list) -> list[str]:
    """The cache columns the requested fields are read from: each distinct field once, in request order."""
    from qlib.utils import remove_fields_space

    return list(dict.fromkeys(remove_fields_space(fields)))


Selection = records.Selection


@dataclass(frozen=True)
class Layout:
    """One dataset cache's records file, mapped (:mod:`qlib_server.state.records`), and what was worked out
    of it: read once per version of the file."""

    records: records.Records
    position: dict  # column → its position in a row's values
    selections: OrderedDict  # (start_time, end_time) → the rows of those dates (the ranges sent last)
    lock: Any  # guards ``selections`` (transfers run in several threads)

    @property
    def fields(self) -> frozenset:
        return frozenset(self.position)

    def select(self, start_time, end_time) -> Selection:
        """The rows holding the dates from ``start_time`` to ``end_time``."""
        key = (str(start_time), str(end_time))
        found = self.selections.get(key)
        if found is None:
            found = self.records.select(start_time, end_time)
            with self.lock:
                self.selections[key] = found
                while len(self.selections) > 64:
                    self.selections.popitem(last=False)
        return found


_layouts: OrderedDict[tuple, Layout] = OrderedDict()
_os_lock = get_original("threading", "Lock")  # a lock of OS threads, also where gevent patched threading
_layouts_lock = _os_lock()


def layout(cache_path: Path) -> Layout:
    """The :class:`Layout` of the cache (kept for the 32 caches used last, by file size and mtime)."""
    path = records.path_of(cache_path)  # the manifest: replaced (a new inode) whenever the cache changes
    st = path.stat()
    version = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    with _layouts_lock:
        if version in _layouts:
            _layouts.move_to_end(version)
            return _layouts[version]
    try:
        table = records.read(cache_path)
    except FileNotFoundError:  # replaced between reading its manifest and mapping a segment: read the new one
        table = records.read(cache_path)
    found = Layout(table, {column: i for i, column in enumerate(table.columns)}, OrderedDict(), _os_lock())
    with _layouts_lock:
        _layouts[version] = found
        while len(_layouts) > 32:
            _layouts.popitem(last=False)  # its mapping goes when the last transfer of it ends
    return found


def _batches(pieces: list, rows: int):
    """``pieces`` (``(segment, first, last)``) as batches of about ``rows`` rows: a long piece cut in slices, short
    ones gathered."""
    gathered: list = []
    size = 0
    for segment, first, last in pieces:
        while last - first >= rows - size:
            cut = first + rows - size
            yield [*gathered, (segment, first, cut)]
            gathered, size, first = [], 0, cut
        if last > first:
            gathered.append((segment, first, last))
            size += last - first
    if gathered:
        yield gathered


def _groups(where: Layout, columns: list[str]) -> list[tuple[list[str], int]]:
    """(columns, position in the file) of each column group sent: every requested column on its own, a slice of
    the file's column (sent without a copy; the client puts it where it goes)."""
    return [([column], where.position[column]) for column in columns]


def _schema(where: Layout, groups: list, instruments: list, rows: int) -> pa.Schema:
    fields = [pa.field("datetime", pa.from_numpy_dtype(np.dtype(f"M8[{where.records.unit}]"))),
              pa.field("instrument", pa.int32())]
    for i, (names, _) in enumerate(groups):
        fields.append(pa.field(f"block{i}", pa.list_(pa.float32(), len(names)), nullable=False,
                               metadata={"columns": json.dumps(names)}))
    return pa.schema(fields, metadata={"rows": str(rows), "instruments": json.dumps(instruments)})


def _batch(pieces: list, groups: list, wire: Optional[np.ndarray], schema: pa.Schema) -> pa.RecordBatch:
    """The rows of ``pieces``: slices of the file sent as they are (one piece), gathered by their rows (several
    of one segment: a date range of each instrument), or joined (several segments). A column is named by
    ``of(segment)``, that segment's array of it."""
    segment, first, last = pieces[0]
    if len(pieces) == 1:
        def column(of: Callable) -> np.ndarray:
            return of(segment)[first:last]
    elif all(piece[0] is segment for piece in pieces):
        at = np.concatenate([np.arange(a, b) for _, a, b in pieces])

        def column(of: Callable) -> np.ndarray:
            return np.take(of(segment), at)
    else:
        def column(of: Callable) -> np.ndarray:
            return np.concatenate([of(s)[a:b] for s, a, b in pieces])

    codes = column(lambda s: s.instrument)
    arrays = [pa.array(column(lambda s: s.datetime)), pa.array(codes if wire is None else wire[codes])]
    for names, which in groups:
        values = column(lambda s, k=which: s.values[k])
        arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(values), len(names)))
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

    def take(self) -> list[bytes]:
        """What was written, small parts joined (a large one is passed on as it is: no second copy)."""
        taken: list[bytes] = []
        small: list[bytes] = []
        for part in self.parts:
            if len(part) < 1 << 16:
                small.append(part)
                continue
            if small:
                taken.append(b"".join(small))
                small = []
            taken.append(part)
        if small:
            taken.append(b"".join(small))
        self.parts = []
        return taken


def stream(where: Layout, columns: list[str], selection: records.Selection, compression: str):
    """Yield the Arrow IPC stream of the ``selection``'s rows and ``columns`` of the cache, piece by piece."""
    rows = max(1024, CHUNK_BYTES // (12 + 4 * len(columns)))
    if selection.rows:
        present = selection.counts > 0
        instruments = [[code, int(n)] for code, n in zip(where.records.codes, selection.counts.tolist()) if n]
        wire = None if present.all() else (np.cumsum(present) - 1).astype(np.int32)  # file code → stream's
        groups = _groups(where, columns)
        schema = _schema(where, groups, instruments, selection.rows)
    else:  # no rows: a stream of no batches
        wire, groups, schema = None, [], pa.schema([], metadata={"rows": "0", "instruments": "[]"})
    chunks = _Chunks()
    options = pa.ipc.IpcWriteOptions(compression=None if compression == "none" else compression)
    writer = pa.ipc.new_stream(pa.PythonFile(chunks, mode="w"), schema, options=options)
    for pieces in _batches(selection.pieces, rows):
        writer.write_batch(_batch(pieces, groups, wire, schema))
        yield from chunks.take()
    writer.close()
    yield from chunks.take()


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
        if request.args.get("delivery", "stream") not in DELIVERIES:
            raise guard.Refused(400, f"delivery must be one of {', '.join(DELIVERIES)}")
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
        if not is_current(path, form=RECORDS):
            raise guard.Refused(409, "the dataset cache of this request is not computed; send it as a "
                                     "feature_request", 2)
        where = layout(path)
        handler.usage.note(path.name)
        # a cache with inst_processors holds the window's frame as Qlib's processors left it: all of it is sent
        selection = where.select(*((None, None) if args.get("inst_processors") else
                                   (args["start_time"], args["end_time"])))
        columns = cache_columns(args["fields"])
        missing = set(columns) - where.fields
        if missing:  # a cache is keyed by its fields: only a bug gets here
            raise guard.Refused(500, f"the dataset cache has no column {sorted(missing)[0][:60]!r}", 2)
        if request.args.get("delivery") == "files":  # a client on this host maps the files
            answer = json.dumps({"result": placement(where, columns, selection), "status": 0, "detailed_info": ""})
            log.info("feature placement to %s: %d rows x %d fields", peer, selection.rows, len(columns))
            response = Response(answer, mimetype="application/json")
            response.call_on_close(free)
            return response
        started, sent = time.monotonic(), [0]

        def body():
            for piece in ahead(stream(where, columns, selection, compression), spawn):
                sent[0] += len(piece)
                yield piece
            log.info("feature transfer to %s: %d rows x %d fields, %.1f MB in %.1f ms", peer, selection.rows,
                     len(columns), sent[0] / 1e6, (time.monotonic() - started) * 1000)

        def stalled():
            log.warning("feature transfer to %s released: the client took nothing of it for %g s (transfer_timeout)"
                        " after %.1f MB", peer, timeout, sent[0] / 1e6)

        response = Response(guard.paced(body(), timeout, stalled), mimetype=MEDIA_TYPE)
        response.call_on_close(free)
        return response
