"""The daily update measured: a trading day appended under a server holding Alpha158's dataset cache.

    python -m sim.bench_update [--instruments 300] [--days 2500]

Two parts, on the same generated data, in one run:

1. The worker's part, in a process of its own set up as a worker's (the code a worker runs, timed alone): the
   cache computed in full on the data, then three daily updates in a row, each one day appended and the cache
   extended (:func:`qlib_server.worker.extension.try_extend`; the median of the three is the figure), then
   written again as one segment as a refresh does once its caches are current (``compact``), and the cache
   computed in full again on the new data, the extension's floor; the extended cache must equal that
   recomputation bit for bit.
2. What a user waits for, through ``qlib_server.client`` against an embedded server on its defaults: Alpha158
   cold, then hot (a second request of the same process), then hot as the first request of a new process (the
   median of three); one more day appended while it runs; the first request after the server's background
   refresh extended the cache (it notices the change within ``data_check_interval``), in a new process, beside
   both hot times before; and local Qlib on the new data, whose frame the client's must equal (``df.equals``).

Prints a table and writes bench-results/update.json.
"""

from __future__ import annotations

import argparse
import atexit
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qlib_server.datagen import generate_dataset
from qlib_server.datagen_updates import append_days
from sim.bench import _free_port, _wait_ready, stop
from sim.bench_engine import timed

FIELDS = ("from qlib.contrib.data.loader import Alpha158DL; "
          "FIELDS = Alpha158DL.get_feature_config()[0] + ['Ref($close, -2)/Ref($close, -1) - 1']")
WORKER = """
import json, sys, time
from pathlib import Path
import numpy as np
import qlib
from qlib_server.datagen_updates import append_days
from qlib_server.state import records
from qlib_server.worker import datacache, extension, storage
root = Path(sys.argv[1])
qlib.init(provider_uri=str(root), region="cn", logging_level="ERROR",
          feature_provider={{"class": "LocalFeatureProvider", "kwargs": {{"backend": storage.BACKEND}}}})
from qlib.data.cache import H
from qlib.data.data import DatasetD
from qlib_server import engine
{fields}
engine.warm()
import gc
gc.collect()
gc.freeze()  # as a worker's process does once its kernels are loaded (compute.init_qlib)
market = {{"market": "csi300", "filter_pipe": []}}
(root / "dataset_cache").mkdir(exist_ok=True)
def timed(call):
    t = time.perf_counter(); out = call(); return out, time.perf_counter() - t
_, full = timed(lambda: datacache.compute_cache(root / "dataset_cache" / "c", DatasetD._provider, market, FIELDS, "day",
                                                hdf5=False))
extends = []
for day in range(3):  # three daily updates in a row, each extending the cache by one day
    append_days(root, 1, seed=7 + day)
    H.clear()
    done, extend = timed(lambda: extension.try_extend(root / "dataset_cache" / "c", market, FIELDS, "day"))
    extends.append(extend)
    done = done and all(extends)
one, compact = timed(lambda: extension.compact(root / "dataset_cache" / "c"))  # as a refresh does then
done = done and one
_, again = timed(lambda: datacache.compute_cache(root / "dataset_cache" / "full", DatasetD._provider, market, FIELDS,
                                                 "day", hdf5=False))
a, b = records.read(root / "dataset_cache" / "c"), records.read(root / "dataset_cache" / "full")
equal = bool(done) and all(x.dtype == y.dtype and np.array_equal(x.T.view(np.uint8), y.T.view(np.uint8))
                           for x, y in zip(a.take(), b.take()))
print(json.dumps({{"full_s": full, "extend_s": sorted(extends)[1], "extends_s": extends, "compact_s": compact,
                  "full_again_s": again,
                  "extended": bool(done),
                  "equal_bits": equal, "rows": len(b), "segments": len(a.segments)}}))
"""
def segments(root: Path) -> list:
    from qlib_server.state import records

    found = []
    for manifest in (root / "dataset_cache").glob("*.records"):
        try:
            found.append(len(records.read(manifest.with_suffix("")).segments))
        except (OSError, ValueError):
            found.append(0)
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instruments", type=int, default=300)
    parser.add_argument("--days", type=int, default=2500)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-update-"))
    atexit.register(shutil.rmtree, work, True)  # its data and caches (GBs) go when it ends
    markets = {"csi300": args.instruments}
    # 1. the worker's part
    alone = generate_dataset(work / "alone", instruments=args.instruments, days=args.days, start="2012-01-04",
                             markets=markets)
    print("worker: full computation, one day appended, extension, full computation again ...", flush=True)
    done = subprocess.run([sys.executable, "-c", WORKER.format(fields=FIELDS), str(alone)], check=True,
                          capture_output=True, text=True)
    worker = json.loads(done.stdout.strip().splitlines()[-1])
    # 2. through the server
    data = generate_dataset(work / "data", instruments=args.instruments, days=args.days, start="2012-01-04",
                            markets=markets)
    port = _free_port()
    config = work / "server.yaml"
    config.write_text(json.dumps({"provider_uri": str(data), "flask_port": port, "logging_level": "INFO"}))
    log = work / "server.log"
    server = subprocess.Popen([sys.executable, "-m", "qlib_server", "serve", "-c", str(config), "--embedded"],
                              stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    try:
        _wait_ready(f"http://127.0.0.1:{port}")
        print("server: Alpha158 cold, then hot ...", flush=True)
        (cold_s, hot_s), _ = timed("server", FIELDS, work, data, port, 2)
        hot_first_s = sorted(timed("server", FIELDS, work, data, port, 1)[0][0] for _ in range(3))[1]
        append_days(data, 1, seed=7)
        appended = time.monotonic()
        print("server: one day appended; waiting for the background refresh ...", flush=True)
        while "dataset caches again as one segment in" not in log.read_text():  # the refresh's end, in its log
            if time.monotonic() - appended > 600:
                raise SystemExit(f"no extension within 600 s: {segments(data)}")
            time.sleep(0.2)
        refreshed_s, refreshed_segments = time.monotonic() - appended, segments(data)
        (after_s,), served = timed("server", FIELDS, work, data, port, 1)
    finally:
        stop(server)
    found = re.findall(r"extended 1 dataset caches in ([0-9.]+) s", log.read_text())
    compacted = re.findall(r"wrote 1 dataset caches again as one segment in ([0-9.]+) s", log.read_text())
    print("local Qlib on the new data ...", flush=True)
    (local_s,), local = timed("local", FIELDS, work, data, port, 1)
    row = {"rows": worker["rows"], "fields": served.shape[1], "worker_full_s": round(worker["full_s"], 2),
           "worker_extend_s": round(worker["extend_s"], 3),
           "worker_extends_s": [round(t, 3) for t in worker["extends_s"]],
           "worker_compact_s": round(worker["compact_s"], 3),
           "worker_full_again_s": round(worker["full_again_s"], 2),
           "extend_ratio": round(worker["extend_s"] / worker["full_again_s"], 3),
           "extension_equals_full_bits": worker["equal_bits"], "server_cold_s": round(cold_s, 2),
           "server_hot_s": round(hot_s, 2), "server_refresh_extension_s": float(found[-1]) if found else None,
           "server_refresh_compaction_s": float(compacted[-1]) if compacted else None,
           "server_hot_first_s": round(hot_first_s, 2), "until_extended_s": round(refreshed_s, 1),
           "segments_after_refresh": refreshed_segments, "first_after_update_s": round(after_s, 2),
           "after_vs_hot": round(after_s / hot_s, 2), "after_vs_hot_first": round(after_s / hot_first_s, 2),
           "local_qlib_new_data_s": round(local_s, 2),
           "client_equals_local": bool(served.equals(local))}
    print(f"\n== the daily update: Alpha158 + label over {args.instruments} instruments x {args.days} days, "
          "one day appended ==")
    for key, value in row.items():
        print(f"  {key:32} {value}")
    Path("bench-results").mkdir(exist_ok=True)
    Path("bench-results/update.json").write_text(json.dumps(row, indent=1))
    return 0 if row["extension_equals_full_bits"] and row["client_equals_local"] else 1


if __name__ == "__main__":
    sys.exit(main())
