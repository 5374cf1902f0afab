"""RabbitMQ transport; the only module that imports pika.

One :class:`RabbitMQBroker` owns one connection and is used from one thread (publishing is
serialised by a lock, so green threads may share it). Lost connections are re-opened with backoff;
pika's exceptions never leave this module, they become :class:`~qlib_server.errors.BrokerError`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Optional

import pika
import pika.exceptions as pe

from ..errors import BrokerError, ConnectionLost
from .base import Broker, Delivery, dead_letter_queue, decode, encode, light_queue

log = logging.getLogger(__name__)
# pika raises ValueError ("getpeername() failed") for a connection reset while it opens
_TRANSPORT_ERRORS = (pe.AMQPConnectionError, pe.AMQPChannelError, pe.StreamLostError, OSError, AssertionError,
                     ValueError)
_PERSISTENT = pika.BasicProperties(delivery_mode=2, content_type="application/json")


class RabbitMQBroker(Broker):
    """Broker on a pika ``BlockingConnection``, reconnecting with backoff when the connection drops."""

    def __init__(self, url: str, *, heartbeat: Optional[int] = 30, confirm: bool = True, retries: int = 8,
                 on_reconnect=None):
        self.params = pika.URLParameters(url)
        self.params.heartbeat = heartbeat
        self.params.blocked_connection_timeout = 60
        self.params.connection_attempts = 1
        self.confirm = confirm
        self.retries = retries
        self.on_reconnect = on_reconnect
        self._connection: Optional[pika.BlockingConnection] = None
        self._channel = None
        self._lock = threading.RLock()
        self._declared: Optional[tuple] = None
        self._inboxes: dict[str, float] = {}

    # -- connection management -------------------------------------------------------------
    def _open(self):
        if self._channel is not None and self._channel.is_open:
            return self._channel
        self._drop()
        delay = 0.1
        for attempt in range(self.retries + 1):
            try:
                self._connection = pika.BlockingConnection(self.params)
                channel = self._connection.channel()
                if self.confirm:
                    channel.confirm_delivery()
                self._channel = channel
                if self._declared:
                    self._declare(channel, *self._declared)
                for queue, expires in self._inboxes.items():
                    self._declare_inbox(channel, queue, expires)
                if attempt and self.on_reconnect:
                    self.on_reconnect()
                return channel
            except _TRANSPORT_ERRORS as exc:
                self._drop()
                if attempt == self.retries:
                    raise ConnectionLost(f"rabbitmq at {self.params.host}:{self.params.port}: {exc!r}") from exc
                log.warning("rabbitmq unreachable (%r), retrying in %.1fs", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _drop(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except Exception:  # already broken; nothing to release
                pass

    def close(self) -> None:
        with self._lock:
            self._drop()

    def ping(self) -> bool:
        with self._lock:
            try:
                self._open().connection.process_data_events(0)
                return True
            except (BrokerError, *_TRANSPORT_ERRORS):
                self._drop()
                return False

    def _inspect(self, queue: str):
        """The queue's declare-ok (message and consumer counts), or None when it cannot be told."""
        with self._lock:
            try:
                return self._open().queue_declare(queue, passive=True).method
            except (pe.ChannelClosedByBroker, BrokerError, *_TRANSPORT_ERRORS):
                self._drop()
                return None

    def consumers(self, queue: str) -> int:
        method = self._inspect(queue)
        return method.consumer_count if method is not None else 0

    def depth(self, queue: str) -> Optional[int]:
        method = self._inspect(queue)
        return method.message_count if method is not None else None

    # -- broker interface -------------------------------------------------------------------
    def _declare(self, channel, task_queue: str, message_queue: str, max_deliveries: int) -> None:
        dead = dead_letter_queue(task_queue)
        channel.queue_declare(dead, durable=True)
        for lane in (task_queue, light_queue(task_queue)):
            channel.queue_declare(lane, durable=True, arguments={
                "x-queue-type": "quorum",
                "x-delivery-limit": max_deliveries - 1,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": dead,
            })
        channel.queue_declare(message_queue, durable=True)

    def declare(self, task_queue: str, message_queue: str, max_deliveries: int) -> None:
        with self._lock:
            self._declared = (task_queue, message_queue, max_deliveries)
            try:
                self._declare(self._open(), task_queue, message_queue, max_deliveries)
            except pe.ChannelClosedByBroker as exc:
                self._drop()
                raise BrokerError(f"cannot declare queues {task_queue!r}/{message_queue!r}: {exc.reply_text}") from None

    def _declare_inbox(self, channel, queue: str, expires: float) -> None:
        channel.queue_declare(queue, durable=False, arguments={"x-expires": int(expires * 1000)})

    def declare_inbox(self, queue: str, expires: float) -> None:
        with self._lock:
            self._inboxes[queue] = expires
            try:
                self._declare_inbox(self._open(), queue, expires)
            except pe.ChannelClosedByBroker as exc:
                self._drop()
                raise BrokerError(f"cannot declare queue {queue!r}: {exc.reply_text}") from None

    def publish(self, queue: str, message: dict) -> None:
        body = encode(message)
        with self._lock:
            for attempt in range(2):
                channel = self._open()
                try:
                    channel.basic_publish("", queue, body, _PERSISTENT, mandatory=False)
                    return
                except (pe.UnroutableError, pe.NackError) as exc:
                    raise BrokerError(f"rabbitmq refused a message for {queue!r}: {exc}") from None
                except _TRANSPORT_ERRORS as exc:
                    self._drop()
                    if attempt:
                        raise ConnectionLost(f"publish to {queue!r} failed: {exc!r}") from exc

    def consume(self, queue: str, prefetch: int, idle: float = 1.0) -> Iterator[Optional[Delivery]]:
        while True:
            try:
                with self._lock:
                    channel = self._open()
                    channel.basic_qos(prefetch_count=prefetch)
                for method, props, body in channel.consume(queue, inactivity_timeout=idle):
                    if method is None:
                        yield None
                        continue
                    yield self._delivery(channel, method, props, body)
            except pe.ChannelClosedByBroker as exc:
                if exc.reply_code == 404:
                    raise BrokerError(f"queue {queue!r} does not exist") from None
                log.warning("rabbitmq closed the channel (%s); reconsuming", exc)
                self._drop()
            except _TRANSPORT_ERRORS as exc:
                log.warning("rabbitmq connection lost while consuming %r (%r); reconnecting", queue, exc)
                self._drop()
                yield None

    def cancel(self) -> None:
        with self._lock:
            if self._channel is not None and self._channel.is_open:
                try:
                    self._channel.cancel()  # the consume() generator's consumer
                except _TRANSPORT_ERRORS:
                    self._drop()

    def _delivery(self, channel, method, props, body) -> Delivery:
        tag = method.delivery_tag
        headers = props.headers or {}
        count = int(headers.get("x-delivery-count", 1 if method.redelivered else 0))

        def ack() -> None:
            try:
                channel.basic_ack(tag)
            except _TRANSPORT_ERRORS as exc:
                raise ConnectionLost(f"ack failed, the message returns to its queue: {exc!r}") from exc

        def nack(requeue: bool) -> None:
            try:
                channel.basic_nack(tag, requeue=requeue)
            except _TRANSPORT_ERRORS as exc:
                raise ConnectionLost(f"nack failed: {exc!r}") from exc

        try:
            message = decode(body)
        except BrokerError as exc:
            message = {"undecodable": str(exc)}
        return Delivery(message, count, ack, nack)
