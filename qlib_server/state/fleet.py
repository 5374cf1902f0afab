"""The fleet: what every handler and data processor tells the status page about itself, through Redis.

Each process writes a JSON snapshot of itself (its Prometheus samples, and for a processor what each
worker computes) to ``keys.fleet(kind, id)`` every second, expiring after ``keys.FLEET_TTL``: a process
that dies leaves the page within seconds, one that stops removes its own. Any handler's page reads
them all and sums their samples, so one page shows the whole fleet.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from multiprocessing.connection import wait
from typing import Callable, Optional

import redis

from . import keys
from ..admission import Admission, serve_metrics
from ..metrics import ProcessorMetrics, samples

log = logging.getLogger(__name__)

#: gauges that every handler samples from the same queues: shown from one handler, never summed
SAMPLED_ONCE = ("qlib_server_queue_messages",)
#: a task's outcome by the status of its result
OUTCOMES = {0: "ok", 1: "refused", 2: "failed"}


def write(client: redis.Redis, kind: str, ident: str, snapshot: dict) -> None:
    key = keys.fleet(kind, ident)
    pipe = client.pipeline(transaction=False)
    pipe.set(key, json.dumps(snapshot, default=str), ex=keys.FLEET_TTL)
    pipe.sadd(keys.FLEET_INDEX, key)
    pipe.expire(keys.FLEET_INDEX, keys.FLEET_INDEX_TTL)
    pipe.execute()


def remove(client: redis.Redis, kind: str, ident: str) -> None:
    key = keys.fleet(kind, ident)
    client.pipeline(transaction=False).delete(key).srem(keys.FLEET_INDEX, key).execute()


def read(client: redis.Redis) -> list[dict]:
    """The snapshots of every live process (those whose snapshot has expired are dropped from the index)."""
    members = sorted(client.smembers(keys.FLEET_INDEX))
    values = client.mget(members) if members else []
    gone = [m for m, v in zip(members, values) if v is None]
    if gone:
        client.srem(keys.FLEET_INDEX, *gone)
    return [json.loads(v) for v in values if v is not None]


def totals(snapshots: list[dict]) -> dict[str, float]:
    """Each sample summed over ``snapshots`` (counters, gauges and histogram buckets all add up)."""
    out: dict[str, float] = {}
    for snapshot in snapshots:
        for name, value in snapshot.get("samples", {}).items():
            if not name.startswith(SAMPLED_ONCE):
                out[name] = out.get(name, 0.0) + value
    return out


def identity(kind: str) -> dict:
    return {"kind": kind, "id": uuid.uuid4().hex[:12], "host": socket.gethostname(), "pid": os.getpid(),
            "started": time.time()}


class ErrorLog(logging.Handler):
    """Counts the ERROR records of this process's ``qlib_server`` loggers and keeps the last one."""

    def __init__(self, counter):
        super().__init__(logging.ERROR)
        self.counter = counter
        self.last: Optional[tuple[float, str]] = None  # (when, message)

    def emit(self, record: logging.LogRecord) -> None:
        self.counter.inc()
        self.last = (record.created, f"{record.name}: {record.getMessage()}"[:300])

    def attach(self) -> "ErrorLog":
        logging.getLogger("qlib_server").addHandler(self)
        return self


def describe(task: dict) -> str:
    """What a task computes, in one short line."""
    args = task.get("args") or {}
    instruments = args.get("instruments")
    if isinstance(instruments, dict):
        filters = len(instruments.get("filter_pipe") or [])
        scope = f"market {instruments.get('market')}" + (f" with {filters} filter(s)" if filters else "")
    else:
        scope = f"{len(instruments or [])} instrument(s)"
    if task.get("type") == "calendar":
        return f"{args.get('freq')} calendar {args.get('start_time') or '…'} to {args.get('end_time') or '…'}"
    if task.get("type") == "instrument":
        return f"instrument list of {scope}"
    fields = args.get("fields") or [""]
    more = f" and {len(fields) - 1} more field(s)" if len(fields) > 1 else ""
    return f"features {str(fields[0])[:60]}{more} of {scope}"


class ProcessorStatus:
    """What the status page and ``processor_metrics_port`` show of one data processor: its metrics, and
    the task each worker computes. Workers report ``("start", type, key, what, started, deliveries)``
    and ``("done", type, status, seconds)``: over a pipe each (:meth:`watch`, :meth:`collect`), or by
    calling :meth:`on_report` (embedded mode)."""

    def __init__(self, cfg, lanes: list[str], count_errors: bool = True):
        self.cfg = cfg
        self.identity = identity("processor")
        self.metrics = ProcessorMetrics()
        self.lanes = lanes  # the lane of each worker slot
        self.current: list[Optional[dict]] = [None] * len(lanes)
        self.sources: list = [None] * len(lanes)  # the pipe each slot reports on
        self._retired: list = []
        self._lock = threading.Lock()
        self.errors = ErrorLog(self.metrics.errors).attach() if count_errors else None
        self.metrics_port: Optional[int] = None
        for lane in set(lanes):
            self.metrics.workers.labels(lane).set(lanes.count(lane))
            self.metrics.busy_workers.labels(lane).set(0)

    # -- what the workers report -------------------------------------------------------------------
    def on_report(self, slot: int, event: tuple, current: bool = True) -> None:
        with self._lock:
            if event[0] == "start":
                _, task_type, key, what, started, deliveries = event
                if deliveries:
                    self.metrics.redeliveries.labels(task_type).inc()
                if current:
                    self.current[slot] = {"type": task_type, "key": key, "what": what, "since": started}
            elif event[0] == "done":
                _, task_type, status, seconds = event
                self.metrics.task_seconds.labels(task_type).observe(seconds)
                self.metrics.tasks.labels(task_type, OUTCOMES.get(status, "failed")).inc()
                if current:
                    self.current[slot] = None

    def lost(self, slot: int, outcome: str) -> None:
        """Worker ``slot`` was killed or died: count the task it was computing, if any."""
        with self._lock:
            task, self.current[slot] = self.current[slot], None
            if task is not None:
                self.metrics.tasks.labels(task["type"], outcome).inc()

    def watch(self, slot: int, reader) -> None:
        """From now on worker ``slot`` reports on ``reader`` (the pipe of its previous process retires)."""
        with self._lock:
            if self.sources[slot] is not None:
                self._retired.append(self.sources[slot])
            self.sources[slot] = reader
            self.current[slot] = None

    def collect(self, stop: threading.Event) -> None:
        """Read the workers' pipes until ``stop`` is set."""
        while not stop.is_set():
            with self._lock:
                retired, self._retired = self._retired, []
                slots = {r: i for i, r in enumerate(self.sources) if r is not None and not r.closed}
            for reader in retired:
                reader.close()  # only this thread reads the pipes, so only it closes them
            if not slots:
                stop.wait(0.5)
                continue
            for reader in wait(list(slots), 0.5):
                try:
                    event = reader.recv()
                except (EOFError, OSError):  # its worker is gone; the supervisor starts another
                    reader.close()
                    continue
                self.on_report(slots[reader], event, current=self.sources[slots[reader]] is reader)

    # -- what the page and the metrics port see -----------------------------------------------------
    def snapshot(self, workers: list[tuple[Optional[int], float]]) -> dict:
        """This processor now, given the (pid, busy since or 0) of each worker slot."""
        busy, now, rows = dict.fromkeys(self.lanes, 0), time.time(), []
        for slot, ((pid, since), lane) in enumerate(zip(workers, self.lanes)):
            busy[lane] += bool(since)
            self.metrics.busy_seconds.labels(str(slot)).set(max(0.0, now - since) if since else 0)
            task = self.current[slot] if since else None
            rows.append({"slot": slot, "lane": lane, "pid": pid, "since": since or None,
                         "task": task and {**task, "since": since}})
        for lane, count in busy.items():
            self.metrics.busy_workers.labels(lane).set(count)
        return {**self.identity, "time": now, "task_queue": self.cfg.task_queue,
                "metrics_port": self.metrics_port, "workers": rows, "samples": samples(self.metrics.registry),
                "last_error": self.errors.last if self.errors else None}

    def run(self, stop: threading.Event, workers: Callable[[], list]) -> None:
        """Serve ``processor_metrics_port``, then publish a snapshot each second until ``stop`` is set."""
        cfg = self.cfg
        if cfg.processor_metrics_port is not None:
            self.metrics_port = serve_metrics(self.metrics.registry, cfg.flask_server, cfg.processor_metrics_port,
                                              Admission(cfg.allowed_networks, cfg.auth_token))
        client = redis.Redis(host=cfg.redis_host, port=cfg.redis_port, db=cfg.redis_task_db,
                             password=cfg.redis_password, socket_timeout=2, socket_connect_timeout=2)
        failing = False
        while not stop.is_set():
            try:
                write(client, "processor", self.identity["id"], self.snapshot(workers()))
                failing = False
            except redis.RedisError as exc:
                if not failing:
                    log.warning("cannot publish this processor's status to Redis (%s); retrying", exc)
                failing = True
            stop.wait(1.0)
        try:
            remove(client, "processor", self.identity["id"])
        except redis.RedisError:
            pass  # it expires by itself
