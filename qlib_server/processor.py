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
import signal
import threading
import time
from typing import Callable, Optional

from . import compute
from .broker import Broker
from .broker.base import dead_letter_queue
from .config import ServerConfig
from .errors import BrokerError, QlibServerError
from .log import setup_logging

log = logging.getLogger(__name__)
BrokerFactory = Callable[[ServerConfig], Broker]


def rabbitmq_factory(cfg: ServerConfig, *, heartbeat: Optional[int] = 30) -> Broker:
    from .broker.rabbitmq import RabbitMQBroker

    return RabbitMQBroker(cfg.amqp_url, heartbeat=heartbeat)


def result_message(task: dict, status: int, result=None, detailed_info=None, **extra) -> dict:
    """The message a processor publishes for one task."""
    return {"key": task.get("key"), "type": task.get("type"), "status": status, "result": result,
            "detailed_info": detailed_info, **extra}


def process_task(delivery, broker: Broker, cfg: ServerConfig, busy_since=None) -> None:
    """Compute one delivered task, publish its result, then acknowledge it."""
    task = delivery.message
    if not isinstance(task.get("key"), str) or task.get("type") not in ("calendar", "instrument", "feature") \
            or not isinstance(task.get("args"), dict):
        log.error("dropping malformed task %.200r", task)
        delivery.nack(requeue=False)  # to the dead-letter queue, for inspection
        return
    started = time.time()
    if busy_since is not None:
        busy_since.value = started
    try:
        result, status, info = compute.run(task["type"], task["args"], bool(cfg.expression_cache)), 0, None
    except QlibServerError as exc:
        result, status, info = None, exc.status, str(exc)
    finally:
        if busy_since is not None:
            busy_since.value = 0.0
    broker.publish(cfg.message_queue, result_message(
        task, status, result, info, generation=task.get("generation"), deliveries=delivery.delivery_count + 1,
        seconds=round(time.time() - started, 6)))
    delivery.ack()


def worker_main(cfg_values: dict, busy_since, stop) -> None:
    """Entry point of one worker process."""
    cfg = ServerConfig(**cfg_values)
    setup_logging(cfg)
    stopping = threading.Event()  # SIGTERM: finish the task in hand, then leave
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    compute.init_qlib(cfg)
    # No heartbeat: a long computation blocks this thread; the supervisor enforces the time limit.
    broker = rabbitmq_factory(cfg, heartbeat=0)
    try:
        for delivery in broker.consume(cfg.task_queue, prefetch=cfg.max_concurrency, idle=0.5):
            if delivery is not None:
                process_task(delivery, broker, cfg, busy_since)
            if stopping.is_set() or stop.is_set():
                break
    finally:
        broker.close()


class DataProcessor:
    """Supervisor of ``max_process`` worker processes and of the dead-letter queue."""

    def __init__(self, cfg: ServerConfig, broker_factory: BrokerFactory = rabbitmq_factory):
        self.cfg = cfg
        self.broker_factory = broker_factory
        self.ctx = mp.get_context("spawn")
        self.stop_event = self.ctx.Event()
        self.workers: list = [None] * cfg.max_process
        self.busy = [self.ctx.Value("d", 0.0, lock=False) for _ in range(cfg.max_process)]
        self.restarts = 0

    def _start_worker(self, i: int) -> None:
        self.busy[i].value = 0.0
        proc = self.ctx.Process(target=worker_main, name=f"qlib-server-worker-{i}",
                                args=(self.cfg.model_dump(), self.busy[i], self.stop_event), daemon=True)
        proc.start()
        self.workers[i] = proc

    def _supervise_once(self) -> None:
        now = time.time()
        for i, proc in enumerate(self.workers):
            started = self.busy[i].value
            if proc.is_alive() and started and now - started > self.cfg.task_timeout:
                log.error("worker %s exceeded the %.0fs task limit; killing it", proc.pid, self.cfg.task_timeout)
                os.kill(proc.pid, signal.SIGKILL)
                proc.join(5)
            if not proc.is_alive() and not self.stop_event.is_set():
                log.warning("worker %s exited with %s; starting another", proc.pid, proc.exitcode)
                self.restarts += 1
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
                if isinstance(task.get("key"), str):
                    info = (f"the {task.get('type')} task failed {self.cfg.max_deliveries} times (its worker crashed "
                            f"or exceeded the {self.cfg.task_timeout:g}s limit) and was dead-lettered")
                    broker.publish(self.cfg.message_queue, result_message(task, 2, None, info, dead_lettered=True))
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
        for i in range(self.cfg.max_process):
            self._start_worker(i)
        dead_letters = threading.Thread(target=self._answer_dead_letters, name="dead-letters", daemon=True)
        dead_letters.start()
        log.info("data processor started %d workers on %r", self.cfg.max_process, self.cfg.task_queue)
        while not self.stop_event.wait(0.2):
            if not dead_letters.is_alive():
                dead_letters = threading.Thread(target=self._answer_dead_letters, name="dead-letters", daemon=True)
                dead_letters.start()
            self._supervise_once()
        self._shutdown()

    def stop(self) -> None:
        self.stop_event.set()

    def _shutdown(self, grace: float = 30.0) -> None:
        """Let each worker finish the task in hand (or hand it back), then exit."""
        for proc in self.workers:
            if proc is not None and proc.is_alive():
                proc.terminate()  # SIGTERM: the worker stops after its current task
        deadline = time.time() + grace
        for proc in self.workers:
            if proc is not None:
                proc.join(max(0.1, deadline - time.time()))
                if proc.is_alive():
                    proc.kill()  # its unacknowledged task returns to the queue
        log.info("data processor stopped")


def run_processor(cfg_values: dict) -> None:
    """Process entry point used by ``qlib-server serve`` when it runs both modules."""
    cfg = ServerConfig(**cfg_values)
    setup_logging(cfg)
    processor = DataProcessor(cfg)
    signal.signal(signal.SIGTERM, lambda *_: processor.stop())
    signal.signal(signal.SIGINT, lambda *_: processor.stop())
    processor.run()
