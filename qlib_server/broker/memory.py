"""In-memory transport for the embedded mode and for tests: RabbitMQ's semantics, no RabbitMQ.

Every message is encoded on publish and decoded on delivery, exactly as on the wire. Each
:meth:`MemoryBroker.connect` handle is a "connection": its unacknowledged deliveries return to their
queue when it closes, with their delivery count raised; a task queue dead-letters a message once it
has been delivered ``max_deliveries`` times, like a RabbitMQ quorum queue with a delivery limit.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import deque
from collections.abc import Iterator
from itertools import count
from typing import Optional

from ..errors import BrokerError
from .base import Broker, Delivery, dead_letter_queue, decode, encode, light_queue


class _Hub:
    """The queues, shared by every connection of one in-memory broker."""

    def __init__(self) -> None:
        self.queues: dict[str, deque] = {}
        self.consumers: dict[str, int] = {}
        self.limits: dict[str, tuple[int, str]] = {}  # queue -> (max deliveries, dead-letter queue)
        self.ready = threading.Condition()

    def declare(self, name: str, max_deliveries: int = 0, dead_letter: str = "") -> None:
        with self.ready:
            self.queues.setdefault(name, deque())
            if max_deliveries:
                self.limits[name] = (max_deliveries, dead_letter)

    def put(self, queue: str, body: bytes, deliveries: int = 0, front: bool = False) -> None:
        with self.ready:
            if queue not in self.queues:
                raise BrokerError(f"queue {queue!r} does not exist")
            limit, dead = self.limits.get(queue, (0, ""))
            if limit and deliveries >= limit:
                queue, deliveries = dead, 0
            (self.queues[queue].appendleft if front else self.queues[queue].append)((body, deliveries))
            self.ready.notify_all()

    def depth(self, queue: str) -> int:
        return len(self.queues.get(queue, ()))


class MemoryBroker(Broker):
    """One connection to an in-memory broker; :meth:`connect` opens another on the same queues."""

    def __init__(self, hub: Optional[_Hub] = None):
        self.hub = hub or _Hub()
        self._tags = count(1)
        self._unacked: dict[int, tuple[str, bytes, int]] = {}
        self._closed = False
        self._cancelled = False

    def connect(self) -> MemoryBroker:
        return MemoryBroker(self.hub)

    def declare(self, task_queue: str, message_queue: str, max_deliveries: int) -> None:
        dead = dead_letter_queue(task_queue)
        self.hub.declare(dead)
        self.hub.declare(task_queue, max_deliveries, dead)
        self.hub.declare(light_queue(task_queue), max_deliveries, dead)
        self.hub.declare(message_queue)

    def declare_inbox(self, queue: str, expires: float) -> None:
        self.hub.declare(queue)

    def publish(self, queue: str, message: dict) -> None:
        self.hub.put(queue, encode(message))

    def depth(self, queue: str) -> int:
        return self.hub.depth(queue)

    def consumers(self, queue: str) -> int:
        return self.hub.consumers.get(queue, 0)

    def _settle(self, tag: int, requeue: Optional[bool]) -> None:
        with self.hub.ready:
            entry = self._unacked.pop(tag, None)
            self.hub.ready.notify_all()
        if entry is None or requeue is None:
            return  # acknowledged, or already returned when this connection closed
        queue, body, deliveries = entry
        if requeue:
            self.hub.put(queue, body, deliveries + 1, front=True)
        else:
            limit, dead = self.hub.limits.get(queue, (0, ""))
            if dead:
                self.hub.put(dead, body)

    def consume(self, queue: str, prefetch: int, idle: float = 1.0) -> Iterator[Optional[Delivery]]:
        if queue not in self.hub.queues:
            raise BrokerError(f"queue {queue!r} does not exist")
        with self.hub.ready:
            self.hub.consumers[queue] = self.hub.consumers.get(queue, 0) + 1
        try:
            yield from self._deliveries(queue, prefetch, idle)
        finally:
            with self.hub.ready:
                self.hub.consumers[queue] -= 1

    def cancel(self) -> None:
        with self.hub.ready:
            self._cancelled = True
            self.hub.ready.notify_all()

    def _deliveries(self, queue: str, prefetch: int, idle: float) -> Iterator[Optional[Delivery]]:
        while not self._closed:
            with self.hub.ready:
                deadline = time.monotonic() + idle
                while not self._closed and (self._cancelled or not self.hub.queues[queue]
                                            or len(self._unacked) >= prefetch):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self.hub.ready.wait(remaining)
                if self._closed or self._cancelled or not self.hub.queues[queue] or len(self._unacked) >= prefetch:
                    item = None
                else:
                    body, deliveries = self.hub.queues[queue].popleft()
                    tag = next(self._tags)
                    self._unacked[tag] = (queue, body, deliveries)
                    item = (tag, body, deliveries)
            if item is None:
                yield None
                continue
            tag, body, deliveries = item
            try:
                message = decode(body)
            except BrokerError as exc:
                message = {"undecodable": str(exc)}
            yield Delivery(message, deliveries, functools.partial(self._settle, tag, None),
                           functools.partial(self._settle, tag))

    def close(self) -> None:
        """Close this connection: its unacknowledged deliveries return to their queues."""
        with self.hub.ready:
            self._closed = True
            returned, self._unacked = self._unacked, {}
            self.hub.ready.notify_all()
        for queue, body, deliveries in returned.values():
            self.hub.put(queue, body, deliveries + 1, front=True)
