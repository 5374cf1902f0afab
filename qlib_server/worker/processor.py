"""DataProcessor: a supervised pool of persistent worker processes consuming the task queue.

Each worker owns its RabbitMQ connection, takes ``max_concurrency`` tasks at a time, computes each
with Qlib, publishes the result to the message queue and only then acknowledges the task. The
supervisor restarts a worker that dies and kills one whose task outlives ``task_timeout``: its task
returns to the queue, and after ``max_deliveries`` deliveries RabbitMQ dead-letters it, whereupon the
supervisor publishes an error result so that its clients are answered.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import select
import signal
import sys
import threading
import time
from typing import Callable, Optional

from ..broker import Broker
from ..broker.base import dead_letter_queue, light_queue
from ..config import ServerConfig
from ..errors import BrokerError, QlibServerError
from ..log import setup_logging
from . import compute
from .telemetry import ProcessorStatus, describe
from .updater import DataWatcher, refresh_main

log = logging.getLogger(__name__)
BrokerFactory = Callable[[ServerConfig], Broker]


def rabbitmq_factory(cfg: ServerConfig, *, heartbeat: Optional[int] = 30) -> Broker:
    from ..broker.rabbitmq import RabbitMQBroker

    return RabbitMQBroker(cfg.amqp_url, heartbeat=heartbeat)


def result_message(task: dict, status: int, result=None, detailed_info=None, **extra) -> dict:
    """The message a processor publishes for one task."""
    return {"key": task.get("key"), "type": task.get("type"), "status": status, "result": result,
            "detailed_info": detailed_info, **extra}


_seen_generation: list = [None]


def compute_task(task: dict, expression_cache: bool) -> tuple:
    """Compute one task in this process: ``(result, status, detailed_info, fields_left_to_qlib)``, the last
    the fields (by block of instruments) the engine left to Qlib in this task."""
    from ..engine import features

    generation = task.get("generation")
    if generation != _seen_generation[0]:
        if _seen_generation[0] is not None:
            compute.forget_data()  # the data changed since the last task: no stale calendars
        _seen_generation[0] = generation
    before = features.fallbacks()
    try:
        return compute.run(task["type"], task["args"], expression_cache), 0, None, features.fallbacks() - before
    except QlibServerError as exc:
        return None, exc.status, str(exc), features.fallbacks() - before


def process_task(delivery, broker: Broker, cfg: ServerConfig, busy_since=None, stopping=None,
                 run: Callable[[dict, bool], tuple] = compute_task,
                 report: Optional[Callable[[tuple], None]] = None) -> None:
    """Compute one delivered task (with ``run``), publish its result, then acknowledge it; tell ``report``
    (see :class:`~qlib_server.worker.telemetry.ProcessorStatus`) when it starts and when it is done."""
    task = delivery.message
    if not isinstance(task.get("key"), str) or task.get("type") not in ("calendar", "instrument", "feature") \
            or not isinstance(task.get("args"), dict):
        log.error("dropping malformed task %.200r", task)
        delivery.nack(requeue=False)  # to the dead-letter queue, for inspection
        return
    started = time.time()
    if report is not None:
        report(("start", task["type"], task["key"], describe(task), started, delivery.delivery_count))
    if busy_since is not None:
        busy_since.value = started
    try:
        result, status, info, fallbacks = run(task, bool(cfg.expression_cache))
    finally:
        if busy_since is not None:
            busy_since.value = 0.0
    seconds = time.time() - started
    broker.publish(cfg.message_queue, result_message(
        task, status, result, info, generation=task.get("generation"), deliveries=delivery.delivery_count + 1,
        seconds=round(seconds, 6)))
    if stopping is not None and stopping.is_set():
        broker.cancel()  # before the ack, so the broker sends this worker no task it will not run
    delivery.ack()
    if report is not None:
        report(("done", task["type"], status, seconds, fallbacks))


def work(cfg: ServerConfig, broker: Broker, busy_since, stopping, queue: str, run=compute_task, report=None) -> None:
    """Consume and process tasks of ``queue`` until ``stopping`` is set; the task in hand is always finished."""
    try:
        for delivery in broker.consume(queue, prefetch=cfg.max_concurrency, idle=0.5):
            if delivery is not None:
                process_task(delivery, broker, cfg, busy_since, stopping, run, report)
            if stopping.is_set():
                break
    finally:
        broker.close()


def join_process(proc) -> None:
    """Wait for ``proc`` to exit, letting green threads run meanwhile (under gevent, a plain join blocks
    the whole process; in embedded mode that would stall the Redis the child itself talks to)."""
    select.select([proc.sentinel], [], [])
    proc.join()


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux), so that a killed supervisor
    takes its workers, their unacknowledged tasks and their locks with it."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        parent = mp.parent_process()
        if parent is not None and os.getppid() != parent.pid:  # it died before the call
            os._exit(1)


def lower_priority(nice: int) -> None:
    """Add ``nice`` to this process's niceness (a feature worker's), so that the handler and the light
    lane get the cores first while features compute. A moderate value: a worker niced much more starves
    when other processes load the machine."""
    if nice:
        os.nice(nice)


def worker_main(cfg_values: dict, busy_since, stop, queue: str, reports) -> None:
    """Entry point of one worker process; it tells the supervisor about its tasks on the pipe ``reports``."""
    die_with_parent()
    cfg = ServerConfig(**cfg_values)
    if queue == cfg.task_queue:
        lower_priority(cfg.feature_nice)
    setup_logging(cfg)
    stopping = _Stopping(stop)
    signal.signal(signal.SIGTERM, stopping.request)  # finish the task in hand, then leave
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    compute.init_qlib(cfg, warm=queue == cfg.task_queue)
    # No heartbeat: a long computation blocks this thread; the supervisor enforces the time limit.
    work(cfg, rabbitmq_factory(cfg, heartbeat=0), busy_since, stopping, queue, report=reports.send)


class _Stopping:
    """A stop request from a signal handler (a plain flag: taking a lock there can deadlock) or from
    the supervisor's event."""

    def __init__(self, event=None):
        self.requested = False
        self.event = event

    def request(self, *_) -> None:
        self.requested = True

    def is_set(self) -> bool:
        return self.requested or (self.event is not None and self.event.is_set())


class DataProcessor:
    """Supervisor of the worker processes (``max_process`` on features, ``light_workers`` on
    calendars and instrument lists) and of the dead-letter queue."""

    count_errors = True  # whether this processor's status counts the errors logged in its process

    def __init__(self, cfg: ServerConfig, broker_factory: BrokerFactory = rabbitmq_factory):
        self.cfg = cfg
        self.broker_factory = broker_factory
        self.ctx = mp.get_context("spawn")
        self.stop_event = threading.Event()  # for the supervisor's threads; set by the main loop only
        self.stopping = _Stopping()
        self.queues = [cfg.task_queue] * cfg.max_process + [light_queue(cfg.task_queue)] * cfg.light_workers
        self.workers: list = [None] * len(self.queues)
        self.stops: list = [None] * len(self.queues)
        self.busy = [self.ctx.Value("d", 0.0, lock=False) for _ in self.queues]
        self.status = ProcessorStatus(cfg, ["main" if q == cfg.task_queue else "light" for q in self.queues],
                                      self.count_errors)

    def refresh(self) -> None:
        """Refresh the caches after a data change, in a process of its own (Qlib runs there)."""
        proc = self.ctx.Process(target=refresh_main, args=(self.cfg.model_dump(),), name="qlib-server-refresh")
        proc.start()
        join_process(proc)

    # -- one worker slot: how it starts, whether it lives, how it is killed (processes here) --
    def _start_worker(self, i: int) -> None:
        self.busy[i].value = 0.0
        self.stops[i] = self.ctx.Event()
        reports, report_writer = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=worker_main, name=f"qlib-server-worker-{i}",
                                args=(self.cfg.model_dump(), self.busy[i], self.stops[i], self.queues[i],
                                      report_writer),
                                daemon=True)
        proc.start()
        report_writer.close()  # the worker holds the only writer: its death ends the pipe
        self.status.watch(i, reports)
        self.workers[i] = proc

    def _worker_states(self) -> list[tuple]:
        """(pid, busy since or 0) of each worker slot, for the status page."""
        return [(w.pid if w is not None else None, b.value) for w, b in zip(self.workers, self.busy)]

    def _alive(self, i: int) -> bool:
        return self.workers[i].is_alive()

    def _kill(self, i: int) -> None:
        """Stop worker ``i`` at once; its unacknowledged task returns to the queue."""
        os.kill(self.workers[i].pid, signal.SIGKILL)
        self.workers[i].join(5)

    def _join(self, i: int, timeout: float) -> None:
        self.workers[i].join(timeout)

    # -- supervision ---------------------------------------------------------------------------
    def _supervise_once(self) -> None:
        now = time.time()
        for i in range(len(self.workers)):
            started = self.busy[i].value
            if self._alive(i) and started and now - started > self.cfg.task_timeout:
                log.error("worker %d exceeded the %gs task limit; stopping it", i, self.cfg.task_timeout)
                self._kill(i)
                self.status.lost(i, "timed_out")
            if not self._alive(i) and not self.stopping.is_set():
                log.warning("worker %d is gone; starting another", i)
                self.status.lost(i, "worker_died")
                self.status.metrics.worker_restarts.inc()
                self._start_worker(i)

    def _answer_dead_letters(self) -> None:
        broker = self.broker_factory(self.cfg)
        dead = dead_letter_queue(self.cfg.task_queue)
        try:
            for delivery in broker.consume(dead, prefetch=10, idle=0.5):
                if self.stop_event.is_set():
                    break
                if delivery is None:
                    continue
                task = delivery.message
                self.status.metrics.dead_letters.labels(
                    task.get("type") if task.get("type") in ("calendar", "instrument", "feature") else "unknown").inc()
                if isinstance(task.get("key"), str):
                    info = (f"the {task.get('type')} task failed {self.cfg.max_deliveries} times (max_deliveries; "
                            f"its worker crashed or exceeded the {self.cfg.task_timeout:g}s task_timeout) and was "
                            "dead-lettered")
                    broker.publish(self.cfg.message_queue, result_message(
                        task, 2, None, info, generation=task.get("generation"), dead_lettered=True))
                delivery.ack()
        except BrokerError as exc:
            log.error("dead-letter consumer stopped: %s", exc)
        finally:
            broker.close()

    def run(self) -> None:
        """Declare the queues, start the workers and supervise them until :meth:`stop`."""
        broker = self.broker_factory(self.cfg)
        broker.declare(self.cfg.task_queue, self.cfg.message_queue, self.cfg.max_deliveries)
        broker.close()
        watcher = DataWatcher(self.cfg, self.refresh, self.stop_event)  # stamps the data before the check
        check = self.ctx.Process(target=refresh_main, args=(self.cfg.model_dump(), False), name="qlib-server-refresh")
        check.start()
        join_process(check)  # caches computed from other data are gone, and answers of older data invalidated
        for i in range(len(self.queues)):
            self._start_worker(i)
        threading.Thread(target=self.status.collect, args=(self.stop_event,), name="worker-reports",
                         daemon=True).start()
        threading.Thread(target=self.status.run, args=(self.stop_event, self._worker_states), name="status",
                         daemon=True).start()
        dead_letters = None
        watcher.start()
        log.info("data processor started %d+%d workers on %r", self.cfg.max_process, self.cfg.light_workers,
                 self.cfg.task_queue)
        while not self.stopping.is_set():
            time.sleep(0.2)
            if dead_letters is None or not dead_letters.is_alive():
                dead_letters = threading.Thread(target=self._answer_dead_letters, name="dead-letters", daemon=True)
                dead_letters.start()
            self._supervise_once()
        self.stop_event.set()
        self._shutdown()

    def stop(self, *_) -> None:
        """Ask the supervisor to shut down (safe in a signal handler)."""
        self.stopping.request()

    def _shutdown(self, grace: float = 30.0) -> None:
        """Let each worker finish the task in hand, then exit; a worker still busy after ``grace`` is
        killed and its task returns to the queue."""
        for event in self.stops:
            event.set()
        deadline = time.time() + grace
        for i in range(len(self.workers)):
            self._join(i, max(0.1, deadline - time.time()))
            if self._alive(i):
                self._kill(i)
        log.info("data processor stopped")


def run_processor(cfg_values: dict) -> None:
    """Process entry point used by ``qlib-server serve`` when it runs both modules."""
    cfg = ServerConfig(**cfg_values)
    setup_logging(cfg)
    processor = DataProcessor(cfg)
    signal.signal(signal.SIGTERM, processor.stop)
    signal.signal(signal.SIGINT, processor.stop)
    processor.run()
