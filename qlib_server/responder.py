"""RequestResponder: results from the message queue → every waiting session id → cleared.

The responder takes the waiters of a key, emits the answer to each, clears them, and only then
acknowledges the result message, so a responder that dies midway leaves the result to another one.
It also answers, with an error, any request of this handler that has waited ``request_timeout``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

from .broker import Broker
from .cache import ResultCache
from .errors import QlibServerError
from .metrics import Metrics
from .protocol import REQUEST_TYPES, response
from .registry import SessionRegistry

log = logging.getLogger(__name__)


class Pending:
    """The requests this handler still owes an answer: session id → {key: (type, started)}."""

    def __init__(self) -> None:
        self._by_sid: dict[str, dict[str, tuple[str, float]]] = {}
        self._lock = threading.Lock()

    def reserve(self, sid: str, key: str, request_type: str, started: float, limit: int) -> Optional[bool]:
        """Add the request unless ``sid`` already has ``limit`` keys pending, checked and added under one
        lock. None when refused, else whether the key is new for ``sid``."""
        with self._lock:
            waiting = self._by_sid.setdefault(sid, {})
            if len(waiting) >= limit:
                if not waiting:
                    del self._by_sid[sid]
                return None
            fresh = key not in waiting
            waiting[key] = (request_type, started)
            return fresh

    def done(self, sid: str, key: str) -> Optional[tuple[str, float]]:
        with self._lock:
            waiting = self._by_sid.get(sid)
            entry = waiting.pop(key, None) if waiting else None
            if waiting is not None and not waiting:
                del self._by_sid[sid]
            return entry

    def count(self, sid: str) -> int:
        """How many keys ``sid`` waits for."""
        return len(self._by_sid.get(sid, ()))

    def drop(self, sid: str) -> list[str]:
        with self._lock:
            return list(self._by_sid.pop(sid, {}))

    def expired(self, older_than: float) -> list[tuple[str, str, str]]:
        limit = time.monotonic() - older_than
        with self._lock:
            return [(sid, key, t) for sid, w in self._by_sid.items() for key, (t, s) in w.items() if s < limit]

    def __len__(self) -> int:
        return sum(len(w) for w in self._by_sid.values())


class RequestResponder:
    """Answers every waiter of a finished task, and times out requests left unanswered."""

    def __init__(self, registry: SessionRegistry, metrics: Metrics, emit: Callable[[str, dict, str], None],
                 pending: Pending, request_timeout: float, cache: ResultCache):
        self.registry = registry
        self.metrics = metrics
        self.emit = emit
        self.pending = pending
        self.request_timeout = request_timeout
        self.cache = cache
        self.running = True

    def answer(self, key: str, request_type: str, status: int, result, detailed_info: Optional[str]) -> int:
        """Emit one answer to every waiter of ``key``, then clear them; return how many were answered."""
        envelope = response(result, status, detailed_info)
        event = f"{request_type}_response"
        with self.registry.answering(key) as sids:
            for sid in sids:
                self.emit(event, envelope, sid)
                entry = self.pending.done(sid, key)
                latency = time.monotonic() - entry[1] if entry else None
                if latency is not None:
                    self.metrics.latency.labels(request_type).observe(latency)
                log.info("%s request of %s key=%s status=%s %s", request_type, sid, key, status,
                         f"answered in {latency * 1000:.1f} ms" if latency is not None else "answered (another handler's)")
            self.metrics.responses.labels(request_type, str(status)).inc(len(sids))
        return len(sids)

    def on_result(self, message: dict) -> None:
        """Handle one message from the message queue."""
        key, request_type = message.get("key"), message.get("type")
        if not isinstance(key, str) or request_type not in REQUEST_TYPES:
            log.error("dropping malformed result %.200r", message)
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
        """Consume results until :attr:`running` is cleared; survives lost connections."""
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
                log.error("result consumer: %r; retrying", exc)
                time.sleep(1.0)

    def forget_answered(self, older_than: float = 2.0) -> int:
        """Drop the requests of this handler that another handler has answered (they are no longer
        in the registry), so they count neither against the in-flight limit nor in a drain."""
        entries = self.pending.expired(older_than)
        if not entries:
            return 0
        try:
            waiting = self.registry.still_waiting([(key, sid) for sid, key, _ in entries])
        except QlibServerError:
            return 0
        gone = [(sid, key) for (sid, key, _), w in zip(entries, waiting) if not w]
        for sid, key in gone:
            self.pending.done(sid, key)
        return len(gone)

    def sweep(self) -> int:
        """Answer with an error each request of this handler older than ``request_timeout``."""
        self.forget_answered()
        count = 0
        for sid, key, request_type in self.pending.expired(self.request_timeout):
            self.pending.done(sid, key)
            try:
                still_waiting = self.registry.discard(key, sid)
            except QlibServerError:
                still_waiting = True
            if still_waiting:
                count += 1
                self.metrics.request_timeouts.labels(request_type).inc()
                self.emit(f"{request_type}_response", response(
                    None, 2, f"no answer within {self.request_timeout:g}s; the request was dropped, retry it"), sid)
        return count
