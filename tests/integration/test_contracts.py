"""Contracts: one set of tests run against both implementations of each interface.

Broker: :class:`MemoryBroker` (embedded mode) and :class:`RabbitMQBroker`. Session registry: on
fakeredis (embedded mode) and on a real Redis. Whatever passes for one must pass for the other, so
the embedded mode behaves like a deployment.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Callable, Optional

import fakeredis
import pika
import pytest
import redis

from qlib_server.broker import Broker, Delivery
from qlib_server.broker.base import dead_letter_queue, light_queue
from qlib_server.broker.memory import MemoryBroker
from qlib_server.state import keys
from qlib_server.state.registry import SessionRegistry

pytestmark = pytest.mark.integration
IDLE = 0.2  # seconds a consumer waits before yielding None


class BrokerUnderTest:
    """Connections to one broker, fresh queue names, and clean-up of both."""

    def __init__(self, connect: Callable[[], Broker], max_deliveries: int = 3):
        self.connect_raw = connect
        suffix = uuid.uuid4().hex[:8]
        self.task_queue, self.message_queue = f"contract-tasks-{suffix}", f"contract-results-{suffix}"
        self.connections: list[Broker] = []
        self.max_deliveries = max_deliveries
        self.publisher = self.connect()
        self.publisher.declare(self.task_queue, self.message_queue, max_deliveries)

    @property
    def queues(self) -> list[str]:
        return [self.task_queue, light_queue(self.task_queue), dead_letter_queue(self.task_queue), self.message_queue]

    def lane(self, name: str) -> str:
        return {"task": self.task_queue, "light": light_queue(self.task_queue)}[name]

    def connect(self) -> Broker:
        connection = self.connect_raw()
        self.connections.append(connection)
        return connection

    def close(self) -> None:
        for connection in self.connections:
            connection.close()


def next_delivery(consumer: Iterator[Optional[Delivery]], attempts: int = 100) -> Delivery:
    """The next delivery, skipping idle ``None``s (at most ``attempts`` idle periods)."""
    for _ in range(attempts):
        delivery = next(consumer)
        if delivery is not None:
            return delivery
    raise AssertionError(f"no delivery after {attempts} idle periods")


def nothing_delivered(consumer: Iterator[Optional[Delivery]], idle_periods: int = 3) -> bool:
    """Whether the consumer stays idle for ``idle_periods`` periods in a row."""
    return all(next(consumer) is None for _ in range(idle_periods))


def consume(broker: BrokerUnderTest, queue: str, prefetch: int = 10) -> Iterator[Optional[Delivery]]:
    """A consumer of ``queue`` on a connection of its own."""
    return broker.connect().consume(queue, prefetch=prefetch, idle=IDLE)


def _delete_rabbitmq_queues(url: str, queues: list[str]) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        for queue in queues:
            channel.queue_delete(queue)
    finally:
        connection.close()


@pytest.fixture(params=["memory", "rabbitmq"])
def broker(request) -> Iterator[BrokerUnderTest]:
    if request.param == "memory":
        hub = MemoryBroker()
        under_test = BrokerUnderTest(hub.connect)
        yield under_test
        under_test.close()
        return
    from qlib_server.broker.rabbitmq import RabbitMQBroker

    url = request.getfixturevalue("services").amqp_url()
    under_test = BrokerUnderTest(lambda: RabbitMQBroker(url, retries=2))
    try:
        yield under_test
    finally:
        under_test.close()
        _delete_rabbitmq_queues(url, under_test.queues)


# --- broker ------------------------------------------------------------------------------------------


def test_a_published_message_is_consumed_as_the_same_json(broker):
    message = {"key": "a" * 40, "type": "feature", "status": 0, "result": {"SH600000": [["2019-01-02", None]]},
               "numbers": [1, -2, 3.25, 1e-9], "flag": True, "text": "caf\u00e9 \u6570\u636e"}
    broker.publisher.publish(broker.message_queue, message)
    delivery = next_delivery(consume(broker, broker.message_queue))
    assert delivery.message == message
    assert delivery.delivery_count == 0 and not delivery.redelivered
    delivery.ack()


@pytest.mark.parametrize("lane", ["task", "light"])
def test_an_acknowledged_message_is_gone(broker, lane):
    broker.publisher.publish(broker.lane(lane), {"n": 1})
    first = broker.connect()
    next_delivery(first.consume(broker.lane(lane), prefetch=1, idle=IDLE)).ack()
    first.close()  # nothing unacknowledged to return
    assert nothing_delivered(consume(broker, broker.lane(lane)))


@pytest.mark.parametrize("lane", ["task", "light"])
def test_unacknowledged_deliveries_return_when_their_connection_closes(broker, lane):
    queue = broker.lane(lane)
    for n in range(2):
        broker.publisher.publish(queue, {"n": n})
    crashed = broker.connect()
    consumer = crashed.consume(queue, prefetch=2, idle=IDLE)
    held = [next_delivery(consumer), next_delivery(consumer)]
    assert [d.delivery_count for d in held] == [0, 0]
    crashed.close()

    again = consume(broker, queue)
    returned = [next_delivery(again), next_delivery(again)]
    assert sorted(d.message["n"] for d in returned) == [0, 1]
    assert [d.delivery_count for d in returned] == [1, 1]
    assert all(d.redelivered for d in returned)
    for d in returned:
        d.ack()


def test_a_message_queue_delivery_returns_when_its_connection_closes(broker):
    broker.publisher.publish(broker.message_queue, {"key": "k"})
    crashed = broker.connect()
    next_delivery(crashed.consume(broker.message_queue, prefetch=1, idle=IDLE))
    crashed.close()
    returned = next_delivery(consume(broker, broker.message_queue))
    assert returned.message == {"key": "k"} and returned.redelivered
    returned.ack()


@pytest.mark.parametrize("lane", ["task", "light"])
def test_a_nack_with_requeue_redelivers(broker, lane):
    broker.publisher.publish(broker.lane(lane), {"n": 7})
    consumer = consume(broker, broker.lane(lane))
    next_delivery(consumer).nack(requeue=True)
    again = next_delivery(consumer)
    assert again.message == {"n": 7}
    assert again.delivery_count == 1 and again.redelivered
    again.ack()


@pytest.mark.parametrize("lane", ["task", "light"])
def test_a_nack_without_requeue_dead_letters_the_task(broker, lane):
    broker.publisher.publish(broker.lane(lane), {"key": "k", "lane": lane})
    next_delivery(consume(broker, broker.lane(lane))).nack(requeue=False)
    dead = next_delivery(consume(broker, dead_letter_queue(broker.task_queue)))
    assert dead.message == {"key": "k", "lane": lane}
    dead.ack()
    assert nothing_delivered(consume(broker, broker.lane(lane)), 1)


@pytest.mark.parametrize("failure", ["connection closed", "nack with requeue"])
@pytest.mark.parametrize("lane", ["task", "light"])
def test_a_task_delivered_max_deliveries_times_is_dead_lettered(broker, lane, failure):
    queue = broker.lane(lane)
    broker.publisher.publish(queue, {"key": "poison", "lane": lane})
    counts = []
    if failure == "connection closed":  # a worker crashing with the task in hand, again and again
        for _ in range(broker.max_deliveries):
            worker = broker.connect()
            counts.append(next_delivery(worker.consume(queue, prefetch=1, idle=IDLE)).delivery_count)
            worker.close()
    else:  # one worker handing the task back each time (RabbitMQ redelivers at once to the same consumer)
        consumer = consume(broker, queue, prefetch=1)
        for _ in range(broker.max_deliveries):
            delivery = next_delivery(consumer)
            counts.append(delivery.delivery_count)
            delivery.nack(requeue=True)
    assert counts == list(range(broker.max_deliveries))
    assert nothing_delivered(consume(broker, queue), 2), f"a {broker.max_deliveries + 1}th delivery happened"
    dead = next_delivery(consume(broker, dead_letter_queue(broker.task_queue)))
    assert dead.message == {"key": "poison", "lane": lane}
    dead.ack()


def test_prefetch_holds_back_the_next_message_until_the_first_is_acknowledged(broker):
    for n in range(3):
        broker.publisher.publish(broker.task_queue, {"n": n})
    consumer = consume(broker, broker.task_queue, prefetch=1)
    first = next_delivery(consumer)
    assert nothing_delivered(consumer, 2), "a second message came before the first was acknowledged"
    first.ack()
    second = next_delivery(consumer)
    assert nothing_delivered(consumer, 1)
    second.ack()
    third = next_delivery(consumer)
    assert sorted(d.message["n"] for d in (first, second, third)) == [0, 1, 2]
    third.ack()


def test_prefetch_of_two_delivers_two_at_once(broker):
    for n in range(3):
        broker.publisher.publish(broker.task_queue, {"n": n})
    consumer = consume(broker, broker.task_queue, prefetch=2)
    held = [next_delivery(consumer), next_delivery(consumer)]
    assert nothing_delivered(consumer, 1)
    for d in held:
        d.ack()
    next_delivery(consumer).ack()


def test_a_consumer_yields_none_while_its_queue_is_idle(broker):
    consumer = consume(broker, broker.task_queue)
    assert next(consumer) is None
    assert next(consumer) is None
    broker.publisher.publish(broker.task_queue, {"n": 1})
    assert next_delivery(consumer).message == {"n": 1}


# --- session registry ----------------------------------------------------------------------------------

TTL = 30


@pytest.fixture(params=["fakeredis", "redis"])
def registry(request) -> Iterator[SessionRegistry]:
    if request.param == "fakeredis":
        client = fakeredis.FakeRedis()
    else:
        services = request.getfixturevalue("services")
        client = redis.Redis(host=services.redis_host, port=services.redis_port, db=services.fresh_db())
    yield SessionRegistry(client, TTL)
    client.flushdb()
    client.close()


def key() -> str:
    return uuid.uuid4().hex


def test_only_the_first_waiter_of_a_key_is_told_it_is_first(registry):
    k, other = key(), key()
    assert registry.add(k, "sid-a") is True
    assert registry.add(k, "sid-b") is False
    assert registry.add(k, "sid-c") is False
    assert registry.add(other, "sid-a") is True
    assert registry.waiting(k) == ["sid-a", "sid-b", "sid-c"]


def test_answering_yields_every_waiter_in_order_and_clears_them(registry):
    k = key()
    for sid in ("s1", "s2", "s3"):
        registry.add(k, sid)
    with registry.answering(k) as sids:
        assert sids == ["s1", "s2", "s3"]
    assert registry.waiting(k) == []
    assert registry.add(k, "s4") is True, "after an answer the next waiter starts a new task"


def test_answering_a_key_nobody_waits_for_yields_nothing(registry):
    with registry.answering(key()) as sids:
        assert sids == []


def test_a_failure_while_answering_keeps_the_waiters(registry):
    k = key()
    for sid in ("s1", "s2"):
        registry.add(k, sid)
    with pytest.raises(RuntimeError):
        with registry.answering(k):
            raise RuntimeError("emit failed")
    assert registry.waiting(k) == ["s1", "s2"]
    assert registry.add(k, "s3") is False, "the key's lock must be released after the failure"
    with registry.answering(k) as sids:
        assert sids == ["s1", "s2", "s3"]
    assert registry.waiting(k) == []


def test_discard_removes_one_waiter_and_tells_whether_it_was_waiting(registry):
    k = key()
    for sid in ("s1", "s2", "s3"):
        registry.add(k, sid)
    assert registry.discard(k, "s2") is True
    assert registry.discard(k, "s2") is False
    assert registry.discard(key(), "s1") is False
    assert registry.waiting(k) == ["s1", "s3"]


def test_the_waiting_list_expires_after_the_request_timeout_and_grace(registry):
    k = key()
    registry.add(k, "s1")
    ttl = registry.redis.ttl(keys.waiters(k))
    assert 0 < ttl <= TTL + keys.WAITERS_GRACE
    assert ttl > TTL, "the list must outlive the request timeout"
    registry.add(k, "s2")
    assert registry.redis.ttl(keys.waiters(k)) > TTL


def test_the_registry_answers_ping(registry):
    assert registry.ping() is True
