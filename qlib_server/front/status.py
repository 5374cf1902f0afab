"""The status page of a request handler: ``GET /`` (``static/status.html``, no build step, no asset from
elsewhere), fed each second by the server-sent events of ``GET /status/events``; ``GET /status.json``
is one such view.

A view is the whole fleet: the snapshots every handler and data processor keeps in Redis (see
:mod:`qlib_server.state.fleet`), their Prometheus samples summed, plus the depths of the task queues that
this handler samples from RabbitMQ each second. The page, the events and ``/metrics`` are admitted
like Socket.IO clients (``allowed_networks`` / ``auth_token``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from importlib.resources import files
from typing import Optional

import redis
from flask import Response, request

from ..broker.base import dead_letter_queue, light_queue
from ..errors import QlibServerError
from ..metrics import samples
from ..state import fleet, keys
from . import guard

log = logging.getLogger(__name__)

#: seconds between two views sent to a page, and between two snapshots of this handler
INTERVAL = 1.0


class StatusPage:
    """The page, its events and this handler's snapshot in the fleet."""

    def __init__(self, handler):
        self.handler = handler
        cfg = handler.cfg
        self.identity = {**fleet.identity("handler"), "id": handler.node,
                         "address": f"{cfg.flask_server}:{cfg.flask_port}"}
        self.errors = fleet.ErrorLog(handler.metrics.errors).attach()
        handler.metrics.pending.set_function(lambda: len(handler.pending))
        self.queues = {"task_queue": cfg.task_queue, "light": light_queue(cfg.task_queue),
                       "dead": dead_letter_queue(cfg.task_queue)}
        self.page = (files("qlib_server.front") / "static" / "status.html").read_bytes()
        self.streams = guard.Slots(cfg.max_event_streams, cfg.max_event_streams_per_client, "status event streams",
                                   ("max_event_streams", "max_event_streams_per_client"))
        self.timeout = cfg.transfer_timeout if cfg.async_mode == "gevent" else None
        self._register(handler.app)

    def refusal(self) -> Optional[Response]:
        """None when this HTTP request is admitted, else the 403 to answer it with."""
        if self.handler.admission.admits_http(request.remote_addr, request.headers.get("Authorization"),
                                              request.query_string.decode(errors="replace")):
            return None
        self.handler.metrics.refused_connections.inc()
        log.warning("refused connection from %s", request.remote_addr)
        return guard.answer(403, 1, "forbidden: not in allowed_networks and no valid auth_token")

    def _register(self, app) -> None:
        @app.get("/")
        def status_page():
            return self.refusal() or Response(self.page, mimetype="text/html", headers={"Cache-Control": "no-cache"})

        @app.get("/status.json")
        def status_json():
            return self.refusal() or Response(json.dumps(self.view()), mimetype="application/json")

        @app.get("/status/events")
        def status_events():
            refused = self.refusal()
            if refused is not None:
                return refused
            peer = request.remote_addr
            try:
                free = self.streams.take(peer)
            except guard.Refused as exc:
                return exc.response()

            def stalled():
                log.warning("status events to %s released: the page took nothing of them for %g s "
                            "(transfer_timeout)", peer, self.timeout)

            response = Response(guard.paced(self._events(), self.timeout, stalled), mimetype="text/event-stream",
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            response.call_on_close(free)
            return response

    # -- this handler's snapshot ------------------------------------------------------------------
    def snapshot(self) -> dict:
        return {**self.identity, "time": time.time(),
                "samples": samples(self.handler.metrics.registry), "last_error": self.errors.last}

    def _sample_queues(self) -> None:
        for role, queue in self.queues.items():
            depth = self.handler.publisher.depth(queue)
            if depth is not None:
                self.handler.metrics.queue_messages.labels(role).set(depth)

    def run(self) -> None:
        """Sample the queues and publish this handler's snapshot each second while the handler runs."""
        client, failing = self.handler.registry.redis, False
        while self.handler.responder.running:
            try:
                self._sample_queues()
                fleet.write(client, "handler", self.identity["id"], self.snapshot())
                self.handler.usage.flush(client)
                failing = False
            except (redis.RedisError, QlibServerError) as exc:
                if not failing:
                    log.warning("cannot publish this handler's status (%s); retrying", exc)
                failing = True
            self.handler.socketio.sleep(INTERVAL)
        try:
            fleet.remove(client, "handler", self.identity["id"])
        except redis.RedisError:
            pass  # it expires by itself

    # -- what the page shows ----------------------------------------------------------------------
    def view(self) -> dict:
        """The fleet now: totals of every sample, and a row per handler, processor and worker."""
        own, now = self.snapshot(), time.time()
        try:
            snapshots, fleet_error = fleet.read(self.handler.registry.redis), None
        except redis.RedisError as exc:
            snapshots, fleet_error = [], f"the other processes are not shown: Redis: {exc}"
        snapshots = [s for s in snapshots if s["id"] != own["id"]] + [own]
        totals = fleet.totals(snapshots)
        totals.update({k: v for k, v in own["samples"].items() if k.startswith(fleet.SAMPLED_ONCE)})
        handlers, processors = [], []
        for s in snapshots:
            figures = s.pop("samples")
            row = {**s, "errors": figures.get("qlib_server_errors_total", 0.0)}
            if s["kind"] == "handler":
                handlers.append({**row, "connected": figures.get("qlib_server_connected_clients", 0.0),
                                 "pending": figures.get("qlib_server_requests_pending", 0.0),
                                 "requests": sum(v for k, v in figures.items()
                                                 if k.startswith("qlib_server_requests_total"))})
            else:
                for worker in row["workers"]:
                    worker["seconds"] = max(0.0, now - worker["since"]) if worker["since"] else None
                processors.append({**row, "restarts": figures.get("qlib_server_processor_worker_restarts_total", 0.0)})
        return {"time": now, "node": own["id"], "queues": self.queues, "totals": totals, "fleet_error": fleet_error,
                "handlers": sorted(handlers, key=lambda h: h["started"]),
                "processors": sorted(processors, key=lambda p: p["started"]), "refresh": self._refresh()}

    def _refresh(self) -> dict:
        """The last data refresh's extension of dataset caches (state, total, extended, failed, started,
        finished: see ``worker.updater.extend_caches``), {} before the first one."""
        try:
            found = self.handler.registry.redis.hgetall(keys.REFRESH)
        except redis.RedisError:
            return {}
        out: dict = {}
        for key, value in found.items():
            key, value = key.decode(), value.decode()
            try:
                out[key] = float(value)
            except ValueError:
                out[key] = value
        return out

    def _events(self) -> Iterator[str]:
        yield f"retry: {int(INTERVAL * 1000)}\n\n"
        while self.handler.responder.running:
            yield f"data: {json.dumps(self.view())}\n\n"
            self.handler.socketio.sleep(INTERVAL)
