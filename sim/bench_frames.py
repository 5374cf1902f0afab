"""The client's part of a feature transfer: reading a stream into Qlib's frame, rows in the frame's order (as
this server sends them) beside rows by day (as servers before the instrument-major records sent them).

    python -m sim.bench_frames [--instruments 300] [--days 2500] [--fields 158] [--repeat 4]

Writes a records file of random values (every instrument listed on every day), streams all of it as
``POST /features`` does (uncompressed, as to a client on the server's host) and, from the same rows, a stream
by day; then times ``read_frame`` of each, in memory, alternately (the second and later reads reuse the memory
the first took), and checks the two frames are equal.
"""

from __future__ import annotations

import argparse
import atexit
import io
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from qlib_server.client.frames import read_frame
from qlib_server.front import transfer
from qlib_server.state import records


def by_day(where: transfer.Layout, columns: list) -> bytes:
    datetime, instrument, values = where.records.take()
    order = np.argsort(datetime, kind="stable")
    fields = [pa.field("datetime", pa.timestamp(where.records.unit)), pa.field("instrument", pa.int32())]
    fields += [pa.field(f"block{k}", pa.list_(pa.float32(), 1), nullable=False,
                        metadata={"columns": json.dumps([c])}) for k, c in enumerate(columns)]
    instruments = [[c, int(n)] for c, n in zip(where.records.codes, where.records.counts.tolist())]
    schema = pa.schema(fields, metadata={"rows": str(len(order)), "instruments": json.dumps(instruments)})
    sink = io.BytesIO()
    rows = transfer.CHUNK_BYTES // (12 + 4 * len(columns))
    with pa.ipc.new_stream(sink, schema) as writer:
        for first in range(0, len(order), rows):
            at = order[first:first + rows]
            arrays = [pa.array(datetime[at]), pa.array(instrument[at])]
            arrays += [pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(values[at, k])), 1)
                       for k in range(len(columns))]
            writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=schema))
    return sink.getvalue()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instruments", type=int, default=300)
    parser.add_argument("--days", type=int, default=2500)
    parser.add_argument("--fields", type=int, default=158)
    parser.add_argument("--repeat", type=int, default=4)
    args = parser.parse_args(argv)
    path = Path(tempfile.mkdtemp(prefix="bench-frames-")) / "c"
    atexit.register(shutil.rmtree, path.parent, True)  # its data and caches (GBs) go when it ends
    codes = [f"SH{600000 + i}" for i in range(args.instruments)]
    columns = [f"F{k:03d}" for k in range(args.fields)]
    days = np.arange(np.datetime64("2012-01-04", "us"), np.datetime64("2012-01-04", "us") + args.days * 86400 * 10**6,
                     86400 * 10**6)
    segment = records.segment_path(path)
    writer = records.Writer(segment, columns, codes, "us", args.instruments * args.days)
    rng = np.random.default_rng(0)
    for i in range(args.instruments):
        writer.add(days, np.full(args.days, i), rng.normal(size=(args.fields, args.days)).astype(np.float32), days)
    records.publish(path, [(segment, writer.close())])
    where = transfer.layout(path)
    streams = {"by instrument (this server)": b"".join(transfer.stream(where, columns, where.select(None, None),
                                                                       "none")),
               "by day (earlier servers)": by_day(where, columns)}
    times: dict = {name: [] for name in streams}
    for _ in range(args.repeat):
        frames = {}  # the frames of the round before are let go: this round reuses their memory
        for name, data in streams.items():
            started = time.perf_counter()
            frames[name] = read_frame(io.BytesIO(data), columns)
            times[name].append(time.perf_counter() - started)
    equal = frames["by instrument (this server)"].equals(frames["by day (earlier servers)"])
    print(f"read_frame of {args.instruments * args.days:,} rows x {args.fields} fields "
          f"({len(streams['by day (earlier servers)']) / 1e6:.0f} MB), median of {args.repeat}; frames equal: {equal}")
    for name, taken in times.items():
        print(f"  {name:30s} {statistics.median(taken):.3f} s  ({', '.join(f'{t:.3f}' for t in taken)})")
    return 0 if equal else 1


if __name__ == "__main__":
    raise SystemExit(main())
