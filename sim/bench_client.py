"""Benchmark of ``qlib_server.client`` beside pyqlib's stock client with a mount, in one run.

    python -m sim.bench --client [--instruments 300] [--days 1500] [--quick]

Prints one table: a hot ``D.features`` (answer cached on the server) through each client; a large
cached feature set (Alpha158's 158 fields x all instruments x all days) transferred and turned into
the DataFrame, beside reading the same HDF5 cache file locally with pandas (as the stock client does
with a mount), with the client's peak memory; a cold request through each client. Uses the RabbitMQ
and Redis at 127.0.0.1 (``--amqp-host``/``--redis-host``).
"""

from __future__ import annotations

import atexit
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from qlib_server.datagen import generate_dataset

INIT = {
    "new": """
from qlib_server.client import client_config
qlib.init(**client_config("127.0.0.1", {port}, timeout=900, compression={compression!r}), provider_uri={empty!r},
          region="cn", logging_level="ERROR")
""",
    "stock": """
qlib.init(default_conf="client", provider_uri={data!r}, flask_server="127.0.0.1", flask_port={port},
          calendar_provider={{"class": "LocalCalendarProvider", "kwargs": {{"remote": True}}}},
          instrument_provider="ClientInstrumentProvider", dataset_provider="ClientDatasetProvider",
          provider="ClientProvider", logging_level="ERROR", timeout=900)
""",
}
SCRIPT = """
import json, resource, sys, time
import qlib
from qlib.data import D
{init}
from qlib.contrib.data.loader import Alpha158DL
def timed(call, n):
    out = []
    for _ in range(n):
        frame = None  # the frame before is freed first: peak memory is that of one request
        t = time.perf_counter(); frame = call(); out.append(time.perf_counter() - t)
    return out, frame
hot = ["$close", "Mean($close, 5)", "Std($close, 20)"]
result = {{}}
if "hot" in {parts!r}:
    timed(lambda: D.features(D.instruments("csi300"), hot, "2019-01-01", "2019-12-31"), 1)  # warm: cached on the server
    result["hot_s"], frame = timed(lambda: D.features(D.instruments("csi300"), hot, "2019-01-01", "2019-12-31"), {n})
    result["hot_shape"] = list(frame.shape)
if "cold" in {parts!r}:
    result["cold_s"], frame = timed(lambda: D.features(D.instruments("csi300"), {cold!r}, "2019-01-01",
                                                       "2019-12-31"), 1)
if "large" in {parts!r}:
    fields = Alpha158DL.get_feature_config()[0]
    D.features(D.instruments("all"), fields[:1], "2019-01-01", "2019-01-31")  # connect, calendar
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result["large_s"], frame = timed(lambda: D.features(D.instruments("all"), fields), {n})
    result["large_shape"] = list(frame.shape)
    result["large_mb"] = frame.memory_usage(deep=True).sum() / 1e6
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["rss_before_mb"] = before / 1024
print("RESULT:" + json.dumps(result))
"""
LOCAL_READ = """
import json, sys, time, qlib
import pandas as pd
from pathlib import Path
qlib.init(provider_uri=sys.argv[1], region="cn", logging_level="ERROR")
from qlib.data.cache import DiskDatasetCache
from qlib.contrib.data.loader import Alpha158DL
fields = Alpha158DL.get_feature_config()[0]
path = max(Path(sys.argv[2]).glob("*.sources"), key=lambda p: p.with_suffix("").stat().st_size).with_suffix("")
def timed(call):
    out = []
    for _ in range(3):
        t = time.perf_counter(); frame = call(); out.append(time.perf_counter() - t)
    return sorted(out)[1], frame
plain, frame = timed(lambda: pd.read_hdf(path, "df"))
qlib_read, frame = timed(lambda: DiskDatasetCache.read_data_from_cache(path, None, None, fields))
print("RESULT:" + json.dumps({"read_hdf_s": plain, "read_cache_s": qlib_read, "shape": list(frame.shape),
                              "file_mb": path.stat().st_size / 1e6}))
"""


def _run(code: str, *argv: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=3600)
    marker = done.stdout.find("RESULT:")
    if done.returncode or marker < 0:
        raise SystemExit(f"benchmark script failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout[marker + 7:])


def client_run(kind: str, port: int, data: Path, work: Path, parts: tuple, n: int, cold: list,
               compression: str = "auto") -> dict:
    empty = work / f"empty-{kind}"
    empty.mkdir(exist_ok=True)
    init = INIT[kind].format(port=port, empty=str(empty), data=str(data), compression=compression)
    return _run(SCRIPT.format(init=init, parts=parts, n=n, cold=cold))


def run(args, start_server, stop) -> int:
    work = Path(tempfile.mkdtemp(prefix="qlib-bench-client-"))
    atexit.register(shutil.rmtree, work, True)  # its data and caches (GBs) go when it ends
    instruments, days = (60, 500) if args.quick else (args.instruments, args.days)
    print(f"generating {instruments} instruments x {days} days ...", flush=True)
    data = generate_dataset(work / "data", instruments=instruments, days=days, markets={"csi300": min(instruments,
                                                                                                      100)})
    from sim.bench import _free_port

    port = _free_port()
    server = start_server(work, data, port, 2, args)
    try:
        n_new, n_stock = (10, 3) if args.quick else (30, 5)
        print("hot D.features, new client and stock client ...", flush=True)
        new = client_run("new", port, data, work, ("hot",), n_new, [])
        stock = client_run("stock", port, data, work, ("hot",), n_stock, [])
        print("cold D.features, each client ...", flush=True)
        cold_new = client_run("new", port, data, work, ("cold",), 1, ["Mean($close, 7)", "Std($high, 7)",
                                                                      "Max($low, 7)"])
        cold_stock = client_run("stock", port, data, work, ("cold",), 1, ["Mean($close, 8)", "Std($high, 8)",
                                                                          "Max($low, 8)"])
        print("large cached feature set (Alpha158 fields, all instruments, all days): computing once ...", flush=True)
        client_run("new", port, data, work, ("large",), 1, [])  # computes the cache
        print("large cached feature set: transfers (the default, then lz4), local reads ...", flush=True)
        large = client_run("new", port, data, work, ("large",), 3, [])
        lz4 = client_run("new", port, data, work, ("large",), 3, [], compression="lz4")
        local = _run(LOCAL_READ, str(data), str(data / "dataset_cache"))
    finally:
        stop(server)
    hot_new, hot_stock = statistics.median(new["hot_s"]), statistics.median(stock["hot_s"])
    rows, cols = large["large_shape"]
    print(f"\n== qlib_server.client vs pyqlib's stock client ({instruments} instruments x {days} days, "
          "2 processors) ==")
    print(f"{'measure':58}{'new client':>14}{'baseline':>14}{'ratio':>9}{'goal':>8}")
    print(f"{'hot D.features csi300 x 3 fields x 1y, median (ms)':58}{hot_new * 1000:>14.1f}{hot_stock * 1000:>14.1f}"
          f"{hot_stock / hot_new:>8.1f}x{'>=20x':>8}")
    print(f"{'  (baseline: stock ClientProvider reading the mount)':58}")
    for name, run_ in (("default", large), ("lz4", lz4)):
        took = statistics.median(run_["large_s"])
        label = f"large {rows}x{cols} ({large['large_mb']:.0f} MB) to frame, {name} (s)"
        print(f"{label:58}{took:>14.2f}{local['read_hdf_s']:>14.2f}{local['read_hdf_s'] / took:>8.2f}x{'>=0.5x':>8}")
    print(f"  (median of 3; default: uncompressed, the server is on this host; baseline: pd.read_hdf of the"
          f" cache file ({local['file_mb']:.0f} MB) on local disk, median of 3; Qlib's read_data_from_cache"
          f" {local['read_cache_s']:.2f} s)")
    print(f"{'client peak RSS (MB), before the request':58}{large['peak_rss_mb']:>14.0f}"
          f"{large['rss_before_mb']:>14.0f}")
    print(f"{'cold D.features csi300 x 3 new fields x 1y (s)':58}{cold_new['cold_s'][0]:>14.2f}"
          f"{cold_stock['cold_s'][0]:>14.2f}{cold_stock['cold_s'][0] / cold_new['cold_s'][0]:>8.2f}x{'>=1x':>8}")
    out = Path(args.out).with_name("bench-client.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"hot_new": new, "hot_stock": stock, "cold_new": cold_new, "cold_stock": cold_stock,
                               "large": large, "large_lz4": lz4, "local_read": local}, indent=1))
    print(f"\nwritten {out}")
    return 0
