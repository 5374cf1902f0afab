"""One load-generating process: many fake clients on one asyncio loop, each a persistent Socket.IO connection.

Each fake client keeps one request in flight at a time. The process connects its clients, reports
``ready``, waits for the common start signal, runs until the shared deadline, lets requests in flight
finish (or time out), and sends back what it recorded: one row per request, error messages, and each
distinct answer once per request (for the verifier, which runs after the load).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from collections import Counter
from dataclasses import dataclass

from .client import connect, pick_encoding, request
from .report import LANES
from .universe import KINDS, Dataset, Request, Sampler, Universe

OK, BAD_STATUS, TIMEOUT, DISCONNECTED = 0, 1, 2, 3
OUTCOMES = ("ok", "bad status", "timeout", "disconnected")


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker process runs."""

    index: int
    workers: int
    server: str
    data_dir: str
    clients: int
    overlap: str = "zipf:1.2"
    mix: tuple = (("calendar", 0.2), ("instrument", 0.3), ("feature", 0.5))
    encoding: str = "json"
    universe_size: int = 200
    seed: int = 0
    timeout: float = 60.0
    connect_timeout: float = 30.0
    token: str | None = None


class Recorder:
    """Per-request rows (type, start offset, latency, outcome, lane), error messages and distinct answers."""

    def __init__(self, t0: float):
        self.t0 = t0
        self.kinds: list[int] = []
        self.starts: list[float] = []
        self.latencies: list[float] = []
        self.outcomes: list[int] = []
        self.lanes: list[int] = []
        self.errors: Counter[str] = Counter()
        self.connect_errors = 0
        self.answers: dict[tuple[str, str], list] = {}

    def add(self, req: Request, started: float, latency: float, outcome: int, detail: str = "",
            result=None) -> None:
        self.kinds.append(KINDS.index(req.kind))
        self.starts.append(started - self.t0)
        self.latencies.append(latency)
        self.outcomes.append(outcome)
        self.lanes.append(LANES.index("light" if req.light else "feature"))
        if outcome != OK:
            self.errors[f"{req.kind}: {OUTCOMES[outcome]}: {detail}"[:300]] += 1
            return
        digest = hashlib.sha1(json.dumps(result, sort_keys=True, default=str).encode()).hexdigest()
        entry = self.answers.get((req.id, digest))
        if entry is None:
            self.answers[(req.id, digest)] = [req.kind, req.body, result, 1]
        else:
            entry[3] += 1

    def export(self) -> dict:
        return {"kinds": self.kinds, "starts": self.starts, "latencies": self.latencies, "outcomes": self.outcomes,
                "lanes": self.lanes, "errors": dict(self.errors), "connect_errors": self.connect_errors,
                "answers": [(*key, *value) for key, value in self.answers.items()]}


class _Run:
    def __init__(self, spec: WorkerSpec, clock, progress):
        self.spec, self.clock, self.progress = spec, clock, progress
        universe = Universe(Dataset.load(spec.data_dir), spec.universe_size, spec.seed)
        self.sampler = Sampler(universe, spec.overlap, dict(spec.mix), spec.seed, spec.index, spec.workers)
        self.rng = random.Random(spec.seed * 7919 + spec.index)
        self.rec: Recorder | None = None
        self.done = 0

    async def connect(self):
        try:
            return await connect(self.spec.server, timeout=self.spec.connect_timeout, token=self.spec.token)
        except Exception as exc:  # socketio raises ConnectionError, aiohttp its own
            if self.rec is not None:
                self.rec.connect_errors += 1
                self.rec.errors[f"connect: {type(exc).__name__}: {exc}"[:300]] += 1
            return None

    async def client(self, sio) -> None:
        deadline = self.clock[1]
        while time.time() < deadline:
            if sio is None or not sio.connected:
                sio = await self.connect()
                if sio is None:
                    await asyncio.sleep(0.5)
                    continue
            req = self.sampler.draw()
            encoding = pick_encoding(self.spec.encoding, self.rng)
            started, t = time.time(), time.perf_counter()
            try:
                answer = await request(sio, req.kind, req.body, encoding, self.spec.timeout)
            except asyncio.TimeoutError:
                self.rec.add(req, started, time.perf_counter() - t, TIMEOUT, f"no answer within {self.spec.timeout} s")
                sio = await self._drop(sio)
            except Exception as exc:
                self.rec.add(req, started, time.perf_counter() - t, DISCONNECTED, f"{type(exc).__name__}: {exc}")
                sio = await self._drop(sio)
            else:
                latency = time.perf_counter() - t
                if not isinstance(answer, dict) or answer.get("status") != 0:
                    info = answer.get("detailed_info") if isinstance(answer, dict) else repr(answer)[:100]
                    self.rec.add(req, started, latency, BAD_STATUS, str(info))
                else:
                    self.rec.add(req, started, latency, OK, result=answer.get("result"))
            self.done += 1
        if sio is not None:
            await self._drop(sio)

    @staticmethod
    async def _drop(sio):
        try:
            await sio.disconnect()
        except Exception:
            pass
        return None

    async def report_progress(self) -> None:
        slot = self.spec.index * 2
        while True:
            self.progress[slot] = self.done
            self.progress[slot + 1] = sum(self.rec.errors.values())
            await asyncio.sleep(0.25)

    async def main(self, events, go) -> None:
        connected = await asyncio.gather(*(self.connect() for _ in range(self.spec.clients)))
        failed = sum(s is None for s in connected)
        events.put(("ready", self.spec.index, self.spec.clients - failed))
        await asyncio.get_running_loop().run_in_executor(None, go.wait)
        self.rec = Recorder(self.clock[0])
        self.rec.connect_errors = failed
        if failed:
            self.rec.errors[f"connect: {failed} clients failed to connect before the start"] += failed
        ticker = asyncio.ensure_future(self.report_progress())
        await asyncio.gather(*(self.client(sio) for sio in connected))
        ticker.cancel()
        self.progress[self.spec.index * 2] = self.done
        events.put(("done", self.spec.index, self.rec.export()))


def worker_main(spec: WorkerSpec, events, go, clock, progress) -> None:
    """Process entry: ``events`` gets ("ready", i, n) then ("done", i, rows); ``clock`` holds [start, deadline].

    The rows are :meth:`Recorder.export`: "answers" lists (request id, result digest, kind, body, result, count).
    """
    try:
        asyncio.run(_Run(spec, clock, progress).main(events, go))
    except BaseException as exc:
        events.put(("failed", spec.index, f"{type(exc).__name__}: {exc}"))
        raise
