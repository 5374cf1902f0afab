"""Benchmarks of Qlib-Server beside a bare Flask-SocketIO echo server (the floor), in one run.

    python -m sim.bench [--seconds 10] [--out bench-results/bench.json] [--quick]
    python -m sim.bench --client [--instruments 300] [--days 1500] [--quick]   # see sim/bench_client.py

Measures: hot requests (calendar, instrument list, cached feature set) single-client latency and
throughput at 50 clients, for the server and for the echo server; a cold feature request through
the server vs. Qlib computing it locally; hot latency and cold latency with 1, 10, 100, 1000 idle
clients connected, and handler memory per connection; cold throughput with 1, 2, 4 processors.
Uses the RabbitMQ and Redis at 127.0.0.1 (``--amqp-host``/``--redis-host`` to change).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

from qlib_server.datagen import generate_dataset
from sim.client import connect, request

CAL_BODY = {"start_time": None, "end_time": None, "freq": "day", "future": False}
INST_BODY = {"instruments": {"market": "csi300", "filter_pipe": []}, "start_time": None, "end_time": None,
             "freq": "day", "as_list": True}
HOT_FIELDS = ["$close", "Mean($close, 5)"]
COLD_WINDOWS = iter(range(3, 10_000))


def feat_body(fields, market="all"):
    return {"instruments": {"market": market, "filter_pipe": []}, "fields": fields, "start_time": "2019-01-01",
            "end_time": "2020-12-31", "freq": "day", "disk_cache": 1}


def cold_fields() -> list[str]:
    """Five rolling fields no request has asked for yet."""
    n = next(COLD_WINDOWS)
    return [f"Mean($close, {n})", f"Std($close, {n})", f"Max($high, {n})", f"Min($low, {n})", f"Sum($volume, {n})"]


HOT = {"calendar": CAL_BODY, "instrument": INST_BODY, "feature": feat_body(HOT_FIELDS, "csi300")}


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
import sys, pandas as pd
from flask import Flask
from flask_socketio import SocketIO, emit
app = Flask("echo"); sio = SocketIO(app, async_mode="gevent")
CAL = [str(x) for x in pd.bdate_range("2018-01-02", periods=750)]
INST = ["SH%06d" % i for i in range(150)]
ANSWER = {"calendar": CAL, "instrument": INST, "feature": "0123456789abcdef0123456789abcdef"}
for kind, result in ANSWER.items():
    def handler(data, kind=kind, result=result):
        emit(kind + "_response", {"result": result, "status": 0, "detailed_info": None})
    sio.on_event(kind + "_request", handler)
@app.get("/readyz")
def ready():
    return "ok"
sio.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_output=False)
"""


def start_echo(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _wait_ready(f"http://127.0.0.1:{port}")
    return proc


def start_server(work: Path, data: Path, port: int, processors: int, args, **extra) -> subprocess.Popen:
    tag = f"{port}-{processors}"
    config = {**extra, "provider_uri": str(data), "flask_port": port, "max_process": processors, "kernels": 1,
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


# -- measurements -----------------------------------------------------------------------------------
def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def single_latency(url: str, kind: str, n: int) -> dict:
    sio = await connect(url)
    try:
        await request(sio, kind, HOT[kind], timeout=120)  # warm
        samples = []
        for _ in range(n):
            t = time.perf_counter()
            answer = await request(sio, kind, HOT[kind], timeout=60)
            samples.append((time.perf_counter() - t) * 1000)
            assert answer["status"] == 0, answer
        return {"p50_ms": round(pct(samples, .5), 3), "p90_ms": round(pct(samples, .9), 3), "n": n}
    finally:
        await sio.disconnect()


async def _hot_loop(url: str, clients: int, seconds: float) -> tuple[int, int]:
    socks = await asyncio.gather(*(connect(url) for _ in range(clients)))
    done, errors = [0], [0]
    deadline = time.monotonic() + seconds

    async def loop(sio, offset):
        kinds = list(HOT)
        i = offset
        while time.monotonic() < deadline:
            kind = kinds[i % 3]
            i += 1
            answer = await request(sio, kind, HOT[kind], timeout=60)
            done[0] += 1
            errors[0] += answer["status"] != 0

    await asyncio.gather(*(loop(s, i) for i, s in enumerate(socks)))
    await asyncio.gather(*(s.disconnect() for s in socks))
    return done[0], errors[0]


def _hot_worker(url, clients, seconds, out):
    out.put(asyncio.run(_hot_loop(url, clients, seconds)))


def throughput(url: str, clients: int, seconds: float, procs: int = 2) -> dict:
    """Requests per second of the hot mix with ``clients`` connections spread over ``procs`` processes."""
    out = mp.get_context("spawn").Queue()
    workers = [mp.get_context("spawn").Process(target=_hot_worker, args=(url, clients // procs, seconds, out))
               for _ in range(procs)]
    start = time.monotonic()
    for w in workers:
        w.start()
    results = [out.get(timeout=seconds + 300) for _ in workers]
    for w in workers:
        w.join()
    elapsed = max(seconds, time.monotonic() - start - 2.0)  # connection set-up is not measured time
    done, errors = sum(r[0] for r in results), sum(r[1] for r in results)
    return {"rps": round(done / seconds, 1), "requests": done, "errors": errors, "clients": clients,
            "wall_s": round(elapsed, 1)}


async def cold_request(url: str, fields: list[str]) -> float:
    sio = await connect(url)
    try:
        t = time.perf_counter()
        answer = await request(sio, "feature", feat_body(fields), timeout=600)
        assert answer["status"] == 0, answer
        return time.perf_counter() - t
    finally:
        await sio.disconnect()


LOCAL = """
import sys, time, json, qlib
from qlib.data import D
qlib.init(provider_uri=sys.argv[1], region="cn", logging_level="ERROR", kernels=int(sys.argv[3]))
fields = json.loads(sys.argv[2])
t = time.perf_counter(); D.features(D.instruments("all"), fields, "2019-01-01", "2020-12-31"); print(time.perf_counter() - t)
"""


def local_compute(data: Path, fields: list[str], kernels: int) -> float:
    out = subprocess.run([sys.executable, "-c", LOCAL, str(data), json.dumps(fields), str(kernels)],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


async def _idle(url: str, n: int, ready, release):
    socks = []
    for i in range(0, n, 50):
        socks += await asyncio.gather(*(connect(url) for _ in range(min(50, n - i))))
    ready.set()
    while not release.is_set():
        await asyncio.sleep(0.2)
    await asyncio.gather(*(s.disconnect() for s in socks), return_exceptions=True)


def _idle_worker(url, n, ready, release):
    asyncio.run(_idle(url, n, ready, release))


def handler_rss(port: int) -> int:
    """RSS of the process listening on ``port`` (the request handler)."""
    for conn in psutil.net_connections("tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
            return psutil.Process(conn.pid).memory_info().rss
    raise RuntimeError("handler process not found")


async def _many_cold(url: str, count: int) -> float:
    fields = [cold_fields() for _ in range(count)]
    t = time.perf_counter()
    await asyncio.gather(*(cold_request(url, f) for f in fields))
    return time.perf_counter() - t


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sim.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each throughput run")
    parser.add_argument("--out", default="bench-results/bench.json")
    parser.add_argument("--instruments", type=int, default=200)
    parser.add_argument("--amqp-host", default=os.environ.get("QLIB_BENCH_AMQP_HOST", "127.0.0.1"))
    parser.add_argument("--redis-host", default=os.environ.get("QLIB_BENCH_REDIS_HOST", "127.0.0.1"))
    parser.add_argument("--quick", action="store_true", help="smaller runs (a smoke test of the bench)")
    parser.add_argument("--hot-only", action="store_true", help="only the hot requests beside the echo floor")
    parser.add_argument("--client", action="store_true", help="only qlib_server.client beside the stock client "
                        "(see sim/bench_client.py; --instruments defaults to 300 there)")
    parser.add_argument("--days", type=int, default=1500, help="days of data for --client")
    args = parser.parse_args(argv)
    if args.client:
        from sim.bench_client import run

        args.instruments = 300 if "--instruments" not in (argv or sys.argv) else args.instruments
        return run(args, start_server, stop)
    seconds = 3.0 if args.quick else args.seconds
    latency_n = 100 if args.quick else 500
    connected = (1, 10, 100) if args.quick else (1, 10, 100, 1000)
    processor_counts = (1, 2) if args.quick else (1, 2, 4)

    work = Path(tempfile.mkdtemp(prefix="qlib-bench-"))
    data = generate_dataset(work / "data", instruments=args.instruments, days=750)
    results: dict = {"machine": {"cores": os.cpu_count(), "instruments": args.instruments, "days": 750}}

    print("echo server (floor) ...", flush=True)
    echo = start_echo(_free_port())
    echo_url = f"http://127.0.0.1:{echo.args[-1]}"
    try:
        results["echo"] = {k: asyncio.run(single_latency(echo_url, k, latency_n)) for k in HOT}
        results["echo"]["throughput_50"] = throughput(echo_url, 50, seconds)
    finally:
        stop(echo)

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    print("qlib-server, 1 processor ...", flush=True)
    server = start_server(work, data, port, 1, args)
    try:
        results["server"] = {k: asyncio.run(single_latency(url, k, latency_n)) for k in HOT}
        results["server"]["throughput_50"] = throughput(url, 50, seconds)
        if args.hot_only:
            report_hot(results)
            return 0
        print("cold feature requests vs local Qlib ...", flush=True)
        cold = []
        for _ in range(1 if args.quick else 3):
            fields = cold_fields()
            served = asyncio.run(cold_request(url, fields))
            local = local_compute(data, fields, kernels=os.cpu_count())
            cold.append({"server_s": round(served, 3), "local_s": round(local, 3), "ratio": round(served / local, 2)})
        results["cold_feature"] = cold
        print("connected clients ...", flush=True)
        by_clients = []
        for n in connected:
            ctx = mp.get_context("spawn")
            ready, release = ctx.Event(), ctx.Event()
            rss0 = handler_rss(port)
            idle = ctx.Process(target=_idle_worker, args=(url, n, ready, release))
            idle.start()
            ready.wait(300)
            rss1 = handler_rss(port)
            hot = asyncio.run(single_latency(url, "calendar", 100))
            cold_s = asyncio.run(cold_request(url, cold_fields()))
            release.set()
            idle.join(120)
            by_clients.append({"connected": n, "hot_calendar_p50_ms": hot["p50_ms"], "cold_feature_s": round(cold_s, 3),
                               "rss_per_client_kb": round((rss1 - rss0) / n / 1024, 1), "errors": 0})
        results["connected_clients"] = by_clients
    finally:
        stop(server)

    by_processors = []
    for k in processor_counts:
        print(f"cold throughput, {k} processor(s) ...", flush=True)
        port = _free_port()
        server = start_server(work, data, port, k, args)
        try:
            count = 8
            elapsed = asyncio.run(_many_cold(f"http://127.0.0.1:{port}", count))
            by_processors.append({"processors": k, "cold_requests": count, "seconds": round(elapsed, 2),
                                  "tasks_per_s": round(count / elapsed, 2)})
        finally:
            stop(server)
    results["processors"] = by_processors

    ablations = []
    for name, extra in (("no result cache", {"result_cache_ttl": 0}),
                        ("no result cache, threading mode", {"result_cache_ttl": 0, "async_mode": "threading"})):
        print(f"ablation: {name} ...", flush=True)
        port = _free_port()
        server = start_server(work, data, port, 1, args, **extra)
        try:
            url = f"http://127.0.0.1:{port}"
            row = {"variant": name, **{f"{k}_p50_ms": asyncio.run(single_latency(url, k, latency_n))["p50_ms"]
                                       for k in HOT}}
            row["throughput_50_rps"] = throughput(url, 50, seconds)["rps"]
            ablations.append(row)
        finally:
            stop(server)
    results["ablations"] = ablations

    report(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwritten {out}")
    return 0


def report_hot(r: dict) -> None:
    e, s = r["echo"], r["server"]
    print("\n== hot requests ==")
    print(f"{'':28}{'echo (floor)':>16}{'qlib-server':>16}{'ratio':>10}")
    for kind in HOT:
        print(f"{kind + ' latency p50 (ms)':28}{e[kind]['p50_ms']:>16.2f}{s[kind]['p50_ms']:>16.2f}"
              f"{s[kind]['p50_ms'] / e[kind]['p50_ms']:>10.2f}")
    et, st = e["throughput_50"]["rps"], s["throughput_50"]["rps"]
    print(f"{'throughput @50 (req/s)':28}{et:>16.1f}{st:>16.1f}{st / et:>10.2f}")


def report(r: dict) -> None:
    report_hot(r)
    s, st = r["server"], r["server"]["throughput_50"]["rps"]
    print("\n== cold feature request (200 instruments x 5 rolling fields x 2 years) ==")
    for c in r["cold_feature"]:
        print(f"server {c['server_s']:.3f} s   local Qlib {c['local_s']:.3f} s   ratio {c['ratio']:.2f}")
    print("\n== with N idle clients connected ==")
    print(f"{'connected':>10}{'hot p50 ms':>12}{'cold s':>10}{'KB/client':>12}")
    for c in r["connected_clients"]:
        print(f"{c['connected']:>10}{c['hot_calendar_p50_ms']:>12.2f}{c['cold_feature_s']:>10.3f}{c['rss_per_client_kb']:>12.1f}")
    print("\n== what each change buys (hot p50 ms per type, throughput @50) ==")
    print(f"{'variant':34}{'calendar':>10}{'instrument':>12}{'feature':>10}{'req/s':>10}")
    print(f"{'qlib-server (default)':34}{s['calendar']['p50_ms']:>10.2f}{s['instrument']['p50_ms']:>12.2f}"
          f"{s['feature']['p50_ms']:>10.2f}{st:>10.1f}")
    for a in r.get("ablations", []):
        print(f"{a['variant']:34}{a['calendar_p50_ms']:>10.2f}{a['instrument_p50_ms']:>12.2f}{a['feature_p50_ms']:>10.2f}"
              f"{a['throughput_50_rps']:>10.1f}")
    print("\n== cold throughput by processors ==")
    for p in r["processors"]:
        print(f"{p['processors']:>3} processor(s): {p['cold_requests']} cold requests in {p['seconds']} s "
              f"({p['tasks_per_s']} tasks/s)")


if __name__ == "__main__":
    sys.exit(main())
