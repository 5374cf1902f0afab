"""Embedded mode: the whole server in one process, with in-memory backends instead of services.

The broker is :class:`~qlib_server.broker.memory.MemoryBroker`; Redis is fakeredis (the same
registry code, python-redis-lock included, and Qlib's cache locks); workers are threads. No
RabbitMQ, no Redis, no Docker: for trying Qlib-Server out and for demos.
"""

from __future__ import annotations

import logging
import threading

import fakeredis

from . import compute
from .broker.memory import MemoryBroker
from .config import ServerConfig
from .handler import RequestHandler
from .processor import ThreadedDataProcessor
from .registry import SessionRegistry
from .updater import refresh

log = logging.getLogger(__name__)


class EmbeddedServer:
    """Handler, processor and in-memory backends wired together in this process."""

    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg.model_copy(update={"async_mode": "threading", "socketio_message_queue": None})
        self.redis_server = fakeredis.FakeServer()
        self.broker = MemoryBroker()
        compute.init_qlib(self.cfg, redis_factory=self.redis)
        self.processor = ThreadedDataProcessor(self.cfg, lambda _cfg: self.broker.connect())
        self.processor.refresh = lambda: refresh(self.cfg, self.redis())
        self.handler = RequestHandler(self.cfg, SessionRegistry(self.redis(), self.cfg.request_timeout),
                                      self.broker.connect)

    def redis(self) -> fakeredis.FakeRedis:
        return fakeredis.FakeRedis(server=self.redis_server)

    def serve(self) -> None:
        threading.Thread(target=self.processor.run, name="processor", daemon=True).start()
        log.info("embedded mode: in-memory broker and registry, %d worker threads", self.cfg.max_process)
        self.handler.serve()
