"""What the benchmark measures, against a qlib-server or the echo server started by :mod:`sim.bench`.

Hot requests (answered from the result cache), cold feature sets (never asked before) beside Qlib
computing the same ``D.features`` locally, the light lane while both feature workers compute, and
many connected clients.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import multiprocessing as mp
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

from sim.client import connect, payload, request

#: the issue's cold case: a 3-year window of the 6 years of data the benchmark generates
COLD_START, COLD_END = "2020-01-01", "2022-12-31"
DAYS = 1500
CAL_BODY = {"start_time": None, "end_time": None, "freq": "day", "future": False}
INST_BODY = {"instruments": {"market": "csi300", "filter_pipe": []}, "start_time": None, "end_time": None,
             "freq": "day", "as_list": True}
HOT_FIELDS = ["$close", "Mean($close, 5)"]
_COLD = itertools.count()


def feat_body(fields, market="all", start=COLD_START, end=COLD_END):
    return {"instruments": {"market": market, "filter_pipe": []}, "fields": fields, "start_time": start,
            "end_time": end, "freq": "day", "disk_cache": 1}


def cold_fields(k: int | None = None) -> list[str]:
    """Five rolling fields with windows of 5 to 70 days that no request of this run has asked for yet."""
    k = next(_COLD) if k is None else k
    step, base = k % 16, ("close", "open", "vwap", "high", "low")[(k // 16) % 5]
    if k >= 80:
        raise ValueError("no more distinct cold field sets")
    return [f"Mean(${base}, {5 + step})", f"Std(${base}, {20 + step})", f"Max($high, {35 + step})",
            f"Min($low, {50 + step})", f"Sum($volume, {70 - step})"]


HOT = {"calendar": CAL_BODY, "instrument": INST_BODY, "feature": feat_body(HOT_FIELDS, "csi300")}


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile (nearest rank at or above) of ``values``; NaN when there are none."""
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def summary_ms(samples: list[float]) -> dict:
    return {"p50_ms": round(pct(samples, .5), 3), "p90_ms": round(pct(samples, .9), 3),
            "p99_ms": round(pct(samples, .99), 3), "n": len(samples)}


# -- hot -----------------------------------------------------------------------------------------
def _ws_url(url: str) -> str:
    return url.replace("http://", "ws://", 1).rstrip("/") + "/socket.io/?EIO=4&transport=websocket"


async def capture_frames(url: str, kinds=tuple(HOT), encoding: str = "json", timeout: float = 120.0) -> dict[str, dict]:
    """Each hot request as the bench's clients send it (``event``, the encoded ``body``) and the exact
    Engine.IO text frame the server at ``url`` answers it with (``frame``), read off a raw WebSocket
    (aiohttp speaking Engine.IO 4 by hand, so nothing decodes and re-encodes the answer). Each request
    is asked twice and the second answer kept (the first of a cold feature set computes it); both must
    carry the same bytes."""
    import aiohttp

    out = {}
    async with aiohttp.ClientSession() as session, session.ws_connect(_ws_url(url), max_msg_size=0) as ws:

        async def frame(prefix: str) -> str:
            while True:
                text = await asyncio.wait_for(ws.receive_str(), timeout)
                if text == "2":  # Engine.IO ping
                    await ws.send_str("3")
                elif text.startswith(prefix):
                    return text

        await frame("0")  # Engine.IO open
        await ws.send_str("40")  # Socket.IO connect, default namespace
        await frame("40")
        for kind in kinds:
            event, sent = f"{kind}_request", payload(HOT[kind], encoding)
            answers = []
            for _ in range(2):
                await ws.send_str("42" + json.dumps([event, sent], separators=(",", ":")))
                answers.append(await frame(f'42["{kind}_response"'))
            if answers[0] != answers[1]:
                raise RuntimeError(f"{url} answered the same {kind} request with different bytes")
            out[kind] = {"event": event, "body": sent["body"], "frame": answers[1]}
    return out


async def single_latency(url: str, kind: str, n: int) -> dict:
    sio = await connect(url)
    try:
        await request(sio, kind, HOT[kind], timeout=120)  # warm: the answer is cached from here on
        samples = []
        for _ in range(n):
            t = time.perf_counter()
            answer = await request(sio, kind, HOT[kind], timeout=60)
            samples.append((time.perf_counter() - t) * 1000)
            assert answer["status"] == 0, answer
        return summary_ms(samples)
    finally:
        await sio.disconnect()


async def paired_latency(urls: dict[str, str], kind: str, n: int, rounds: int = 10) -> dict[str, dict]:
    """Single-client latency of one hot request on each server (name -> URL), ``n`` samples each, taken
    in alternating rounds so that a change in the machine's load falls on every server alike."""
    socks = {name: await connect(url) for name, url in urls.items()}
    samples: dict[str, list] = {name: [] for name in urls}
    try:
        for sio in socks.values():
            await request(sio, kind, HOT[kind], timeout=120)  # warm: the answer is cached from here on
        for _ in range(rounds):
            for name, sio in socks.items():
                for _ in range(max(1, n // rounds)):
                    t = time.perf_counter()
                    answer = await request(sio, kind, HOT[kind], timeout=60)
                    samples[name].append((time.perf_counter() - t) * 1000)
                    assert answer["status"] == 0, answer
    finally:
        for sio in socks.values():
            await sio.disconnect()
    return {name: summary_ms(values) for name, values in samples.items()}


def paired_throughput(urls: dict[str, str], clients: int, seconds: float, rounds: int = 2) -> dict[str, dict]:
    """:func:`throughput` of each server in alternating rounds of ``seconds / rounds`` (see above), with
    the CPU time its serving process spent per answer meanwhile (``cpu_us_per_answer``, median of rounds)."""
    runs: dict[str, list] = {name: [] for name in urls}
    for _ in range(rounds):
        for name, url in urls.items():
            runs[name].append(throughput(url, clients, seconds / rounds))
    return {name: {"rps": round(sum(r["rps"] for r in rs) / len(rs), 1), "requests": sum(r["requests"] for r in rs),
                   "errors": sum(r["errors"] for r in rs), "clients": clients, "rounds": [r["rps"] for r in rs],
                   "cpu_us_per_answer": round(statistics.median(r["cpu_us_per_answer"] for r in rs), 1)}
            for name, rs in runs.items()}


async def _hot_loop(url: str, clients: int, seconds: float, start_at: float) -> tuple[int, int]:
    socks = await asyncio.gather(*(connect(url) for _ in range(clients)))
    await asyncio.sleep(max(0.0, start_at - time.time()))  # every process starts the clock together
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


def _hot_worker(url, clients, seconds, start_at, out):
    out.put(asyncio.run(_hot_loop(url, clients, seconds, start_at)))


def throughput(url: str, clients: int, seconds: float, procs: int = 2) -> dict:
    """Answers per second of the hot mix with ``clients`` connections over ``procs`` processes, counted
    from a start time every process waits for once connected."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 5.0 + clients * 0.02
    workers = [ctx.Process(target=_hot_worker, args=(url, clients // procs, seconds, start_at, out))
               for _ in range(procs)]
    for w in workers:
        w.start()
    server = psutil.Process(listener_pid(int(url.rsplit(":", 1)[1].strip("/"))))
    time.sleep(max(0.0, start_at - time.time()))
    cpu = sum(server.cpu_times()[:2])
    time.sleep(max(0.0, start_at + seconds - time.time()))
    cpu = sum(server.cpu_times()[:2]) - cpu
    results = [out.get(timeout=seconds + 300) for _ in workers]
    for w in workers:
        w.join()
    done, errors = sum(r[0] for r in results), sum(r[1] for r in results)
    return {"rps": round(done / seconds, 1), "requests": done, "errors": errors, "clients": clients,
            "cpu_us_per_answer": round(cpu / max(1, done) * 1e6, 1)}


# -- cold ----------------------------------------------------------------------------------------
async def cold_request(url: str, fields: list[str], market: str = "all") -> float:
    sio = await connect(url)
    try:
        t = time.perf_counter()
        answer = await request(sio, "feature", feat_body(fields, market), timeout=600)
        assert answer["status"] == 0, answer
        return time.perf_counter() - t
    finally:
        await sio.disconnect()


async def warm_workers(url: str, workers: int = 2) -> None:
    """One small feature set per feature worker at once (each worker takes one task at a time), so that
    the cold figures are those of running workers, not of a worker's first Qlib computation."""
    fields = [[f"Mean($close, {71 + i})"] for i in range(2 * workers)]
    await asyncio.gather(*(cold_request(url, f, market="csi300") for f in fields))


LOCAL = """
import sys, time, json, qlib
from qlib.data import D
qlib.init(provider_uri=sys.argv[1], region="cn", logging_level="ERROR")
fields, start, end = json.loads(sys.argv[2])
t = time.perf_counter(); D.features(D.instruments("all"), fields, start, end); print(time.perf_counter() - t)
"""


def local_compute(data: Path, fields: list[str]) -> float:
    """Seconds of ``D.features`` of the cold case in a fresh local Qlib (its defaults: every core)."""
    out = subprocess.run([sys.executable, "-c", LOCAL, str(data), json.dumps([fields, COLD_START, COLD_END])],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


async def identical_cold(url: str, clients: int, fields: list[str]) -> dict:
    """``clients`` connections ask the same cold feature set at once: seconds until the last is answered."""
    socks = []
    for i in range(0, clients, 50):
        socks += await asyncio.gather(*(connect(url) for _ in range(min(50, clients - i))))
    try:
        t = time.perf_counter()
        answers = await asyncio.gather(*(request(s, "feature", feat_body(fields), timeout=600) for s in socks))
        seconds = time.perf_counter() - t
    finally:
        await asyncio.gather(*(s.disconnect() for s in socks), return_exceptions=True)
    return {"clients": clients, "seconds": round(seconds, 3), "ok": sum(a["status"] == 0 for a in answers),
            "distinct_answers": len({a["result"] for a in answers})}


# -- the light lane ------------------------------------------------------------------------------
def light_bodies(data: Path, seed: int):
    """Endless calendar and instrument-list requests never asked before (random day spans), alternating."""
    days = (data / "calendars" / "day.txt").read_text().split()
    rng = random.Random(seed)
    seen = set()
    for i in itertools.count():
        while True:
            a, b = sorted(rng.sample(range(len(days)), 2))
            if (i % 2, a, b) not in seen:
                seen.add((i % 2, a, b))
                break
        if i % 2:
            yield "instrument", {**INST_BODY, "start_time": days[a], "end_time": days[b]}
        else:
            yield "calendar", {**CAL_BODY, "start_time": days[a], "end_time": days[b]}


async def light_latency(url: str, bodies, n: int | None = None, until=None) -> list[float]:
    """Milliseconds of light requests sent one after another: ``n`` of them, or until ``until()``."""
    sio = await connect(url)
    samples = []
    try:
        while (n is None or len(samples) < n) and not (until is not None and until()):
            kind, body = next(bodies)
            t = time.perf_counter()
            answer = await request(sio, kind, body, timeout=120)
            samples.append((time.perf_counter() - t) * 1000)
            assert answer["status"] == 0, answer
    finally:
        await sio.disconnect()
    return samples


async def light_while_busy(url: str, bodies, heavy: list[list[str]], workers: int = 2) -> dict:
    """Light requests while ``heavy`` cold feature sets keep the feature workers busy: sampled from the
    first heavy request's start until fewer than ``workers`` of them are left (both workers busy)."""
    left = [len(heavy)]

    async def one(fields):
        try:
            return await cold_request(url, fields)
        finally:
            left[0] -= 1

    tasks = [asyncio.ensure_future(one(f)) for f in heavy]
    await asyncio.sleep(0.3)  # the tasks are published and taken
    samples = await light_latency(url, bodies, until=lambda: left[0] < workers)
    heavy_s = await asyncio.gather(*tasks)
    return {**summary_ms(samples), "heavy_requests": len(heavy), "heavy_max_s": round(max(heavy_s), 3)}


# -- many clients ----------------------------------------------------------------------------------
async def _idle(url: str, n: int, ready, release, answered):
    socks = []
    for i in range(0, n, 50):
        socks += await asyncio.gather(*(connect(url, timeout=60) for _ in range(min(50, n - i))))
    ready.put(len(socks))
    while not release.is_set():
        await asyncio.sleep(0.1)
    answers = await asyncio.gather(*(request(s, "calendar", CAL_BODY, timeout=120) for s in socks),
                                   return_exceptions=True)
    answered.put(sum(isinstance(a, dict) and a.get("status") == 0 for a in answers))
    await asyncio.gather(*(s.disconnect() for s in socks), return_exceptions=True)


def _idle_worker(url, n, ready, release, answered):
    asyncio.run(_idle(url, n, ready, release, answered))


def listener_pid(port: int) -> int:
    """The process listening on ``port`` (the request handler, or the echo server)."""
    for conn in psutil.net_connections("tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
            return conn.pid
    raise RuntimeError(f"no process listens on port {port}")


def handler_rss(port: int) -> int:
    """RSS of the process listening on ``port`` (the request handler)."""
    return psutil.Process(listener_pid(port)).memory_info().rss


def with_connected(url: str, port: int, n: int, procs: int = 2) -> dict:
    """Connect ``n`` idle clients (over ``procs`` processes); measure the handler's memory per connection
    and a hot and a cold request meanwhile; then every idle client asks a calendar: how many are answered."""
    ctx = mp.get_context("spawn")
    ready, answered, release = ctx.Queue(), ctx.Queue(), ctx.Event()
    rss0 = handler_rss(port)
    shares = [n // procs + (i < n % procs) for i in range(procs)]
    idle = [ctx.Process(target=_idle_worker, args=(url, k, ready, release, answered)) for k in shares if k]
    for p in idle:
        p.start()
    connected = sum(ready.get(timeout=600) for _ in idle)
    rss1 = handler_rss(port)
    hot = asyncio.run(single_latency(url, "calendar", 100))
    cold_s = asyncio.run(cold_request(url, cold_fields()))
    release.set()
    got = sum(answered.get(timeout=300) for _ in idle)
    for p in idle:
        p.join(120)
    return {"connected": connected, "answered": got, "hot_calendar_p50_ms": hot["p50_ms"],
            "cold_feature_s": round(cold_s, 3), "rss_per_client_kb": round((rss1 - rss0) / max(1, n) / 1024, 1)}
