"""Unit-test settings: the hypothesis profiles and the in-process request path the security tests drive.

Profiles: ``ci`` (the default) runs 200 examples per property, over 1,000 cases across the fuzz tests;
``long`` (``--hypothesis-profile=long``, the noxfile's ``fuzz`` session) runs 4,000 per property.
Tests that pin ``max_examples`` themselves keep their own count.
"""

from __future__ import annotations

import itertools
import os
from collections import defaultdict

import fakeredis
import pytest
from hypothesis import HealthCheck, Phase, settings

from qlib_server.broker.base import light_queue
from qlib_server.broker.memory import MemoryBroker
from qlib_server.config import make_config
from qlib_server.front.handler import make_parser
from qlib_server.front.listener import RequestListener
from qlib_server.front.responder import Pending, RequestResponder, waiter
from qlib_server.metrics import Metrics
from qlib_server.state.cache import ResultCache
from qlib_server.state.registry import SessionRegistry

_RELAXED = dict(deadline=None, print_blob=True, phases=[p for p in Phase if p is not Phase.explain],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture])
settings.register_profile("ci", max_examples=200, **_RELAXED)
settings.register_profile("long", max_examples=4000, **_RELAXED)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


class RequestPath:
    """The handler's request path in this process: the real parser and listener, a fakeredis registry
    and result cache, a MemoryBroker, and an ``emit`` that records every response per session id."""

    def __init__(self, **config):
        self.cfg = make_config(provider_uri="/nonexistent/qlib-data", task_queue="tasks", message_queue="results",
                               **config)
        self.redis = fakeredis.FakeRedis(server=fakeredis.FakeServer())
        self.registry = SessionRegistry(self.redis, ttl=60)
        self.broker = MemoryBroker()
        self.broker.declare(self.cfg.task_queue, self.cfg.message_queue, self.cfg.max_deliveries)
        self.cache = ResultCache(self.redis, ttl=60)
        self.pending = Pending()
        self.metrics = Metrics()
        self.responses: dict[str, list[tuple[str, dict]]] = defaultdict(list)
        self.node = "node-a"
        self.responder = RequestResponder(self.node, self.registry, self.metrics, self.emit, self.broker.publish,
                                          self.pending, 60, self.cache)
        self.parser = make_parser(self.cfg)
        self.listener = RequestListener(self.parser, self.registry, self.broker, self.cfg.task_queue,
                                        self.responder, self.pending, self.metrics, self.emit, self.cache,
                                        self.cfg.max_inflight_per_client)
        self._consumer = self.broker.connect()
        self._sids = itertools.count()

    def emit(self, event: str, data: dict, sid: str) -> None:
        self.responses[sid].append((event, data))

    def waiter(self, sid: str) -> str:
        """The registry entry of a client of this path's node."""
        return waiter(self.node, sid)

    def new_sid(self, prefix: str = "sid") -> str:
        return f"{prefix}-{next(self._sids)}"

    def take_tasks(self) -> list[dict]:
        """Every task published so far on either lane, removed from the queues."""
        tasks = []
        for lane in (self.cfg.task_queue, light_queue(self.cfg.task_queue)):
            for delivery in self._consumer.consume(lane, prefetch=1 << 20, idle=0):
                if delivery is None:
                    break
                tasks.append(delivery.message)
                delivery.ack()
        return tasks

    def finish(self, task: dict, status: int = 0, result=None, info=None) -> None:
        """Feed the result of ``task`` back as a data processor would publish it."""
        self.responder.on_result({"key": task["key"], "type": task["type"], "status": status, "result": result,
                                  "detailed_info": info, "generation": task.get("generation", 0)})

    def close(self) -> None:
        self._consumer.close()


@pytest.fixture
def request_path_factory():
    """Build in-process request paths with config overrides; every one is closed afterwards."""
    made: list[RequestPath] = []

    def make(**config) -> RequestPath:
        made.append(RequestPath(**config))
        return made[-1]

    yield make
    for path in made:
        path.close()


@pytest.fixture
def request_path(request_path_factory) -> RequestPath:
    """A fresh in-process request path (listener, registry, broker, cache, responder) with the defaults."""
    return request_path_factory()
