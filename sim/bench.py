"""Benchmarks of Qlib-Server beside their floors, in one run: a bare Flask-SocketIO echo server (hot
requests) and Qlib computing the same ``D.features`` locally (cold feature sets).

    python -m sim.bench [--seconds 10] [--out bench-results/bench.json] [--quick] [--compare OLD.json]
    python -m sim.bench --report RUN.json [--compare OLD.json]       # the tables of a run, no new run
    python -m sim.bench --client [--instruments 300] [--days 1500] [--quick]   # see sim/bench_client.py

Data: ``--instruments`` (200) instruments over 6 years (1500 days). Measures (see sim/bench_measure.py):
hot requests (calendar, instrument list, cached feature set) single-client p50 and throughput at 50
clients, server and echo; one cold feature set (200 instruments x 5 rolling fields, windows of 5 to
70 days, a 3-year window) through the server (once each worker has computed a small feature set:
the figures of running workers) and locally; the same cold set asked by 150 clients at once; light
requests (never asked before, so computed by the light lane) on the idle server and while
both feature workers are busy; 1, 10, 100 and 1000 idle clients connected (memory per connection,
a hot and a cold request meanwhile, then a calendar from each). Prints the goals table (figure,
floor, ratio, goal, met) and writes JSON. Uses the RabbitMQ and Redis at 127.0.0.1
(``--amqp-host``/``--redis-host`` to change). The server runs on its defaults (2 feature workers, 1
light worker, ``kernels`` 1, ``feature_nice`` 5).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from qlib_server.datagen import generate_dataset
from sim import bench_report
from sim.bench_measure import (
    DAYS,
    HOT,
    capture_frames,
    cold_fields,
    cold_request,
    identical_cold,
    light_bodies,
    light_latency,
    light_while_busy,
    local_compute,
    paired_latency,
    paired_throughput,
    summary_ms,
    warm_workers,
    with_connected,
)
from sim.client import fetch_metrics, metric_by_type


# -- servers ----------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, path: str = "/readyz", timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + path, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} not ready")


ECHO_SERVER = """
from gevent import monkey; monkey.patch_all()
import json, sys
from flask import Flask, request
from flask_socketio import SocketIO, emit
app = Flask("echo"); sio = SocketIO(app, async_mode="gevent")
# the server's own answers (sim.bench_measure.capture_frames): request body -> the Socket.IO packet text the
# server sent for it (its Engine.IO frame without the leading "4", which engineio adds again when sending)
ANSWERS = {}
for kind, c in json.loads(open(sys.argv[2]).read()).items():
    ANSWERS.setdefault(kind, {})[c["body"]] = c["frame"][1:]
send, eio_sid = sio.server.eio.send, sio.server.manager.eio_sid_from_sid
for kind in ANSWERS:
    def handler(data, answers=ANSWERS[kind], kind=kind):
        frame = answers.get(data["body"]) if isinstance(data, dict) and isinstance(data.get("body"), str) else None
        if frame is None:  # not a request the bench captured: an error, never a silent drop
            return emit(kind + "_response", {"result": None, "status": 1, "detailed_info": "not captured"})
        send(eio_sid(request.sid, "/"), frame)
    sio.on_event(kind + "_request", handler)
@app.get("/readyz")
def ready():
    return "ok"
sio.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_output=False)
"""


def start_echo(port: int, captured: dict, work: Path) -> subprocess.Popen:
    """The floor: a bare Flask-SocketIO server (the server's own stack, gevent) that answers each hot
    request with the bytes the server answered it with (``captured``, see
    :func:`sim.bench_measure.capture_frames`): one dict look-up on the request's body, then a send."""
    path = work / "echo-answers.json"
    path.write_text(json.dumps(captured))
    proc = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, str(port), str(path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _wait_ready(f"http://127.0.0.1:{port}")
    return proc


def start_server(work: Path, data: Path, port: int, processors: int, args, **extra) -> subprocess.Popen:
    tag = f"{port}-{processors}"
    config = {**extra, "provider_uri": str(data), "flask_port": port, "max_process": processors,
              "task_queue": f"bench_tasks_{tag}", "message_queue": f"bench_results_{tag}", "redis_task_db": 9,
              "queue_host": args.amqp_host, "redis_host": args.redis_host, "logging_level": "WARNING",
              "max_inflight_per_client": 64}
    path = work / f"server-{tag}.yaml"
    path.write_text(json.dumps(config))
    proc = subprocess.Popen([sys.executable, "-m", "qlib_server", "serve", "-c", str(path)],
                            stdout=open(work / f"server-{tag}.log", "wb"), stderr=subprocess.STDOUT)
    _wait_ready(f"http://127.0.0.1:{port}")
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()



# -- the run ------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sim.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each throughput run")
    parser.add_argument("--out", default="bench-results/bench.json")
    parser.add_argument("--instruments", type=int, default=200)
    parser.add_argument("--amqp-host", default=os.environ.get("QLIB_BENCH_AMQP_HOST", "127.0.0.1"))
    parser.add_argument("--redis-host", default=os.environ.get("QLIB_BENCH_REDIS_HOST", "127.0.0.1"))
    parser.add_argument("--quick", action="store_true", help="smaller runs (a smoke test of the bench)")
    parser.add_argument("--hot-only", action="store_true", help="only the hot requests beside the echo floor")
    parser.add_argument("--compare", metavar="OLD.json", help="also print each figure of an earlier run's JSON")
    parser.add_argument("--report", metavar="RUN.json", help="print the tables of a run's JSON; run nothing")
    parser.add_argument("--client", action="store_true", help="only qlib_server.client beside the stock client "
                        "(see sim/bench_client.py; --instruments defaults to 300 there)")
    parser.add_argument("--days", type=int, default=1500, help="days of data for --client")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.client:
        from sim.bench_client import run

        args.instruments = 300 if "--instruments" not in (argv or sys.argv) else args.instruments
        return run(args, start_server, stop)
    if args.report:
        results = bench_report.load(args.report)
    else:
        results = run_all(args)
        results["goals"] = bench_report.goals(results)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
    report(results)
    if args.compare:
        bench_report.print_comparison(bench_report.comparison(bench_report.load(args.compare), results), args.compare)
    if not args.report:
        print(f"\nwritten {args.out}")
    return 0


def run_all(args) -> dict:
    quick = args.quick
    seconds = 3.0 if quick else args.seconds
    latency_n = 100 if quick else 500
    work = Path(tempfile.mkdtemp(prefix="qlib-bench-"))
    atexit.register(shutil.rmtree, work, True)  # its data and caches (GBs) go when it ends
    data = generate_dataset(work / "data", instruments=args.instruments, days=DAYS)
    results: dict = {"machine": {"cores": os.cpu_count(), "instruments": args.instruments, "days": DAYS,
                                 "load_avg_at_start": os.getloadavg()[0]},
                     "quick": quick, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    print("echo server (floor) and qlib-server on its defaults: hot requests, alternating ...", flush=True)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(work, data, port, 2, args)
    try:
        captured = asyncio.run(capture_frames(url))  # the server's answers, byte for byte, for the echo to send
        echo_port = _free_port()
        echo = start_echo(echo_port, captured, work)
        echo_url = f"http://127.0.0.1:{echo_port}"
        try:
            echoed = asyncio.run(capture_frames(echo_url))
            same = {kind: echoed[kind]["frame"] == captured[kind]["frame"] for kind in captured}
            if not all(same.values()):
                raise RuntimeError(f"the echo's answers differ from the server's: {same}")
            results["floor"] = {"same_bytes": same, "answer_bytes": {k: len(c["frame"].encode())
                                                                     for k, c in captured.items()}}
            print("echo answers = server answers, byte for byte: "
                  + ", ".join(f"{k} {n:,} B" for k, n in results["floor"]["answer_bytes"].items()), flush=True)
            urls = {"echo": echo_url, "server": url}
            results["echo"], results["server"] = {}, {}
            for kind in HOT:
                latency = asyncio.run(paired_latency(urls, kind, latency_n))
                results["echo"][kind], results["server"][kind] = latency["echo"], latency["server"]
            rates = paired_throughput(urls, 50, seconds)
            results["echo"]["throughput_50"], results["server"]["throughput_50"] = rates["echo"], rates["server"]
        finally:
            stop(echo)
        if args.hot_only:
            return results
        print("cold feature sets vs local Qlib ...", flush=True)
        asyncio.run(warm_workers(url))
        cold = []
        for _ in range(1 if quick else 3):
            fields = cold_fields()
            before = local_compute(data, fields)  # local runs before and after: a drift in load evens out
            served = asyncio.run(cold_request(url, fields))
            local = (before + local_compute(data, fields)) / 2
            cold.append({"fields": fields, "server_s": round(served, 3), "local_s": round(local, 3),
                         "ratio": round(served / local, 3)})
        results["cold_feature"] = cold
        clients = 30 if quick else 150
        print(f"{clients} identical cold requests at once ...", flush=True)
        fields = cold_fields()
        local = local_compute(data, fields)
        before = metric_by_type(fetch_metrics(url), "qlib_server_tasks_published_total").get("feature", 0)
        same = asyncio.run(identical_cold(url, clients, fields))
        after = metric_by_type(fetch_metrics(url), "qlib_server_tasks_published_total").get("feature", 0)
        same["tasks_published"] = int(after - before)
        same["local_s"] = round((local + local_compute(data, fields)) / 2, 3)
        results["cold_identical"] = same
        print("light lane: idle, then with both feature workers busy ...", flush=True)
        bodies = light_bodies(data, seed=time.time_ns())
        idle = summary_ms(asyncio.run(light_latency(url, bodies, n=50 if quick else 200)))
        busy = asyncio.run(light_while_busy(url, bodies, [cold_fields() for _ in range(4 if quick else 6)]))
        results["light_lane"] = {"idle": idle, "busy": busy}
        print("connected clients ...", flush=True)
        results["connected_clients"] = [with_connected(url, port, n) for n in ((1, 10, 100) if quick else
                                                                               (1, 10, 100, 1000))]
    finally:
        stop(server)
    return results


def report(r: dict) -> None:
    e, s = r["echo"], r["server"]
    print("\n== hot requests ==")
    print(f"{'':28}{'echo (floor)':>16}{'qlib-server':>16}{'ratio':>10}")
    for kind in HOT:
        print(f"{kind + ' latency p50 (ms)':28}{e[kind]['p50_ms']:>16.2f}{s[kind]['p50_ms']:>16.2f}"
              f"{s[kind]['p50_ms'] / e[kind]['p50_ms']:>10.2f}")
    et, st = e["throughput_50"]["rps"], s["throughput_50"]["rps"]
    print(f"{'throughput @50 (req/s)':28}{et:>16.1f}{st:>16.1f}{st / et:>10.2f}")
    ec, sc = e["throughput_50"].get("cpu_us_per_answer"), s["throughput_50"].get("cpu_us_per_answer")
    if ec and sc:
        print(f"{'CPU per answer @50 (us)':28}{ec:>16.1f}{sc:>16.1f}{sc / ec:>10.2f}")
    if r.get("cold_feature"):
        print(f"\n== cold feature set ({r['machine']['instruments']} instruments x 5 rolling fields, 3 of 6 years) ==")
        for c in r["cold_feature"]:
            print(f"server {c['server_s']:.3f} s   local Qlib {c['local_s']:.3f} s   ratio {c['ratio']:.2f}")
        c = r["cold_identical"]
        print(f"{c['clients']} identical at once: {c['seconds']:.3f} s (local {c['local_s']:.3f} s), "
              f"{c['ok']} answered, "
              f"{c['tasks_published']} task(s) published, {c['distinct_answers']} distinct answer(s)")
    if r.get("light_lane"):
        i, b = r["light_lane"]["idle"], r["light_lane"]["busy"]
        print("\n== light lane (calendars and instrument lists never asked before) ==")
        print(f"idle server:               p50 {i['p50_ms']:.2f} ms  p90 {i['p90_ms']:.2f}  p99 {i['p99_ms']:.2f}  "
              f"(n={i['n']})")
        print(f"both feature workers busy: p50 {b['p50_ms']:.2f} ms  p90 {b['p90_ms']:.2f}  p99 {b['p99_ms']:.2f}  "
              f"(n={b['n']}, {b['heavy_requests']} cold sets meanwhile)")
    if r.get("connected_clients"):
        print("\n== with N idle clients connected ==")
        print(f"{'connected':>10}{'answered':>10}{'hot p50 ms':>12}{'cold s':>10}{'KB/client':>12}")
        for c in r["connected_clients"]:
            print(f"{c['connected']:>10}{c['answered']:>10}{c['hot_calendar_p50_ms']:>12.2f}{c['cold_feature_s']:>10.3f}"
                  f"{c['rss_per_client_kb']:>12.1f}")
    bench_report.print_goals(r.get("goals") or bench_report.goals(r))


if __name__ == "__main__":
    sys.exit(main())
