"""Feature data inline: ``POST /features`` streams the rows a feature request asks for out of its
dataset cache, as Arrow IPC record batches (lz4 or zstd), so that clients need no shared mount.

The body is a Socket.IO request event (``{"head": {"version": ...}, "body": <JSON text>}``) and goes
through the same admission (``allowed_networks``, or ``auth_token`` as ``Authorization: Bearer``) and
the same checks as every request. The cache itself is only ever computed through the pipeline: when
the request's dataset cache is not current here, the answer is 409 and the client sends the same
request as a ``feature_request`` event (computed once, de-duplicated), then asks again.

The stream holds exactly the requested dates, in the order of the requested fields: one batch of
about ``CHUNK_BYTES`` at a time is read from the HDF5 file, encoded and written, so neither side
holds more than a few chunks. Batch columns: ``datetime``, ``instrument`` (dictionary encoded), then
one column per distinct requested field (spaces removed, as Qlib names cache columns). The schema
metadata ``rows`` says how many rows follow.
"""

from __future__ import annotations

import logging
import pickle
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from flask import Response, request

from . import datacache
from .errors import RequestError

log = logging.getLogger(__name__)

CHUNK_BYTES = 4 << 20
MEDIA_TYPE = "application/vnd.apache.arrow.stream"
COMPRESSIONS = ("lz4", "zstd")


def dataset_uri(args: dict) -> str:
    """The file name of the dataset cache a processor computes for these (checked) feature arguments."""
    from qlib.data.cache import DiskDatasetCache

    return DiskDatasetCache._uri(args["instruments"], args["fields"], None, None, args["freq"], 1)


def cache_columns(fields: list) -> list[str]:
    """The cache columns the requested fields are read from: each distinct field once, in request order."""
    from qlib.utils import remove_fields_space

    return list(dict.fromkeys(remove_fields_space(fields)))


def row_range(cache_path: Path, start_time, end_time) -> tuple[int, int]:
    """Rows ``[start, stop)`` of the cache holding the dates from ``start_time`` to ``end_time`` (Qlib's index)."""
    spans = datacache.DiskDatasetCache.IndexManager(cache_path).get_index(start_time, end_time)
    if spans.shape[0] == 0:
        return 0, 0
    return int(spans["start"].iloc[0]), int(spans["end"].iloc[-1])


def _batch(chunk: pd.DataFrame, columns: list[str], schema: pa.Schema) -> pa.RecordBatch:
    dates, codes = chunk.index.levels[0], chunk.index.levels[1]
    inst = pa.DictionaryArray.from_arrays(pa.array(chunk.index.codes[1].astype(np.int32)),
                                          pa.array(np.asarray(codes, dtype=object), pa.string()))
    arrays = [pa.array(dates.values[chunk.index.codes[0]]), inst]
    arrays += [pa.array(np.ascontiguousarray(chunk[c].to_numpy())) for c in columns]
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


def stream(cache_path: Path, columns: list[str], start: int, stop: int, compression: str):
    """Yield the Arrow IPC stream of rows ``[start, stop)`` and ``columns`` of the cache, chunk by chunk."""
    key = datacache.DatasetCache.HDF_KEY
    with pd.HDFStore(cache_path, mode="r") as store:
        probe = store.select(key, start=start, stop=min(stop, start + 1))
        dates = probe.index.levels[0].dtype if isinstance(probe.index, pd.MultiIndex) else None
        schema = pa.schema([pa.field("datetime", pa.from_numpy_dtype(dates if dates and dates.kind == "M" else "M8[ns]")),
                            pa.field("instrument", pa.dictionary(pa.int32(), pa.string())),
                            *(pa.field(c, pa.from_numpy_dtype(probe[c].dtype)) for c in columns)],
                           metadata={"rows": str(stop - start)})
        chunks = _Chunks()
        writer = pa.ipc.new_stream(pa.PythonFile(chunks, mode="w"), schema,
                                   options=pa.ipc.IpcWriteOptions(compression=compression))
        rows = max(1024, CHUNK_BYTES // (4 * max(1, len(columns))))
        for offset in range(start, stop, rows):
            writer.write_batch(_batch(store.select(key, start=offset, stop=min(stop, offset + rows)), columns, schema))
            yield chunks.take()
        writer.close()
        yield chunks.take()


def register(handler) -> None:
    """Add ``POST /features`` to the handler's Flask app."""
    cfg = handler.cfg

    def refuse(code: int, status: int, info: str):
        return {"result": None, "status": status, "detailed_info": info}, code

    @handler.app.post("/features")
    def features():
        header = request.headers.get("Authorization", "")
        token = header[7:] if header.startswith("Bearer ") else None
        if not handler._admit({"token": token} if token else None):
            handler.metrics.refused_connections.inc()
            log.warning("refused feature transfer to %s", request.remote_addr)
            return refuse(403, 1, "connection refused: not in allowed_networks and no valid auth_token")
        if (request.content_length or 0) > cfg.max_message_bytes:
            return refuse(413, 1, f"request over the limit of {cfg.max_message_bytes} bytes (max_message_bytes)")
        compression = request.args.get("compression", "lz4")
        if compression not in COMPRESSIONS:
            return refuse(400, 1, f"compression must be one of {', '.join(COMPRESSIONS)}")
        try:
            args = handler.listener.parser.parse("feature", request.get_json(silent=True)).args
        except RequestError as exc:
            return refuse(400, exc.status, str(exc))
        directory = cfg.dataset_cache_dir
        if not directory.parent.is_dir():
            return refuse(503, 2, "this handler does not see the data directory; ask a handler that does")
        path = directory / dataset_uri(args)
        if not datacache.is_current(path):
            return refuse(409, 2, "the dataset cache of this request is not computed; send it as a feature_request")
        start, stop = row_range(path, args["start_time"], args["end_time"])
        columns = cache_columns(args["fields"])
        missing = set(columns) - set(pickle.loads(path.with_suffix(".meta").read_bytes())["info"]["fields"])
        if missing:  # a cache is keyed by its fields: only a bug gets here
            return refuse(500, 2, f"the dataset cache has no column {sorted(missing)[0][:60]!r}")
        started, peer = time.monotonic(), request.remote_addr

        def body():
            sent = 0
            for piece in stream(path, columns, start, stop, compression):
                sent += len(piece)
                yield piece
            log.info("feature transfer to %s: %d rows x %d fields, %.1f MB in %.1f ms", peer, stop - start,
                     len(columns), sent / 1e6, (time.monotonic() - started) * 1000)

        return Response(body(), mimetype=MEDIA_TYPE)
