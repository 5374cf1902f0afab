"""The in-memory broker on its own: connections share queues, and many threads lose or duplicate nothing.

The semantics it shares with RabbitMQ are checked against both transports in
``tests/integration/test_contracts.py``; these are the properties only the in-memory one can be
driven through without services.
"""

from __future__ import annotations

import random
import threading
from collections import Counter

import pytest

from qlib_server.broker.base import dead_letter_queue, light_queue
from qlib_server.broker.memory import MemoryBroker
from qlib_server.errors import BrokerError

TASKS, RESULTS = "tasks", "results"


def first_delivery(consumer):
    """The next delivery of a consume generator, skipping idle ``None``s (a bounded number of them)."""
    for _ in range(200):
        delivery = next(consumer)
        if delivery is not None:
            return delivery
    raise AssertionError("no delivery")


@pytest.fixture
def broker() -> MemoryBroker:
    b = MemoryBroker()
    b.declare(TASKS, RESULTS, max_deliveries=3)
    yield b
    b.close()


def test_a_message_published_on_one_connection_reaches_a_consumer_on_another(broker):
    consumer = broker.connect()
    broker.publish(RESULTS, {"key": "k1", "result": [1, 2.5, None, "x"]})
    delivery = first_delivery(consumer.consume(RESULTS, prefetch=1, idle=0.05))
    assert delivery.message == {"key": "k1", "result": [1, 2.5, None, "x"]}
    delivery.ack()
    assert broker.depth(RESULTS) == 0
    consumer.close()


def test_declare_makes_both_task_lanes_the_dead_letter_queue_and_the_message_queue(broker):
    for queue in (TASKS, light_queue(TASKS), dead_letter_queue(TASKS), RESULTS):
        broker.publish(queue, {"queue": queue})
        assert broker.depth(queue) == 1


def test_an_undeclared_queue_is_refused_for_publishing_and_consuming(broker):
    with pytest.raises(BrokerError, match="does not exist"):
        broker.publish("nosuchqueue", {"a": 1})
    with pytest.raises(BrokerError, match="does not exist"):
        next(broker.connect().consume("nosuchqueue", prefetch=1, idle=0.05))


def test_declaring_twice_keeps_the_messages(broker):
    broker.publish(TASKS, {"n": 1})
    broker.declare(TASKS, RESULTS, max_deliveries=3)
    assert broker.depth(TASKS) == 1


def test_closing_a_connection_ends_its_waiting_consumer(broker):
    consumer = broker.connect()
    seen = []
    ended = threading.Event()

    def consume():
        for delivery in consumer.consume(TASKS, prefetch=1, idle=60):
            seen.append(delivery)
        ended.set()

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    consumer.close()
    assert ended.wait(10), "a consumer blocked on an empty queue must wake up when its connection closes"
    assert seen in ([], [None])


def test_consumers_are_counted_while_they_consume(broker):
    """What /readyz reads in embedded mode to tell whether any worker serves a queue."""
    assert broker.consumers(TASKS) == 0
    worker = broker.connect()
    consumer = worker.consume(TASKS, prefetch=1, idle=0.01)
    assert next(consumer) is None
    assert (broker.consumers(TASKS), broker.consumers(light_queue(TASKS))) == (1, 0)
    other = broker.connect().consume(TASKS, prefetch=1, idle=0.01)
    next(other)
    assert broker.consumers(TASKS) == 2
    other.close()
    assert broker.consumers(TASKS) == 1
    worker.close()
    assert list(consumer) == []  # the generator ends with its connection ...
    assert broker.consumers(TASKS) == 0  # ... and stops counting


def test_an_ack_after_the_connection_closed_does_not_lose_the_message(broker):
    broker.publish(TASKS, {"n": 1})
    consumer = broker.connect()
    delivery = first_delivery(consumer.consume(TASKS, prefetch=1, idle=0.05))
    consumer.close()  # the delivery goes back to the queue ...
    delivery.ack()  # ... so this late ack must not remove it
    assert broker.depth(TASKS) == 1
    again = broker.connect()
    redelivered = first_delivery(again.consume(TASKS, prefetch=1, idle=0.05))
    assert (redelivered.message, redelivered.delivery_count) == ({"n": 1}, 1)
    again.close()


def test_many_producers_and_consumers_lose_and_duplicate_nothing():
    """Producers publish concurrently; consumers ack in batches, sometimes nack with requeue, and one
    of them crashes (closes its connection holding unacked deliveries) every so often and is replaced.
    Every message is acknowledged exactly once, and nothing is left or dead-lettered."""
    producers, per_producer, consumers, prefetch = 6, 1000, 5, 8
    total = producers * per_producer
    hub = MemoryBroker()
    hub.declare(TASKS, RESULTS, max_deliveries=100)
    acked: Counter = Counter()
    lock = threading.Lock()
    done = threading.Event()
    failures: list[BaseException] = []
    seen: Counter = Counter()  # how often each path was taken

    def produce(p: int) -> None:
        connection = hub.connect()
        for i in range(per_producer):
            connection.publish(TASKS, {"id": f"{p}-{i}"})

    def consume_until_crash(connection: MemoryBroker, rng: random.Random) -> None:
        """Consume on one connection; return when it "crashes" (closes with its batch unacked) or all is done."""
        batch = []
        for delivery in connection.consume(TASKS, prefetch=prefetch, idle=0.02):
            if done.is_set():
                return
            if delivery is not None:
                nack = rng.random() < 0.05
                with lock:
                    seen["redelivered"] += delivery.redelivered
                    seen["nacked"] += nack
                if nack:
                    delivery.nack(requeue=True)
                    continue
                batch.append(delivery)
                if len(batch) < rng.randint(1, prefetch):
                    continue
            if batch and rng.random() < 0.01:
                with lock:
                    seen["crashed"] += 1
                return
            for d in batch:
                d.ack()
            with lock:
                acked.update(d.message["id"] for d in batch)
                if sum(acked.values()) >= total:
                    done.set()
            batch = []

    def consume(seed: int) -> None:
        rng = random.Random(seed)
        try:
            while not done.is_set():
                connection = hub.connect()
                try:
                    consume_until_crash(connection, rng)
                finally:
                    connection.close()  # unacked deliveries go back to the queue
        except BaseException as exc:  # surfaced by the main thread
            failures.append(exc)
            done.set()

    threads = [threading.Thread(target=produce, args=(p,)) for p in range(producers)]
    threads += [threading.Thread(target=consume, args=(c,)) for c in range(consumers)]
    for t in threads:
        t.start()
    finished = done.wait(120)
    done.set()
    for t in threads:
        t.join(30)
    assert not failures, failures
    assert finished, f"only {sum(acked.values())} of {total} messages acknowledged"
    expected = {f"{p}-{i}" for p in range(producers) for i in range(per_producer)}
    assert set(acked) == expected
    duplicated = {k: n for k, n in acked.items() if n > 1}
    assert not duplicated, f"acknowledged more than once: {list(duplicated)[:5]}"
    assert hub.depth(TASKS) == 0
    assert hub.depth(dead_letter_queue(TASKS)) == 0
    print(f"{total} messages: {dict(seen)}")
    assert seen["nacked"] and seen["crashed"] and seen["redelivered"], "every path must have been taken"
