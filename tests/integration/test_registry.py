"""The session registry under contention, against a model, and with its lock holders dying.

Most tests drive :class:`qlib_server.state.registry.SessionRegistry` directly on the test Redis; the last
one loses a task on a running server and checks its waiters are freed.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import hypothesis.strategies as st
from clients import WireClient
from conftest import wait_until
from faults import (
    calendar_body,
    consumers,
    hold_lock_forever,
    purge_queue,
    queue_depth,
    registry_churn,
    server_registry,
    trading_days,
)
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from qlib_server.broker.base import light_queue
from qlib_server.state import keys

KEY = "contended"


def make_registry(services, db: int, request_timeout: float = 60):
    return server_registry(services.redis_host, services.redis_port, db, request_timeout)


def test_concurrent_adds_and_answers_lose_no_waiter_and_answer_each_once(services):
    db = services.fresh_db()
    where = (services.redis_host, services.redis_port, db, KEY)
    spawn = mp.get_context("spawn")
    with spawn.Pool(3) as processes, ThreadPoolExecutor(8) as threads:
        remote = [processes.apply_async(registry_churn, (*where, f"proc{i}", 150, i)) for i in range(3)]
        local = [threads.submit(registry_churn, *where, f"thread{i}", 150, 100 + i) for i in range(8)]
        runs = [r.get(120) for r in remote] + [f.result(120) for f in local]
    registry = make_registry(services, db)
    runs.append({"added": [], "first": [], "batches": []})
    with registry.answering(KEY) as rest:  # whatever nobody answered yet
        if rest:
            runs[-1]["batches"].append(list(rest))

    added = [sid for run in runs for sid in run["added"]]
    first = sorted(sid for run in runs for sid in run["first"])
    batches = [batch for run in runs for batch in run["batches"]]
    answered = [sid for batch in batches for sid in batch]
    print(f"\n{len(added)} adds from 3 processes and 8 threads -> {len(batches)} generations answered")
    assert len(answered) == len(set(answered)), "a waiter was answered twice"
    assert set(answered) == set(added), f"lost waiters: {sorted(set(added) - set(answered))[:5]}"
    # Each generation (the waiters one answering takes) has exactly one first waiter: its head.
    assert first == sorted(batch[0] for batch in batches)
    wait_until(lambda: not registry.redis.keys("*"), 5, what="no waiting list, lock or lock signal left")


class Boom(Exception):
    """Raised inside an answering block, as an emit that fails would."""


def test_registry_behaves_like_a_list_per_key(services):
    db = services.fresh_db()
    client = services.redis_client(db)
    request_keys = ("a", "b")

    class RegistryAgainstModel(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            client.flushdb()
            self.registry = make_registry(services, db, request_timeout=30)
            self.model = {key: [] for key in request_keys}

        @rule(key=st.sampled_from(request_keys), sid=st.integers(0, 6))
        def add(self, key, sid):
            assert self.registry.add(key, f"s{sid}") == (not self.model[key])
            self.model[key].append(f"s{sid}")

        @rule(key=st.sampled_from(request_keys), fail=st.booleans())
        def answer(self, key, fail):
            try:
                with self.registry.answering(key) as sids:
                    assert sids == self.model[key]
                    if fail:
                        raise Boom
            except Boom:
                return  # not answered: every waiter is kept
            self.model[key] = []

        @rule(key=st.sampled_from(request_keys), sid=st.integers(0, 6))
        def discard(self, key, sid):
            expected = f"s{sid}" in self.model[key]
            assert self.registry.discard(key, f"s{sid}") == expected
            if expected:
                self.model[key].remove(f"s{sid}")

        @invariant()
        def matches_model(self):
            for key in request_keys:
                assert self.registry.waiting(key) == self.model[key]
                ttl = client.ttl(keys.waiters(key))
                assert (0 < ttl <= 30 + keys.WAITERS_GRACE) if self.model[key] else ttl == -2, ttl
                assert not client.exists(f"lock:{keys.waiters_lock(key)}"), "a lock outlived its operation"

    run_state_machine_as_test(RegistryAgainstModel, settings=settings(
        max_examples=40, stateful_step_count=30, deadline=None, suppress_health_check=list(HealthCheck)))


def test_a_dead_lock_holder_does_not_block_its_key_for_ever(services):
    db = services.fresh_db()
    spawn = mp.get_context("spawn")
    ready = spawn.Event()
    holder = spawn.Process(target=hold_lock_forever, daemon=True, args=(
        services.redis_host, services.redis_port, db, keys.waiters_lock(KEY), ready))
    holder.start()
    try:
        assert ready.wait(60), "the lock holder did not take the lock"
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(10)
    registry = make_registry(services, db)
    outcome = {}

    def add():
        outcome["first"] = registry.add(KEY, "after-the-crash")

    started = time.monotonic()
    adder = threading.Thread(target=add, daemon=True)
    adder.start()
    adder.join(keys.LOCK_EXPIRE + 30)
    print(f"\nadd after its lock holder was killed completed in {time.monotonic() - started:.1f}s "
          f"(lock expiry {keys.LOCK_EXPIRE}s)")
    assert not adder.is_alive(), "the key stays locked by a dead process"
    assert outcome == {"first": True} and registry.waiting(KEY) == ["after-the-crash"]


def test_waiters_of_a_lost_task_are_answered_and_the_request_is_published_again(start_server, services, dataset):
    handler = start_server(modules=("request_handler",), request_timeout=3)
    days = trading_days(dataset)
    body = calendar_body(days[20], days[25])
    tasks = light_queue(handler.config["task_queue"])  # where calendar tasks go
    with WireClient(handler.url) as client:
        client.send("calendar", body)
        wait_until(lambda: queue_depth(services, tasks) == 1, 30, what="the task queued")
        assert purge_queue(services, tasks) == 1  # the task is lost
        sent = time.monotonic()
        answer = client.receive("calendar", 60)
        print(f"\nlost task: the client got a status {answer['status']} answer after {time.monotonic() - sent:.1f}s")
        assert answer["status"] == 2 and "no answer within 3s" in answer["detailed_info"], answer
        registry = make_registry(services, handler.config["redis_task_db"])
        assert not registry.redis.keys(keys.WAITERS + "*"), "the timed-out waiter is still listed"

        start_server(modules=("data_processor",), wait=False)
        wait_until(lambda: consumers(services, tasks), 60, what="a worker consuming calendar tasks")
        answer = client.request("calendar", body, timeout=60)
        assert answer["status"] == 0, answer
        assert len(answer["result"]) == 6
    assert handler.metric("qlib_server_tasks_published_total", type="calendar") == 2
