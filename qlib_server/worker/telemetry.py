"""What a data processor shows of itself: its metrics on ``processor_metrics_port``, and the snapshot it
writes to the fleet (:mod:`qlib_server.state.fleet`) each second for the status page, with what each
worker computes."""

from __future__ import annotations

import logging
import threading
import time
from multiprocessing.connection import Connection, wait
from socketserver import ThreadingMixIn
from typing import Callable, Optional, cast
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import redis
from prometheus_client import CollectorRegistry, make_wsgi_app

from ..admission import Admission
from ..metrics import ProcessorMetrics, samples
from ..state.fleet import ErrorLog, identity, remove, write

log = logging.getLogger(__name__)

#: a task's outcome by the status of its result
OUTCOMES = {0: "ok", 1: "refused", 2: "failed"}


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *_) -> None:  # one line per scrape would drown the processor's log
        pass


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def serve_metrics(registry: CollectorRegistry, host: str, port: int, admission: Admission) -> Optional[int]:
    """Serve ``registry`` in Prometheus format on ``host:port`` (any path) from a daemon thread, to the
    clients ``admission`` admits. When ``port`` is taken (several processors on one host), a free port
    is used instead; return the port served, or None when none could be bound (logged)."""
    metrics_app = make_wsgi_app(registry)

    def app(environ, start_response):
        if not admission.admits_http(environ.get("REMOTE_ADDR"), environ.get("HTTP_AUTHORIZATION"),
                                     environ.get("QUERY_STRING", "")):
            log.warning("refused connection from %s", environ.get("REMOTE_ADDR"))
            start_response("403 Forbidden", [("Content-Type", "text/plain")])
            return [b"forbidden: not in allowed_networks and no valid auth_token\n"]
        return metrics_app(environ, start_response)

    for candidate in (port, 0):
        try:
            server = make_server(host, candidate, app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler)
            break
        except OSError as exc:
            error = exc
    else:
        log.warning("cannot serve metrics on %s (%s)", host, error)
        return None
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    bound = server.server_address[1]
    log.info("processor metrics on http://%s:%d/%s", host, bound, "" if bound == port else f" ({port} was taken)")
    return bound


def describe(task: dict) -> str:
    """What a task computes, in one short line."""
    args = task.get("args") or {}
    instruments = args.get("instruments")
    if isinstance(instruments, dict) and "market" in instruments:
        filters = len(instruments.get("filter_pipe") or [])
        scope = f"market {instruments.get('market')}" + (f" with {filters} filter(s)" if filters else "")
    else:
        scope = f"{len(instruments or [])} instrument(s)" + (" with spans" if isinstance(instruments, dict) else "")
    if args.get("inst_processors"):
        scope += f" and {len(args['inst_processors'])} inst_processor(s)"
    if task.get("type") == "calendar":
        return f"{args.get('freq')} calendar {args.get('start_time') or '…'} to {args.get('end_time') or '…'}"
    if task.get("type") == "instrument":
        return f"instrument list of {scope}"
    fields = args.get("fields") or [""]
    more = f" and {len(fields) - 1} more field(s)" if len(fields) > 1 else ""
    return f"features {str(fields[0])[:60]}{more} of {scope}"


class ProcessorStatus:
    """What the status page and ``processor_metrics_port`` show of one data processor: its metrics, and
    the task each worker computes. Workers report ``("start", type, key, what, started, deliveries)``
    and ``("done", type, status, seconds, fields_left_to_qlib)``: over a pipe each (:meth:`watch`,
    :meth:`collect`), or by calling :meth:`on_report` (embedded mode)."""

    def __init__(self, cfg, lanes: list[str], count_errors: bool = True):
        self.cfg = cfg
        self.identity = identity("processor")
        self.metrics = ProcessorMetrics()
        self.lanes = lanes  # the lane of each worker slot
        self.current: list[Optional[dict]] = [None] * len(lanes)
        self.sources: list = [None] * len(lanes)  # the pipe each slot reports on
        self._retired: list = []
        self._lock = threading.Lock()
        self.errors = ErrorLog(self.metrics.errors).attach() if count_errors else None
        self.metrics_port: Optional[int] = None
        for lane in set(lanes):
            self.metrics.workers.labels(lane).set(lanes.count(lane))
            self.metrics.busy_workers.labels(lane).set(0)

    # -- what the workers report -------------------------------------------------------------------
    def on_report(self, slot: int, event: tuple, current: bool = True) -> None:
        with self._lock:
            if event[0] == "start":
                _, task_type, key, what, started, deliveries = event
                if deliveries:
                    self.metrics.redeliveries.labels(task_type).inc()
                if current:
                    self.current[slot] = {"type": task_type, "key": key, "what": what, "since": started}
            elif event[0] == "done":
                _, task_type, status, seconds, fallbacks = event
                self.metrics.task_seconds.labels(task_type).observe(seconds)
                self.metrics.engine_fallbacks.inc(fallbacks)
                self.metrics.tasks.labels(task_type, OUTCOMES.get(status, "failed")).inc()
                if current:
                    self.current[slot] = None

    def lost(self, slot: int, outcome: str) -> None:
        """Worker ``slot`` was killed or died: count the task it was computing, if any."""
        with self._lock:
            task, self.current[slot] = self.current[slot], None
            if task is not None:
                self.metrics.tasks.labels(task["type"], outcome).inc()

    def watch(self, slot: int, reader) -> None:
        """From now on worker ``slot`` reports on ``reader`` (the pipe of its previous process retires)."""
        with self._lock:
            if self.sources[slot] is not None:
                self._retired.append(self.sources[slot])
            self.sources[slot] = reader
            self.current[slot] = None

    def collect(self, stop: threading.Event) -> None:
        """Read the workers' pipes until ``stop`` is set."""
        while not stop.is_set():
            with self._lock:
                retired, self._retired = self._retired, []
                slots = {r: i for i, r in enumerate(self.sources) if r is not None and not r.closed}
            for reader in retired:
                reader.close()  # only this thread reads the pipes, so only it closes them
            if not slots:
                stop.wait(0.5)
                continue
            for ready in wait(list(slots), 0.5):
                reader = cast(Connection, ready)  # wait() returns some of the pipes it was given
                try:
                    event = reader.recv()
                except (EOFError, OSError):  # its worker is gone; the supervisor starts another
                    reader.close()
                    continue
                self.on_report(slots[reader], event, current=self.sources[slots[reader]] is reader)

    # -- what the page and the metrics port see -----------------------------------------------------
    def snapshot(self, workers: list[tuple[Optional[int], float]]) -> dict:
        """This processor now, given the (pid, busy since or 0) of each worker slot."""
        busy, now, rows = dict.fromkeys(self.lanes, 0), time.time(), []
        for slot, ((pid, since), lane) in enumerate(zip(workers, self.lanes)):
            busy[lane] += bool(since)
            self.metrics.busy_seconds.labels(str(slot)).set(max(0.0, now - since) if since else 0)
            task = self.current[slot] if since else None
            rows.append({"slot": slot, "lane": lane, "pid": pid, "since": since or None,
                         "task": task and {**task, "since": since}})
        for lane, count in busy.items():
            self.metrics.busy_workers.labels(lane).set(count)
        return {**self.identity, "time": now, "task_queue": self.cfg.task_queue,
                "metrics_port": self.metrics_port, "workers": rows, "samples": samples(self.metrics.registry),
                "last_error": self.errors.last if self.errors else None}

    def run(self, stop: threading.Event, workers: Callable[[], list]) -> None:
        """Serve ``processor_metrics_port``, then publish a snapshot each second until ``stop`` is set."""
        cfg = self.cfg
        if cfg.processor_metrics_port is not None:
            self.metrics_port = serve_metrics(self.metrics.registry, cfg.flask_server, cfg.processor_metrics_port,
                                              Admission(cfg.allowed_networks, cfg.auth_token))
        client = redis.Redis(host=cfg.redis_host, port=cfg.redis_port, db=cfg.redis_task_db,
                             password=cfg.redis_password, socket_timeout=2, socket_connect_timeout=2)
        failing = False
        while not stop.is_set():
            try:
                write(client, "processor", self.identity["id"], self.snapshot(workers()))
                failing = False
            except redis.RedisError as exc:
                if not failing:
                    log.warning("cannot publish this processor's status to Redis (%s); retrying", exc)
                failing = True
            stop.wait(1.0)
        try:
            remove(client, "processor", self.identity["id"])
        except redis.RedisError:
            pass  # it expires by itself
