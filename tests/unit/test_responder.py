"""The responder's promises on one shared registry and broker: each client is answered once, by the
handler holding it, whichever handler took the result; a request whose waiter entry vanished is
served again."""

from __future__ import annotations

import time
from collections import defaultdict

import fakeredis
import pytest

from qlib_server.broker.memory import MemoryBroker
from qlib_server.config import make_config
from qlib_server.front.handler import make_parser
from qlib_server.front.listener import RequestListener
from qlib_server.front.responder import Pending, RequestResponder
from qlib_server.metrics import Metrics
from qlib_server.state import keys
from qlib_server.state.cache import ResultCache
from qlib_server.state.registry import SessionRegistry

CALENDAR = {"head": {"version": "0.9.7"}, "body": {"start_time": "2019-01-01", "end_time": "2019-01-31",
                                                      "freq": "day", "future": False}}


class Node:
    """One request handler's listener, responder and pending list on shared services."""

    def __init__(self, name: str, redis, broker: MemoryBroker, cache_ttl: int = 60):
        cfg = make_config(provider_uri="/nonexistent", task_queue="tasks", message_queue="results")
        self.name, self.broker = name, broker.connect()
        self.broker.declare("tasks", "results", 3)
        self.broker.declare_inbox(keys.inbox(name), 60)
        self.registry = SessionRegistry(redis, ttl=60)
        self.cache = ResultCache(redis, ttl=cache_ttl)
        self.pending, self.metrics = Pending(), Metrics()
        self.sent: dict[str, list[dict]] = defaultdict(list)
        self.responder = RequestResponder(name, self.registry, self.metrics, self.emit, self.broker.publish,
                                          self.pending, 60, self.cache)
        self.listener = RequestListener(make_parser(cfg), self.registry, self.broker, "tasks", self.responder,
                                        self.pending, self.metrics, self.emit, self.cache)

    def emit(self, event: str, data: dict, sid: str) -> None:
        self.sent[sid].append(data)

    def drain_inbox(self) -> None:
        for delivery in self.broker.consume(keys.inbox(self.name), prefetch=100, idle=0):
            if delivery is None:
                break
            self.responder.on_result(delivery.message)
            delivery.ack()


@pytest.fixture
def shared():
    redis = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    return redis, MemoryBroker()


def take_tasks(node: Node, queue: str = "tasks.light") -> list[dict]:
    tasks = []
    for delivery in node.broker.consume(queue, prefetch=100, idle=0):
        if delivery is None:
            break
        tasks.append(delivery.message)
        delivery.ack()
    return tasks


def result_of(task: dict, days: list[str]) -> dict:
    return {"key": task["key"], "type": task["type"], "status": 0, "result": days, "generation": 0}


def test_a_result_taken_by_one_handler_reaches_the_clients_of_the_other_once(shared):
    a, b = Node("a", *shared), Node("b", *shared)
    a.listener.on_request("calendar", "s1", CALENDAR)
    b.listener.on_request("calendar", "s2", CALENDAR)
    [task] = take_tasks(a)
    a.responder.on_result(result_of(task, ["2019-01-02"]))
    assert a.sent == {"s1": [{"result": ["2019-01-02"], "status": 0, "detailed_info": None}]}
    assert b.sent == {} and b.pending.count("s2") == 1
    b.drain_inbox()
    assert b.sent == {"s2": [{"result": ["2019-01-02"], "status": 0, "detailed_info": None}]}
    assert b.pending.count("s2") == 0, "an answer delivered for b no longer counts against b's in-flight limit"
    b.drain_inbox()
    a.responder.on_result(result_of(task, ["2019-01-02"]))  # the same result delivered again
    assert len(a.sent["s1"]) == len(b.sent["s2"]) == 1


def test_a_request_whose_waiter_entry_vanished_is_served_again(shared, monkeypatch):
    redis, broker = shared
    node = Node("a", redis, broker, cache_ttl=0)
    node.listener.on_request("calendar", "s1", CALENDAR)
    [task] = take_tasks(node)
    redis.flushdb()  # a Redis restart: the waiting list is gone
    node.responder.on_result(result_of(task, ["2019-01-02"]))
    assert node.sent == {}, "nobody left in the registry to answer"
    clock = [time.monotonic() + 10]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    node.responder.sweep()  # first sight of the missing entry
    assert take_tasks(node) == []
    clock[0] += keys.LOST_AFTER
    node.responder.sweep()
    [again] = take_tasks(node)
    assert again["key"] == task["key"] and node.metrics.requests_recovered.labels("calendar")._value.get() == 1
    node.responder.on_result(result_of(again, ["2019-01-02"]))
    assert node.sent == {"s1": [{"result": ["2019-01-02"], "status": 0, "detailed_info": None}]}


def test_a_request_answered_by_timeout_is_not_answered_again_by_its_late_result(shared, monkeypatch):
    node = Node("a", *shared)
    node.listener.on_request("calendar", "s1", CALENDAR)
    [task] = take_tasks(node)
    clock = [time.monotonic() + 61]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    assert node.responder.sweep() == 1
    node.responder.on_result(result_of(task, ["2019-01-02"]))
    assert [a["status"] for a in node.sent["s1"]] == [2]


def test_two_identical_requests_on_one_connection_get_two_answers(shared):
    node = Node("a", *shared)
    node.listener.on_request("calendar", "s1", CALENDAR)
    node.listener.on_request("calendar", "s1", CALENDAR)
    [task] = take_tasks(node)
    node.responder.on_result(result_of(task, ["2019-01-02"]))
    assert [a["status"] for a in node.sent["s1"]] == [0, 0] and node.pending.count("s1") == 0


def with_head_id(payload: dict, rid) -> dict:
    return {**payload, "head": {**payload["head"], "id": rid}}


def test_answers_echo_the_request_ids_of_one_connection_in_order_and_refusals_too(shared):
    node = Node("a", *shared)
    for rid in ("r1", "r2"):  # the same request twice on one connection: one task, two answers
        node.listener.on_request("calendar", "s1", with_head_id(CALENDAR, rid))
    node.listener.on_request("calendar", "s1", with_head_id({"head": {"version": "0.9.7"}, "body": "{"}, "r3"))
    [task] = take_tasks(node)
    node.responder.on_result(result_of(task, ["2019-01-02"]))
    ids = [(a.get("id"), a["status"]) for a in node.sent["s1"]]
    assert ids == [("r3", 1), ("r1", 0), ("r2", 0)]


def test_timed_out_requests_are_answered_with_their_ids_and_stock_clients_get_no_id(shared, monkeypatch):
    node = Node("a", *shared)
    node.listener.on_request("calendar", "s1", with_head_id(CALENDAR, "r1"))
    node.listener.on_request("calendar", "s1", with_head_id(CALENDAR, "r2"))
    node.listener.on_request("calendar", "s2", CALENDAR)
    monkeypatch.setattr(time, "monotonic", lambda: 1e12)
    assert node.responder.sweep() == 3
    assert [a["id"] for a in node.sent["s1"]] == ["r1", "r2"] and "id" not in node.sent["s2"][0]


def hold_first_add(node: Node, failure: Exception | None = None):
    """Make the first registry add wait until released (raising ``failure`` then, if given); the
    calls are counted. Returns (calls, entered, release)."""
    import threading

    calls, entered, release = [], threading.Event(), threading.Event()
    add = node.registry.add

    def held(key, *sids):
        calls.append(len(sids))
        if len(calls) == 1:
            entered.set()
            assert release.wait(10)
            if failure is not None:
                raise failure
        return add(key, *sids)

    node.registry.add = held
    return calls, entered, release


def send_in_thread(node: Node, sid: str, payload: dict):
    """``sid`` sends ``payload`` from a thread of its own (its add may be held); returns the thread."""
    import threading

    thread = threading.Thread(target=node.listener.on_request, args=("calendar", sid, payload))
    thread.start()
    return thread


@pytest.mark.parametrize("order", [0, 1, 2])
def test_identical_requests_arriving_while_the_first_is_added_join_it_and_take_the_lock_once_more(shared, order):
    import random

    node = Node("a", *shared)
    calls, entered, release = hold_first_add(node)
    sids = [f"s{i}" for i in range(40)]
    random.Random(order).shuffle(sids)
    first = send_in_thread(node, sids[0], CALENDAR)
    assert entered.wait(10)
    for sid in sids[1:]:
        node.listener.on_request("calendar", sid, CALENDAR)  # each joins the batch being added: no lock taken
    assert calls == [1]
    release.set()
    first.join(10)
    assert calls == [1, len(sids) - 1], "the followers went into the registry in one batch"
    [task] = take_tasks(node)
    node.responder.on_result(result_of(task, ["2019-01-02"]))
    assert {sid: [a["status"] for a in node.sent[sid]] for sid in sids} == {sid: [0] for sid in sids}
    assert node.metrics.dedup_hits.labels("calendar")._value.get() == len(sids) - 1


def test_a_batch_that_cannot_be_added_answers_every_request_in_it_with_an_error(shared):
    from qlib_server.errors import ConnectionLost

    node = Node("a", *shared)
    calls, entered, release = hold_first_add(node, ConnectionLost("redis: connection refused"))
    sids = [f"s{i}" for i in range(25)]
    first = send_in_thread(node, sids[0], CALENDAR)
    assert entered.wait(10)
    for sid in sids[1:]:
        node.listener.on_request("calendar", sid, CALENDAR)
    release.set()
    first.join(10)
    assert calls == [1]
    for sid in sids:
        [answer] = node.sent[sid]
        assert answer["status"] == 2 and "cannot queue" in answer["detailed_info"], answer
        assert node.pending.count(sid) == 0
    assert take_tasks(node) == []
    node.listener.on_request("calendar", "later", CALENDAR)  # the batch is gone: the next request starts anew
    assert len(take_tasks(node)) == 1
