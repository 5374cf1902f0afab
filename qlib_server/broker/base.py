"""The broker interface every transport implements, and the message encoding they all share.

Messages are JSON objects. A consumer receives :class:`Delivery` objects and acknowledges each one
only after its work is done; an unacknowledged delivery goes back to the queue for another consumer.
A task delivered more than ``max_deliveries`` times is dead-lettered instead.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..errors import BrokerError


def encode(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":"), default=str).encode()


def decode(body: bytes) -> dict:
    try:
        message = json.loads(body)
    except ValueError as exc:
        raise BrokerError(f"undecodable message: {exc}") from None
    if not isinstance(message, dict):
        raise BrokerError("a message must be a JSON object")
    return message


@dataclass
class Delivery:
    """One message handed to a consumer; call :meth:`ack` once its work is done."""

    message: dict
    delivery_count: int = 0  # how many earlier deliveries this message has had
    _ack: Callable[[], None] = field(default=lambda: None, repr=False)
    _nack: Callable[[bool], None] = field(default=lambda requeue: None, repr=False)

    @property
    def redelivered(self) -> bool:
        return self.delivery_count > 0

    def ack(self) -> None:
        self._ack()

    def nack(self, requeue: bool = True) -> None:
        self._nack(requeue)


class Broker(ABC):
    """Publish messages to named queues and consume them with manual acknowledgement."""

    @abstractmethod
    def declare(self, task_queue: str, message_queue: str, max_deliveries: int) -> None:
        """Create the queues (idempotent): both task lanes with a delivery limit, their dead-letter
        queue, and the message queue."""

    @abstractmethod
    def declare_inbox(self, queue: str, expires: float) -> None:
        """Create (idempotent, and again after a reconnection) a transient queue of one consumer that
        the broker deletes once it has been unused for ``expires`` seconds."""

    @abstractmethod
    def publish(self, queue: str, message: dict) -> None:
        """Publish one persistent message; raise :class:`~qlib_server.errors.BrokerError` on failure."""

    @abstractmethod
    def consume(self, queue: str, prefetch: int, idle: float = 1.0) -> Iterator[Optional[Delivery]]:
        """Yield deliveries from ``queue``; yield None after ``idle`` seconds without one."""

    @abstractmethod
    def cancel(self) -> None:
        """Stop receiving new deliveries on this connection; those in hand can still be acked."""

    @abstractmethod
    def close(self) -> None:
        """Release the connection; unacknowledged deliveries return to their queue."""

    def ping(self) -> bool:
        """Whether the broker answers (and keep an idle connection alive)."""
        return True

    def consumers(self, queue: str) -> int:
        """How many consumers ``queue`` has now (0 when it cannot be told)."""
        return 0

    def depth(self, queue: str) -> Optional[int]:
        """How many messages wait in ``queue`` now, not counting those delivered and unacknowledged
        (None when it cannot be told)."""
        return None


def dead_letter_queue(task_queue: str) -> str:
    """Where tasks of both lanes go after ``max_deliveries`` deliveries."""
    return f"{task_queue}.dead"


def light_queue(task_queue: str) -> str:
    """The lane of millisecond tasks (calendars, plain instrument lists), so they never wait behind
    a long feature computation."""
    return f"{task_queue}.light"
