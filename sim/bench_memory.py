"""A worker's peak memory computing Alpha158 over a large market: what it holds whatever the market's size.

    python -m sim.bench_memory [--instruments 4000] [--days 5000] [--hdf5]

Generates the data, then, in a fresh process, runs what a feature worker runs for a request of
``qlib_server.client`` (``datacache.compute_cache``: the engine by blocks, each block's rows written to the
records as it is computed, the checkpoint; with ``--hdf5`` Qlib's HDF5 form too, as for a stock client: the
values are then held whole, in an unlinked scratch file when over 1 GB), then one day appended and the cache
extended as a request does (a new segment), then another and the cache extended as a refresh does (then
written again as one segment), each while a thread samples the process's
anonymous memory (``RssAnon``: what the process itself holds; pages of mapped files are the kernel's to drop).
Prints the rows, the time and the peak anonymous memory above the process's idle (Qlib imported and
initialised, kernels loaded), and writes bench-results/memory.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from qlib_server.datagen import generate_dataset

WORKER = """
import json, sys, threading, time
from pathlib import Path
import qlib
from qlib_server.worker import datacache, storage
root = Path(sys.argv[1])
qlib.init(provider_uri=str(root), region="cn", logging_level="ERROR",
          feature_provider={"class": "LocalFeatureProvider", "kwargs": {"backend": storage.BACKEND}})
from qlib.contrib.data.loader import Alpha158DL
from qlib.data.data import DatasetD
from qlib_server import engine
from qlib_server.state import records
engine.warm()

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
def measured(call):  # run call while a thread samples the anonymous memory: its seconds and the peak
    peak, done = [anon()], threading.Event()
    def sample():
        while not done.wait(0.05):
            peak[0] = max(peak[0], anon())
    threading.Thread(target=sample, daemon=True).start()
    t = time.perf_counter()
    call()
    seconds = time.perf_counter() - t
    done.set()
    return seconds, max(peak[0], anon())
idle = anon()
(root / "dataset_cache").mkdir(exist_ok=True)
cache = root / "dataset_cache" / "c"
seconds, peak = measured(lambda: datacache.compute_cache(cache, DatasetD._provider,
                                                         {"market": "csi300", "filter_pipe": []},
                                                         Alpha158DL.get_feature_config()[0], "day",
                                                         hdf5=sys.argv[2] == "1"))
rows = len(records.read(cache))
# the daily update, as a refresh runs it: one day appended, the cache extended and written again as one segment
from qlib.data.cache import H
from qlib_server.datagen_updates import append_days
from qlib_server.worker import extension
request = extension.read_digests(cache, "request")
append_days(root, 1, seed=7)
H.clear()
extend_seconds, extend_peak = measured(lambda: extension.try_extend(cache, request["instruments"],
                                                                    request["fields"], "day"))
assert len(records.read(cache).segments) == 2, "not extended"
append_days(root, 1, seed=8)
H.clear()
refresh_seconds, refresh_peak = measured(lambda: extension.extend_cache(cache) and extension.compact(cache))
assert len(records.read(cache).segments) == 1, "not extended as one"
print(json.dumps({"rows": rows, "seconds": seconds, "idle_mb": idle / 2**20, "peak_mb": peak / 2**20,
                  "above_idle_mb": (peak - idle) / 2**20, "extend_seconds": extend_seconds,
                  "extend_peak_mb": extend_peak / 2**20, "extend_above_idle_mb": (extend_peak - idle) / 2**20,
                  "refresh_seconds": refresh_seconds, "refresh_peak_mb": refresh_peak / 2**20,
                  "refresh_above_idle_mb": (refresh_peak - idle) / 2**20}))
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instruments", type=int, default=4000)
    parser.add_argument("--days", type=int, default=5000)
    parser.add_argument("--hdf5", action="store_true", help="also write Qlib's HDF5 form (a stock client's request)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    try:
        print(f"generating {args.instruments} instruments x {args.days} days ...", flush=True)
        data = generate_dataset(work / "data", instruments=args.instruments, days=args.days, start="2000-01-04",
                                markets={"csi300": args.instruments})
        print("computing Alpha158 as a feature worker does ...", flush=True)
        done = subprocess.run([sys.executable, "-c", WORKER, str(data), "1" if args.hdf5 else "0"], check=True,
                              capture_output=True, text=True)
        row = {"instruments": args.instruments, "days": args.days, "hdf5": args.hdf5,
               **json.loads(done.stdout.strip().splitlines()[-1])}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n== a feature worker's memory: Alpha158 over {args.instruments} instruments x {args.days} days "
          f"({row['rows']:,} rows){' with the HDF5 form' if args.hdf5 else ''} ==")
    print(f"  computed and written in {row['seconds']:.1f} s; anonymous memory: idle {row['idle_mb']:.0f} MB, "
          f"peak {row['peak_mb']:.0f} MB, {row['above_idle_mb']:.0f} MB above idle")
    print(f"  one day appended, extended as a request does (a new segment) in {row['extend_seconds']:.1f} s; "
          f"peak {row['extend_peak_mb']:.0f} MB, {row['extend_above_idle_mb']:.0f} MB above idle")
    print(f"  one more day appended, extended as a refresh does (then written again as one segment) in "
          f"{row['refresh_seconds']:.1f} s; peak {row['refresh_peak_mb']:.0f} MB, "
          f"{row['refresh_above_idle_mb']:.0f} MB above idle")
    Path("bench-results").mkdir(exist_ok=True)
    Path("bench-results/memory.json").write_text(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
