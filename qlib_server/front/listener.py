"""RequestListener: a client's request event → checked request → waiting list → task queue.

Only the first waiter of a request key publishes a task; every other identical request, from this
handler or another, just joins the waiting list. A request that cannot be queued is answered at once
with an error.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from ..broker import Broker
from ..broker.base import light_queue
from ..errors import QlibServerError, RequestError
from ..metrics import Metrics
from ..protocol import Request, RequestParser, request_id, response, retry_later, with_id
from ..state.cache import MISS, ResultCache
from ..state.registry import SessionRegistry
from .responder import Pending, RequestResponder, bound, waiter

log = logging.getLogger(__name__)
Emit = Callable[[str, dict, str], None]


class RequestListener:
    """Handles ``<type>_request`` events of one request handler."""

    def __init__(self, parser: RequestParser, registry: SessionRegistry, broker: Broker, task_queue: str,
                 responder: RequestResponder, pending: Pending, metrics: Metrics, emit: Emit,
                 cache: ResultCache, max_inflight: int = 8):
        self.parser = parser
        self.registry = registry
        self.broker = broker
        self.task_queue = task_queue
        self.responder = responder
        self.pending = pending
        self.metrics = metrics
        self.emit = emit
        self.cache = cache
        self.max_inflight = max_inflight
        self.accepting = True
        self.joining = Joining()
        responder.resubmit = self.serve
        self._requests, self._cache_hits = bound(metrics.requests), bound(metrics.cache_hits)

    def on_request(self, request_type: str, sid: str, payload: Any) -> None:
        """Handle one request event from session ``sid``; every path ends in a queued task or a response."""
        self._requests(request_type).inc()
        rid = request_id(payload)
        if not self.accepting:
            log.info("refused %s request from %s: the server is shutting down", request_type, sid)
            self.metrics.responses.labels(request_type, "1").inc()
            self.emit(f"{request_type}_response", with_id(retry_later(1), rid), sid)
            return
        try:
            request = self.parser.parse(request_type, payload)
            if self.pending.reserve(sid, request, time.monotonic(), self.max_inflight, rid) is None:
                raise RequestError(f"too many requests in flight on this connection (limit {self.max_inflight}, "
                                   "the server's max_inflight_per_client)")
        except RequestError as exc:
            log.info("refused %s request from %s: %s", request_type, sid, exc)
            self.metrics.responses.labels(request_type, str(exc.status)).inc()
            self.emit(f"{request_type}_response", with_id(response(None, exc.status, str(exc)), rid), sid)
            return
        except Exception:  # a bug in checking must not leave the client waiting
            log.exception("could not check a %s request from %s", request_type, sid)
            self.metrics.responses.labels(request_type, "2").inc()
            refusal = response(None, 2, "the server could not check this request")
            self.emit(f"{request_type}_response", with_id(refusal, rid), sid)
            return
        self.serve(sid, request)

    def serve(self, sid: str, request: Request) -> None:
        """Answer a pending request from the result cache, or join it to its task (publishing the task
        when it is the first waiter)."""
        if self.joining.join(request.key, sid):
            return  # an identical request of this handler is on its way into the registry: this one goes with it
        cached = self.cache.get(request.key, request.type)
        if cached is not MISS:
            self._cache_hits(request.type).inc()
            self.responder.deliver(request.type, request.key, response(cached, 0, None), sid)
            return
        if self.joining.lead(request.key, sid):
            self._enqueue(request)

    def _enqueue(self, request: Request) -> None:
        """Add this handler's waiters of ``request`` to the registry, in batches: those that joined
        while a batch was being added go in the next one. The batch that finds no waiter before it
        publishes the task."""
        node, sids = self.responder.node, []
        try:
            while sids := self.joining.take(request.key):
                first = self.registry.add(request.key, *(waiter(node, sid) for sid in sids))
                if first:
                    self._publish(request)
                self.metrics.dedup_hits.labels(request.type).inc(len(sids) - first)
        except Exception as exc:  # the batch must not be stranded: every request in it is answered
            log.error("cannot queue %s task %s: %s", request.type, request.key, exc,
                      exc_info=not isinstance(exc, QlibServerError))
            self._refuse(request, sids + self.joining.drain(request.key), exc)

    def _publish(self, request: Request) -> None:
        cached = self.cache.get(request.key, request.type)
        if cached is not MISS:  # answered and cleared between our cache look-up and our add
            self.responder.answer(request.key, request.type, 0, cached, None)
            return
        lane = light_queue(self.task_queue) if request.light else self.task_queue
        self.broker.publish(lane, request.task(self.cache.generation()))
        self.metrics.tasks_published.labels(request.type).inc()
        log.debug("published %s task %s", request.type, request.key)

    def _refuse(self, request: Request, sids: list[str], exc: Exception) -> None:
        """The task will not run: answer every waiter of the key, and ``sids`` directly (Redis may be away)."""
        reason = exc if isinstance(exc, QlibServerError) else "internal error"
        info = f"the server cannot queue this request now: {reason}"
        try:
            self.responder.answer(request.key, request.type, 2, None, info)
        except QlibServerError:
            pass
        for sid in sids:  # those the answer above did not reach (an answer is never sent twice)
            self.responder.deliver(request.type, request.key, response(None, 2, info), sid)


class Joining:
    """Sessions of this handler on their way into the registry, per request key. While one green
    thread adds a key's waiters, identical requests join its next batch: a burst of identical
    requests takes the key's Redis lock a few times, not once per request."""

    def __init__(self):
        self.lock = threading.Lock()
        self.batches: dict[str, list[str]] = {}

    def join(self, key: str, sid: str) -> bool:
        """Add ``sid`` to the batch of ``key`` if one is being added; False when there is none."""
        with self.lock:
            batch = self.batches.get(key)
            if batch is not None:
                batch.append(sid)
            return batch is not None

    def lead(self, key: str, sid: str) -> bool:
        """Join the batch of ``key``, or start it: True when the caller starts it and so adds it
        (:meth:`take` until it is empty)."""
        with self.lock:
            batch = self.batches.get(key)
            if batch is not None:
                batch.append(sid)
                return False
            self.batches[key] = [sid]
            return True

    def take(self, key: str) -> list[str]:
        """The sessions that joined ``key`` since the last take; [] ends the batch."""
        with self.lock:
            batch = self.batches[key]
            if not batch:
                del self.batches[key]
            taken = batch[:]
            batch.clear()
            return taken

    def drain(self, key: str) -> list[str]:
        """End the batch of ``key``, returning the sessions not taken yet."""
        with self.lock:
            return self.batches.pop(key, [])
