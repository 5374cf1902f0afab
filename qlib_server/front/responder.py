"""RequestResponder: results from the message queue → every waiting client → cleared.

Each waiter in the registry is ``<node>|<sid>``: the handler (node) holding the client's connection
and the client's session id. The responder that takes a result answers its own node's clients
directly and forwards the answer of every other node's clients to that node's inbox queue, whose
consumer (the same responder code on that node) answers them. Only then are the waiters cleared
and the result acknowledged, so a responder that dies midway leaves the result to another one.

:class:`Pending` is what a handler still owes its clients. A client is answered only by the handler
holding it, and only when its request leaves :class:`Pending`: an answer is never sent twice, and a
request whose waiter entry vanished (Redis lost it, or a forwarded answer was lost) is noticed by
:meth:`RequestResponder.sweep` and served again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..broker import Broker
from ..errors import QlibServerError
from ..metrics import Metrics
from ..protocol import REQUEST_TYPES, Request, response, with_id
from ..state import keys
from ..state.cache import ResultCache
from ..state.registry import SessionRegistry

log = logging.getLogger(__name__)
Emit = Callable[[str, dict, str], None]
Forward = Callable[[str, dict], None]


def bound(metric):
    """``metric.labels(*values)`` remembered per label values: a hot request labels four samples, and
    prometheus_client's ``labels()`` checks and joins its arguments under a lock each time."""
    children: dict = {}

    def child(*values):
        found = children.get(values)
        if found is None:
            found = children[values] = metric.labels(*values)
        return found

    return child


def waiter(node: str, sid: str) -> str:
    """The registry entry of client ``sid`` held by handler ``node``."""
    return f"{node}|{sid}"


@dataclass
class Waiting:
    """One request key a client waits for: the request, when it came, how many times it was sent, and
    the ids the client gave those requests (None for a client that gives none), in order."""

    request: Request
    started: float
    count: int = 1
    missing_since: Optional[float] = None  # when the sweeper first saw its waiter entry gone
    ids: list = field(default_factory=lambda: [None])

    def answers(self, envelope: dict) -> list[dict]:
        """The envelope once per request held here, each carrying its request's id."""
        return [with_id(envelope, rid) for rid in self.ids]


class Pending:
    """The requests this handler still owes an answer: session id → {key: :class:`Waiting`}."""

    def __init__(self) -> None:
        self._by_sid: dict[str, dict[str, Waiting]] = {}
        self._lock = threading.Lock()

    def reserve(self, sid: str, request: Request, started: float, limit: int, rid: Optional[str] = None
                ) -> Optional[bool]:
        """Add the request (with id ``rid``) unless ``sid`` already has ``limit`` requests pending, checked
        and added under one lock. None when refused, else whether the key is new for ``sid``."""
        with self._lock:
            waiting = self._by_sid.setdefault(sid, {})
            if sum(w.count for w in waiting.values()) >= limit:
                if not waiting:
                    del self._by_sid[sid]
                return None
            entry = waiting.get(request.key)
            if entry is None:
                waiting[request.key] = Waiting(request, started, ids=[rid])
                return True
            entry.count += 1
            entry.ids.append(rid)
            return False

    def done(self, sid: str, key: str, every: bool = False) -> Optional[Waiting]:
        """Take one request of ``sid`` for ``key`` (all of them with ``every``) off the list; None when
        there was none, i.e. it has been answered already or its client is gone. The entry returned
        holds the ids of the requests taken."""
        with self._lock:
            waiting = self._by_sid.get(sid)
            entry = waiting.get(key) if waiting else None
            if waiting is None or entry is None:
                return None
            if not every and entry.count > 1:
                entry.count -= 1
                return Waiting(entry.request, entry.started, ids=[entry.ids.pop(0)])
            else:  # the entry keeps its count: how many answers its requests are owed
                del waiting[key]
                if not waiting:
                    del self._by_sid[sid]
            return entry

    def count(self, sid: str) -> int:
        """How many requests ``sid`` waits for."""
        with self._lock:
            return sum(w.count for w in self._by_sid.get(sid, {}).values())

    def drop(self, sid: str) -> list[str]:
        """Forget a client that is gone; return the keys it waited for."""
        with self._lock:
            return list(self._by_sid.pop(sid, {}))

    def older_than(self, age: float) -> list[tuple[str, str, Waiting]]:
        limit = time.monotonic() - age
        with self._lock:
            return [(sid, key, w) for sid, by_key in self._by_sid.items() for key, w in by_key.items()
                    if w.started < limit]

    def __len__(self) -> int:
        with self._lock:
            return sum(w.count for by_key in self._by_sid.values() for w in by_key.values())


class RequestResponder:
    """Answers every waiter of a finished task, and sweeps requests lost or left unanswered."""

    def __init__(self, node: str, registry: SessionRegistry, metrics: Metrics, emit: Emit, forward: Forward,
                 pending: Pending, request_timeout: float, cache: ResultCache):
        self.node = node
        self.registry = registry
        self.metrics = metrics
        self.emit = emit
        self.forward = forward
        self.pending = pending
        self.request_timeout = request_timeout
        self.cache = cache
        self.resubmit: Callable[[str, Request], None] = lambda sid, request: None  # set by the listener
        self._latency, self._responses = bound(metrics.latency), bound(metrics.responses)
        self.running = True

    def deliver(self, request_type: str, key: str, envelope: dict, sid: str) -> bool:
        """Emit ``envelope`` to local client ``sid`` if it still waits for ``key``."""
        entry = self.pending.done(sid, key)
        if entry is None:
            return False
        for answer in entry.answers(envelope):
            self.emit(f"{request_type}_response", answer, sid)
        latency = time.monotonic() - entry.started
        self._latency(request_type).observe(latency)
        self._responses(request_type, str(envelope["status"])).inc()
        if log.isEnabledFor(logging.INFO):
            log.info("%s request of %s key=%s status=%s answered in %.1f ms", request_type, sid, key,
                     envelope["status"], latency * 1000)
        return True

    def answer(self, key: str, request_type: str, status: int, result, detailed_info: Optional[str]) -> int:
        """Answer every waiter of ``key`` (forwarding those of other nodes), then clear them; return how
        many waiters there were."""
        envelope = response(result, status, detailed_info)
        with self.registry.answering(key) as waiters:
            remote: dict[str, list[str]] = defaultdict(list)
            for entry in waiters:
                node, _, sid = entry.rpartition("|")
                if node == self.node:
                    self.deliver(request_type, key, envelope, sid)
                else:
                    remote[node].append(sid)
            for node, sids in remote.items():
                self.forward(keys.inbox(node), {"key": key, "type": request_type, "answer": envelope, "sids": sids})
                self.metrics.answers_forwarded.inc(len(sids))
        return len(waiters)

    def on_result(self, message: dict) -> None:
        """Handle one message: a processor's result, or an answer another node forwarded here."""
        key, request_type = message.get("key"), message.get("type")
        if not isinstance(key, str) or request_type not in REQUEST_TYPES:
            log.error("dropping malformed result %.200r", message)
            return
        if isinstance(message.get("sids"), list) and isinstance(message.get("answer"), dict):
            for sid in message["sids"]:
                self.deliver(request_type, key, message["answer"], str(sid))
            return
        status = int(message.get("status", 2))
        self.metrics.tasks_processed.labels(request_type, str(status)).inc()
        if message.get("deliveries", 1) > 1:
            self.metrics.tasks_redelivered.labels(request_type).inc()
        if message.get("dead_lettered"):
            self.metrics.tasks_dead_lettered.labels(request_type).inc()
        if status == 0:
            self.cache.put(key, message.get("result"), message.get("generation"))
        answered = self.answer(key, request_type, status, message.get("result"), message.get("detailed_info"))
        log.info("%s task %s status=%s answered %d client(s) in %.3fs", request_type, key, status, answered,
                 float(message.get("seconds") or 0))

    def consume(self, broker: Broker, queue: str) -> None:
        """Consume ``queue`` until :attr:`running` is cleared; survives lost connections."""
        while self.running:
            try:
                for delivery in broker.consume(queue, prefetch=64, idle=0.5):
                    if not self.running:
                        break
                    if delivery is None:
                        continue
                    try:
                        self.on_result(delivery.message)
                    except QlibServerError as exc:  # Redis away: hand the result back, retry later
                        log.error("cannot answer result now (%s); returning it to the queue", exc)
                        delivery.nack(requeue=True)
                        time.sleep(1.0)
                        continue
                    delivery.ack()
            except Exception as exc:  # the consumer must outlive any outage: without it nobody is answered
                self.metrics.reconnects.labels("rabbitmq").inc()
                log.error("consumer of %s: %r; retrying", queue, exc)
                time.sleep(1.0)

    def _recover_lost(self, now: float) -> int:
        """Serve again each request whose waiter entry has been gone from the registry for a while
        although this node never answered it (Redis lost it, or a forwarded answer was lost)."""
        entries = self.pending.older_than(keys.LOST_AFTER)
        if not entries:
            return 0
        try:
            present = self.registry.still_waiting([(key, waiter(self.node, sid)) for sid, key, _ in entries])
        except QlibServerError:
            return 0
        lost = 0
        for (sid, key, entry), there in zip(entries, present):
            if there:
                entry.missing_since = None
            elif entry.missing_since is None:
                entry.missing_since = now
            elif now - entry.missing_since >= keys.LOST_AFTER:
                entry.missing_since = None
                lost += 1
                self.metrics.requests_recovered.labels(entry.request.type).inc()
                log.warning("%s request of %s key=%s lost its waiter entry; serving it again",
                            entry.request.type, sid, key)
                for _ in range(entry.count):
                    self.resubmit(sid, entry.request)
        return lost

    def sweep(self) -> int:
        """Recover lost requests, and answer with an error each one older than ``request_timeout``."""
        now = time.monotonic()
        self._recover_lost(now)
        count = 0
        for sid, key, entry in self.pending.older_than(self.request_timeout):
            if self.pending.done(sid, key, every=True) is None:
                continue
            try:
                self.registry.discard(key, waiter(self.node, sid), entry.count)
            except QlibServerError:
                pass  # the waiting list expires by itself
            info = f"no answer within {self.request_timeout:g}s (request_timeout); the request was dropped, retry it"
            for answer in entry.answers(response(None, 2, info)):
                count += 1
                self.metrics.request_timeouts.labels(entry.request.type).inc()
                self.emit(f"{entry.request.type}_response", answer, sid)
        return count
