"""Benchmark of the compute engine: feature sets computed cold through the server beside local Qlib computing
the same sets, in one run, on the same generated data.

    python -m sim.bench_engine [--instruments 300] [--days 2500] [--sets alpha158,alpha360,five] [--repeat 3]

For each set, ``--repeat`` runs, each with a new server (the machine's timings vary from run to run; the table
shows the medians and each run's ratio): local Qlib's ``D.features`` (its default config, reading the data
directory: the floor, the same rows computed the way a user computes them without a server); the same
``D.features`` through ``qlib_server.client`` against an embedded server with no cache yet (what the user waits
for: the server computes the set with the engine and writes the dataset cache, which the client, on the
server's host, maps), and once more (hot); the same request hot from a client that has the rows streamed
(``delivery="stream"``, as a client on another host gets them); the worker's computation alone (the engine
with the records written block by block, then the checkpoint, in this process). Checks ``df.equals`` between
each client's frame and local Qlib's, prints a table and writes bench-results/engine.json.
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from qlib_server.datagen import generate_dataset
from sim.bench import _free_port, _wait_ready, stop

FIVE = ["Mean($close, 5)/$close", "Std($close, 20)", "Corr($close, Log($volume+1), 10)", "Rank($close, 30)",
        "Ref($close, -2)/Ref($close, -1) - 1"]
SETS = {
    "alpha158": "from qlib.contrib.data.loader import Alpha158DL; FIELDS = Alpha158DL.get_feature_config()[0]",
    "alpha360": "from qlib.contrib.data.loader import Alpha360DL; FIELDS = Alpha360DL.get_feature_config()[0]",
    "five": f"FIELDS = {FIVE!r}",
}
INIT = {
    "local": 'qlib.init(provider_uri={data!r}, region="cn", logging_level="ERROR")',
    "server": ('from qlib_server.client import client_config\n'
               'qlib.init(**client_config("127.0.0.1", {port}, timeout=1800), provider_uri=tempfile.mkdtemp(), '
               'region="cn", logging_level="ERROR")'),
    "stream": ('from qlib_server.client import client_config\n'
               'qlib.init(**client_config("127.0.0.1", {port}, timeout=1800, delivery="stream"), '
               'provider_uri=tempfile.mkdtemp(), region="cn", logging_level="ERROR")'),
}
SCRIPT = """
import pickle, sys, tempfile, time
import qlib
from qlib.data import D
{init}
{fields}
times = []
for _ in range({repeat}):
    t = time.perf_counter()
    df = D.features(D.instruments("csi300"), FIELDS, freq="day")
    times.append(time.perf_counter() - t)
pickle.dump((times, df), open(sys.argv[1], "wb"))
"""


def timed(kind: str, fields: str, work: Path, data: Path, port: int, repeat: int):
    out = work / f"{kind}.pkl"
    script = SCRIPT.format(init=INIT[kind].format(data=str(data), port=port), fields=fields, repeat=repeat)
    subprocess.run([sys.executable, "-c", script, str(out)], check=True)
    import pickle

    return pickle.loads(out.read_bytes())


def worker_alone(data: Path, fields_code: str) -> dict:
    """The worker's part in this process, as a worker computes a cache for ``qlib_server.client``: the engine's
    values, each block's rows written to the records file as it is computed, with the checkpoint; then the
    records published and the checkpoint written."""
    script = f"""
import json, sys, time, tempfile
from pathlib import Path
import qlib
from qlib_server.state import records
from qlib_server.worker import dataset, datacache, extension, storage
qlib.init(provider_uri={str(data)!r}, region="cn", logging_level="ERROR",
          feature_provider={{"class": "LocalFeatureProvider", "kwargs": {{"backend": storage.BACKEND}}}})
from qlib.data.data import Cal, DatasetD
from qlib_server.engine import features, kernels
{fields_code}
cal = Cal.calendar(freq="day")
dataset.dataset(DatasetD._provider, ["SH600000"], FIELDS[:3], cal[0], cal[-1], "day")  # kernels loaded
path = Path(tempfile.mkdtemp()) / "c"
t = time.perf_counter()
rows = dataset.cache_rows(DatasetD._provider, {{"market": "csi300", "filter_pipe": []}}, FIELDS, cal[0], cal[-1],
                          "day", segment=records.segment_path(path))
engine = time.perf_counter() - t
t = time.perf_counter()
datacache.write_records(path, rows)
extension.save_checkpoint(path, rows.checkpoint)
write = time.perf_counter() - t
print(json.dumps({{"engine_s": engine, "write_s": write, "fallbacks": sum(features.FALLBACKS.values())}}))
import shutil; shutil.rmtree(path.parent)
"""
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instruments", type=int, default=300)
    parser.add_argument("--days", type=int, default=2500)
    parser.add_argument("--sets", default="alpha158,alpha360,five")
    parser.add_argument("--repeat", type=int, default=3, help="runs per set (medians shown; a new server each run)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    atexit.register(shutil.rmtree, work, True)  # its data and caches (GBs) go when it ends
    data = generate_dataset(work / "data", instruments=args.instruments, days=args.days, start="2012-01-04",
                            markets={"csi300": args.instruments})
    rows = []
    for name in args.sets.split(","):
        runs = []
        for run in range(args.repeat):  # each run a new server with no cache yet: cold is its first request
            port = _free_port()
            config = work / f"server-{name}-{run}.yaml"
            config.write_text(json.dumps({"provider_uri": str(data), "flask_port": port, "logging_level": "WARNING",
                                          "dataset_cache_dir_name": f"dataset_cache_{name}_{run}"}))
            server = subprocess.Popen([sys.executable, "-m", "qlib_server", "serve", "-c", str(config), "--embedded"],
                                      stdout=open(work / f"server-{name}-{run}.log", "wb"), stderr=subprocess.STDOUT)
            try:
                _wait_ready(f"http://127.0.0.1:{port}")
                print(f"{name} (run {run + 1} of {args.repeat}): local Qlib ...", flush=True)
                (local_s,), local = timed("local", SETS[name], work, data, port, 1)
                print(f"{name} (run {run + 1} of {args.repeat}): through the server, cold then hot ...", flush=True)
                (cold_s, hot_s), served = timed("server", SETS[name], work, data, port, 2)
                print(f"{name} (run {run + 1} of {args.repeat}): hot, streamed ...", flush=True)
                (streamed_s,), streamed = timed("stream", SETS[name], work, data, port, 1)
            finally:
                stop(server)
            runs.append((local_s, cold_s, hot_s, streamed_s, bool(served.equals(local) and streamed.equals(local))))
        local_s, cold_s, hot_s, streamed_s = (statistics.median(r[k] for r in runs) for k in range(4))
        alone = worker_alone(data, SETS[name])
        rows.append({"set": name, "rows": len(local), "fields": local.shape[1], "local_qlib_s": round(local_s, 2),
                     "server_cold_s": round(cold_s, 2), "server_hot_s": round(hot_s, 2),
                     "speedup_cold": round(local_s / cold_s, 2), "equal": all(r[4] for r in runs),
                     "server_hot_streamed_s": round(streamed_s, 2),
                     "speedup_per_run": " ".join(f"{r[0] / r[1]:.1f}" for r in runs),
                     "engine_s": round(alone["engine_s"], 2), "cache_write_s": round(alone["write_s"], 2),
                     "engine_fallbacks": alone["fallbacks"]})
    print(f"\n== feature sets over {args.instruments} instruments x {args.days} days, cold through the server beside "
          "local Qlib (same machine, same data) ==")
    head = ("set", "rows", "fields", "local Qlib s", "server cold s", "x faster", "each run", "hot s",
            "hot stream s", "equal", "engine+rec s", "checkpoint s", "fallbacks")
    print("".join(f" {h:>15}" for h in head))
    for r in rows:
        print("".join(f" {r[k]!s:>15}" for k in ("set", "rows", "fields", "local_qlib_s", "server_cold_s",
                                                 "speedup_cold", "speedup_per_run", "server_hot_s",
                                                 "server_hot_streamed_s", "equal",
                                                 "engine_s", "cache_write_s", "engine_fallbacks")))
    Path("bench-results").mkdir(exist_ok=True)
    Path("bench-results/engine.json").write_text(json.dumps(rows, indent=1))
    return 0 if all(r["equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
