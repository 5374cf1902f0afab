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
import time
import uuid
from typing import Optional

import redis

from . import keys

#: gauges that every handler samples from the same queues: shown from one handler, never summed
SAMPLED_ONCE = ("qlib_server_queue_messages",)


def write(client: redis.Redis, kind: str, ident: str, snapshot: dict) -> None:
    key = keys.fleet(kind, ident)
    pipe = client.pipeline(transaction=False)
    pipe.set(key, json.dumps(snapshot, default=str), ex=keys.FLEET_TTL)
    pipe.sadd(keys.FLEET_INDEX, key)
    pipe.expire(keys.FLEET_INDEX, keys.FLEET_INDEX_TTL)
    pipe.execute()


def remove(client: redis.Redis, kind: str, ident: str) -> None:
    key = keys.fleet(kind, ident)
    pipe = client.pipeline(transaction=False)
    pipe.delete(key)
    pipe.srem(keys.FLEET_INDEX, key)
    pipe.execute()


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

    def attach(self) -> ErrorLog:
        logging.getLogger("qlib_server").addHandler(self)
        return self
