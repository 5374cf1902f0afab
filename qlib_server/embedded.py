"""Embedded mode: the whole server on one machine with no services to install.

The same handler as the distributed mode, on the same async server (gevent by default), with
in-memory stand-ins for the services: the broker is :class:`~qlib_server.broker.memory.MemoryBroker`
and Redis is fakeredis, served on a loopback port so that the compute processes take Qlib's cache
locks through real Redis connections. Each worker of the data processor is a green thread that takes
tasks from the in-memory broker and hands each to a compute process of its own: the computation
never holds up the server, a task outliving ``task_timeout`` gets its process killed and returns to
the queue, exactly as in the distributed mode.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import threading

import redis
from fakeredis import FakeConnection, TcpFakeServer

from .broker.memory import MemoryBroker
from .config import ServerConfig
from .errors import QlibServerError
from .front.handler import RequestHandler
from .log import setup_logging
from .state.registry import SessionRegistry
from .worker.processor import DataProcessor, compute_task, die_with_parent, lower_priority, work

log = logging.getLogger(__name__)


class WorkerLost(QlibServerError):
    """A compute process died (killed, or crashed) before it answered."""


def compute_main(cfg_values: dict, tasks, results, nice: int = 0, warm: bool = False) -> None:
    """Entry point of one compute process: answer each task read from ``tasks`` on ``results`` (after saying
    it is ready: Qlib loaded and, for ``warm``, a feature worker, the engine's kernels)."""
    from .worker import compute

    die_with_parent()
    lower_priority(nice)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cfg = ServerConfig(**cfg_values)
    setup_logging(cfg)
    compute.init_qlib(cfg, warm=warm)
    results.send("ready")
    while True:
        try:
            task, expression_cache = tasks.recv()
        except EOFError:  # the server closed the pipe: nothing more to do
            return
        results.send(compute_task(task, expression_cache))


class ComputeProcess:
    """A spawned process computing the tasks of one worker, fed through a pair of pipes."""

    def __init__(self, cfg: ServerConfig, ctx, name: str, nice: int = 0, warm: bool = False):
        task_reader, self.tasks = ctx.Pipe(duplex=False)
        self.results, result_writer = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=compute_main, args=(cfg.model_dump(), task_reader, result_writer, nice, warm),
                                name=name, daemon=True)
        self.proc.start()
        task_reader.close()
        result_writer.close()

    def wait_ready(self) -> None:
        """Wait until the process has loaded Qlib (and the kernels it warms): its first message."""
        try:
            select.select([self.results], [], [])  # cooperative under gevent
            self.results.recv()
        except (EOFError, OSError) as exc:
            raise WorkerLost(f"compute process {self.proc.pid} died while starting ({exc!r})") from None

    def run(self, task: dict, expression_cache: bool) -> tuple:
        """Compute ``task`` in the process; the calling (green) thread waits, the server goes on."""
        try:
            self.tasks.send((task, expression_cache))
            select.select([self.results], [], [])  # cooperative under gevent
            return self.results.recv()
        except (EOFError, OSError) as exc:
            raise WorkerLost(f"compute process {self.proc.pid} is gone ({exc!r})") from None

    def kill(self) -> None:
        if self.proc.is_alive():
            os.kill(self.proc.pid, signal.SIGKILL)

    def close(self) -> None:
        self.tasks.close()  # the process leaves at EOF
        self.results.close()
        if not select.select([self.proc.sentinel], [], [], 5)[0]:
            self.kill()
        self.proc.join()


class EmbeddedProcessor(DataProcessor):
    """The data processor with green-thread workers, each feeding one :class:`ComputeProcess`."""

    count_errors = False  # the handler in this same process counts them

    def __init__(self, cfg: ServerConfig, broker: MemoryBroker):
        super().__init__(cfg, lambda _cfg: broker.connect())
        self.busy = [_Busy() for _ in self.queues]
        self.computers: list = [None] * len(self.queues)

    def _work(self, i: int) -> None:
        features = self.queues[i] == self.cfg.task_queue
        computer = self.computers[i] = ComputeProcess(self.cfg, self.ctx, f"qlib-server-compute-{i}",
                                                      self.cfg.feature_nice if features else 0, warm=features)
        try:
            computer.wait_ready()  # consume (and so count as ready) only once no task waits for the start
            work(self.cfg, self.broker_factory(self.cfg), self.busy[i], self.stops[i], self.queues[i], computer.run,
                 lambda event: self.status.on_report(i, event))
        except WorkerLost as exc:  # its task is back in the queue; the supervisor starts another worker
            log.warning("worker %d: %s", i, exc)
        finally:
            computer.close()

    def _start_worker(self, i: int) -> None:
        self.busy[i] = _Busy()
        self.stops[i] = threading.Event()
        self.workers[i] = threading.Thread(target=self._work, args=(i,), name=f"qlib-server-worker-{i}", daemon=True)
        self.workers[i].start()

    def _alive(self, i: int) -> bool:
        return self.workers[i].is_alive()

    def _worker_states(self) -> list[tuple]:
        return [(c.proc.pid if c is not None else None, b.value) for c, b in zip(self.computers, self.busy)]

    def _kill(self, i: int) -> None:
        self.computers[i].kill()
        self.workers[i].join(5)

    def _join(self, i: int, timeout: float) -> None:
        self.workers[i].join(timeout)


class _Busy:
    """When the worker's current task started (0: idle), like a shared ``multiprocessing.Value``."""

    value = 0.0


class EmbeddedServer:
    """Handler, processor and in-memory services wired together on this machine."""

    def __init__(self, cfg: ServerConfig):
        self.redis_server = TcpFakeServer(("127.0.0.1", 0))
        host, port = self.redis_server.server_address[:2]
        self.cfg = cfg.model_copy(update={"redis_host": host, "redis_port": port, "redis_password": None,
                                          "socketio_message_queue": None})
        self.broker = MemoryBroker()
        self.processor = EmbeddedProcessor(self.cfg, self.broker)
        pool = redis.BlockingConnectionPool(connection_class=FakeConnection, server=self.redis_server.fake_server,
                                            db=self.cfg.redis_task_db, max_connections=self.cfg.redis_max_connections,
                                            timeout=20)
        self.handler = RequestHandler(self.cfg, SessionRegistry(redis.Redis(connection_pool=pool),
                                                                self.cfg.request_timeout), self.broker.connect)

    def serve(self) -> None:
        threading.Thread(target=self.redis_server.serve_forever, name="fake-redis", daemon=True).start()
        threading.Thread(target=self.processor.run, name="processor", daemon=True).start()
        log.info("embedded mode: in-memory broker and Redis, %d+%d compute processes", self.cfg.max_process,
                 self.cfg.light_workers)
        try:
            self.handler.serve()
        finally:
            self.processor.stop()
            self.redis_server.shutdown()
