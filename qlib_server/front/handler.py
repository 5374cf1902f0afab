"""RequestHandler: the Flask-SocketIO front, wiring the listener and the responder together.

Socket.IO events go to the :class:`~qlib_server.front.listener.RequestListener`; results come back through
the :class:`~qlib_server.front.responder.RequestResponder`. HTTP on the same port serves ``/healthz``,
``/readyz``, ``/metrics`` and the status page (:mod:`qlib_server.front.status`). Several handlers may share
one RabbitMQ and Redis: each is a node with an inbox queue, and an answer taken by one node for another
node's client is forwarded there, so a client is always answered by the handler holding its connection
(no Socket.IO message queue).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import time
import uuid
from typing import Callable, Optional
from urllib.parse import parse_qs

import socketio
from flask import Flask, Response, request
from flask_socketio import SocketIO

from .. import inst_processors
from ..admission import Admission
from ..broker import Broker
from ..broker.base import light_queue
from ..config import ServerConfig
from ..expressions import check_expression, qlib_operators
from ..metrics import Metrics
from ..protocol import REQUEST_TYPES, Limits, RequestParser, response, retry_later
from ..state import keys
from ..state.cache import ResultCache
from ..state.registry import SessionRegistry
from ..state.usage import Usage
from . import guard, transfer
from .listener import RequestListener
from .responder import Pending, RequestResponder, waiter
from .status import StatusPage

log = logging.getLogger(__name__)


def make_parser(cfg: ServerConfig) -> RequestParser:
    operators = qlib_operators(cfg.custom_ops)
    limits = Limits(cfg.max_body_bytes, cfg.max_fields, cfg.max_instruments, cfg.max_expression_length,
                    cfg.max_expression_depth)

    def check(text: str) -> str:
        return check_expression(text, operators=operators, max_length=limits.max_expression_length,
                                max_depth=limits.max_expression_depth)

    return RequestParser(cfg.client_version, limits, check, inst_processors.allowed(cfg.inst_processors_allowed))


CLOSE_REPLY_DELAY = 0.5  # 0.1 s still lost 1 CLOSE in 100 under CI load
"""Seconds the server waits before answering a stalling client's WebSocket close frame (see below)."""


def closes_late(environ: dict) -> bool:
    """Whether the client of this WebSocket (its upgrade request's WSGI environ) is one whose disconnect
    races its own writer thread, i.e. pyqlib's stock ``qlib.data.client.Client``: python-engineio's threaded
    client, which opens with long-polling and upgrades (the upgrade carries the session id: ``sid=`` in the
    query) through websocket-client (which sends no User-Agent). Browsers and asyncio clients send a
    User-Agent; clients that open on the WebSocket transport (``qlib_server.client``, ``sim``) carry no
    ``sid``: their close frames are answered at once."""
    if environ.get("HTTP_USER_AGENT"):
        return False
    return "sid" in parse_qs(environ.get("QUERY_STRING", ""))


def answer_close_frames_late(delay: float = CLOSE_REPLY_DELAY) -> None:
    """Answer the WebSocket close frame of each stalling client (:func:`closes_late`) ``delay`` seconds
    late (gevent-websocket, this process); every other close frame is answered at once.

    pyqlib's stock client disconnects with ``engineio.Client.disconnect(abort=True)``, which queues a
    CLOSE packet for its writer thread, closes the WebSocket (waiting for the server's close frame)
    and then empties the writer's queue. If the server's close frame arrives before the writer thread
    has run, the CLOSE packet is thrown away and ``socketio.Client.wait()`` blocks until the writer's
    idle timeout (``max(pingInterval, pingTimeout) + 5`` = 30 s): one pyqlib request in about 30 took
    31 s. A pause well under the client's 1 s wait gives its writer the time it needs (0 of 420 then).
    Other clients would only wait the pause out on each disconnect (0.5 s of an asyncio client's
    one-request session).
    """
    import gevent
    from geventwebsocket import handler as ws_handler
    from geventwebsocket.websocket import WebSocket

    if getattr(ws_handler.WebSocket, "close_reply_delay", None) is not None:
        return

    class LateClosingWebSocket(WebSocket):
        close_reply_delay = delay

        def handle_close(self, header, payload):
            if closes_late(self.environ):
                log.info("answering the close frame of %s %.1f s late (pyqlib's stock client)",
                         self.environ.get("REMOTE_ADDR"), self.close_reply_delay)
                gevent.sleep(self.close_reply_delay)
            return super().handle_close(header, payload)

    ws_handler.WebSocket = LateClosingWebSocket


def send_without_delay() -> None:
    """Turn Nagle's algorithm off on every connection the gevent server accepts (this process).

    gevent's WSGI handler sends a response's headers and its body in two writes. With Nagle's algorithm on, the
    body waits for the client's acknowledgement of the headers, which a client delays by up to 40 ms on a
    connection it keeps open: every HTTP answer after a connection's first (a feature placement, a 409, a
    health check) took 44 ms where it takes 1 ms.
    """
    from geventwebsocket import handler as ws_handler

    served = ws_handler.WebSocketHandler  # what Flask-SocketIO's ``run`` serves with (its methods name the class:
    if getattr(served, "no_delay", False):  # it is patched, not subclassed)
        return
    accept = served.__init__

    def __init__(self, sock, *args, **kwargs):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        accept(self, sock, *args, **kwargs)

    served.__init__ = __init__
    served.no_delay = True


class Packet(socketio.packet.Packet):
    """Socket.IO's packet, telling faster whether an answer holds binary parts: python-socketio walks
    every item of a list with a recursive call, which made a third of the cost of a hot calendar."""

    @classmethod
    def data_is_binary(cls, data) -> bool:
        if isinstance(data, (bytes, bytearray)):
            return True
        items = data if isinstance(data, list) else data.values() if isinstance(data, dict) else ()
        return any(cls.data_is_binary(item) for item in items if not isinstance(item, _SCALARS))


_SCALARS = (str, int, float, type(None))
_ENVELOPE = ["result", "status", "detailed_info"]


class Frames:
    """The Socket.IO text of a successful answer, encoded once per answer object and reused while the
    result cache hands out that same object (its memo: a hot answer is one object for a second).

    ``text(event, envelope)`` is exactly what python-socketio sends for ``emit(event, envelope)`` on the
    default namespace (``2`` + the compact JSON of ``[event, envelope]``); a request id (the envelope's
    last key, see :func:`~qlib_server.protocol.with_id`) is spliced in after the cached prefix. None for
    anything else (errors, answers holding binary parts): those go through ``emit``."""

    SIZE = 256

    def __init__(self) -> None:
        self._by_result: dict[tuple, tuple] = {}  # (event, id(result)) -> (result, prefix)

    def text(self, event: str, envelope: dict) -> Optional[str]:
        if envelope.get("status") != 0 or envelope.get("detailed_info") is not None:
            return None
        names = list(envelope)
        if names != _ENVELOPE and not (len(names) == 4 and names[:3] == _ENVELOPE and names[3] == "id"):
            return None
        result = envelope["result"]
        held = self._by_result.get((event, id(result)))
        if held is None or held[0] is not result:  # held[0] keeps the object alive: its id is not reused
            if Packet.data_is_binary(result):
                return None
            text = "2" + json.dumps([event, {"result": result, "status": 0, "detailed_info": None}],
                                    separators=(",", ":"))
            if len(self._by_result) >= self.SIZE:
                self._by_result.clear()
            held = self._by_result[(event, id(result))] = (result, text[:-2])
        if len(names) == 3:
            return held[1] + "}]"
        return f'{held[1]},"id":{json.dumps(envelope["id"])}}}]'


class RequestHandler:
    """One request-handler process: Socket.IO server, listener, responder and timeout sweeper."""

    def __init__(self, cfg: ServerConfig, registry: SessionRegistry, broker_factory: Callable[[], Broker]):
        self.cfg = cfg
        self.registry = registry
        self.broker_factory = broker_factory
        self.metrics = Metrics()
        self.pending = Pending()
        self.node = uuid.uuid4().hex[:16]
        self.app = Flask("qlib_server")
        if cfg.socketio_message_queue:
            log.warning("socketio_message_queue is no longer needed and is ignored: answers reach the handler "
                        "holding each client through its inbox queue")
        self.socketio = SocketIO(
            self.app, async_mode=cfg.async_mode, max_http_buffer_size=cfg.max_message_bytes,
            cors_allowed_origins=[], logger=False, engineio_logger=False, serializer=Packet,
        )
        self.frames = Frames()
        self._eio_sid = self.socketio.server.manager.eio_sid_from_sid
        self._eio_send = self.socketio.server.eio.send
        self.admission = Admission(cfg.allowed_networks, cfg.auth_token)
        self.publisher = broker_factory()
        self.publisher.declare(cfg.task_queue, cfg.message_queue, cfg.max_deliveries)
        self.publisher.declare_inbox(keys.inbox(self.node), keys.INBOX_EXPIRE)
        self.usage = Usage()  # the dataset caches answers name: what a refresh extends first
        self.cache = ResultCache(registry.redis, cfg.result_cache_ttl, dataset_cache_dir=cfg.dataset_cache_dir,
                                 usage=self.usage)
        self.responder = RequestResponder(self.node, registry, self.metrics, self._emit, self.publisher.publish,
                                          self.pending, cfg.request_timeout, self.cache)
        self.listener = RequestListener(
            make_parser(cfg), registry, self.publisher, cfg.task_queue, self.responder, self.pending,
            self.metrics, self._emit, self.cache, cfg.max_inflight_per_client,
        )
        self._consumer_alive = False
        self._bind()
        self.status = StatusPage(self)
        transfer.register(self)
        guard.install(self.app)  # JSON for every HTTP error; bodies never read past their route's limit

    def _emit(self, event: str, data: dict, sid: str) -> None:
        text = self.frames.text(event, data)
        if text is None:
            self.socketio.emit(event, data, to=sid)
            return
        eio_sid = self._eio_sid(sid, "/")
        if eio_sid is not None:  # None: the client is gone, as emit() would find
            self._eio_send(eio_sid, text)

    # -- Socket.IO and HTTP routes ---------------------------------------------------------------
    def _admit(self, auth: Optional[dict]) -> bool:
        return self.admission.admits(request.remote_addr, auth.get("token") if isinstance(auth, dict) else None)

    def _bind(self) -> None:
        sio, app = self.socketio, self.app

        @sio.on("connect")
        def connect(auth=None):
            if not self._admit(auth):
                self.metrics.refused_connections.inc()
                log.warning("refused connection from %s", request.remote_addr)
                return False
            self.metrics.connected.inc()

        @sio.on("disconnect")
        def disconnect(*_):
            self.metrics.connected.dec()
            sid = request.sid  # type: ignore[attr-defined]  # Flask-SocketIO sets it; Flask's types lack it
            for key in self.pending.drop(sid):
                try:
                    self.registry.discard(key, waiter(self.node, sid))
                except Exception:  # the waiting list expires by itself
                    pass

        for request_type in REQUEST_TYPES:
            sio.on_event(f"{request_type}_request", self._handler_for(request_type))

        @sio.on("*")
        def unknown(event, *_):
            name = event if isinstance(event, str) and event.isidentifier() and len(event) < 40 else "unknown"
            name = name[:-8] if name.endswith("_request") else name
            sid = request.sid  # type: ignore[attr-defined]  # Flask-SocketIO sets it; Flask's types lack it
            sio.emit(f"{name}_response", response(None, 1, f"unknown event {str(event)[:40]!r}; expected one of "
                                                  + ", ".join(f"{t}_request" for t in REQUEST_TYPES)), to=sid)

        @app.get("/healthz")
        def healthz():
            return {"status": "ok"}

        @app.get("/readyz")
        def readyz():
            checks = {"redis": self.registry.ping(), "broker": self.publisher.ping(),
                      "consuming": self._consumer_alive,
                      "processors": all(self.publisher.consumers(q) > 0
                                        for q in (self.cfg.task_queue, light_queue(self.cfg.task_queue)))}
            return {"ready": all(checks.values()), **checks}, 200 if all(checks.values()) else 503

        @app.get("/metrics")
        def metrics():
            return self.status.refusal() or Response(self.metrics.render(), mimetype="text/plain; version=0.0.4")

    def _handler_for(self, request_type: str):
        def handle(payload=None, *_):
            sid = request.sid  # type: ignore[attr-defined]  # Flask-SocketIO sets it; Flask's types lack it
            self.listener.on_request(request_type, sid, payload)

        handle.__name__ = f"on_{request_type}_request"
        return handle

    # -- running -----------------------------------------------------------------------------------
    def _consume(self) -> None:
        self._consumer_alive = True
        try:
            self.responder.consume(self.broker_factory(), self.cfg.message_queue)
        finally:
            self._consumer_alive = False

    def _consume_inbox(self) -> None:
        broker = self.broker_factory()
        broker.declare_inbox(keys.inbox(self.node), keys.INBOX_EXPIRE)
        self.responder.consume(broker, keys.inbox(self.node))

    def _sweep(self) -> None:
        ticks = 0
        while self.responder.running:
            self.socketio.sleep(1.0)
            self.responder.sweep()
            ticks += 1
            if ticks % 5 == 0:
                self.publisher.ping()  # services the publishing connection's heartbeats while idle

    def start_background(self) -> None:
        self.socketio.start_background_task(self._consume)
        self.socketio.start_background_task(self._consume_inbox)
        self.socketio.start_background_task(self._sweep)
        self.socketio.start_background_task(self.status.run)

    def serve(self) -> None:
        """Run the Socket.IO server on ``flask_server:flask_port`` until stopped."""
        if self.cfg.async_mode == "gevent":
            answer_close_frames_late()
            send_without_delay()
        self.start_background()
        log.info("request handler listening on %s:%s (%s)", self.cfg.flask_server, self.cfg.flask_port,
                 self.cfg.async_mode)
        self.socketio.run(self.app, host=self.cfg.flask_server, port=self.cfg.flask_port,
                          allow_unsafe_werkzeug=True, log_output=False)

    def drain(self, grace: float = 10.0) -> None:
        """Stop taking requests, let those in flight be answered for ``grace`` seconds, then answer
        the rest with an error so that no client waits on a server that is going away."""
        self.listener.accepting = False
        deadline = time.monotonic() + grace
        while len(self.pending) and time.monotonic() < deadline:
            self.socketio.sleep(0.05)
        for sid, key, entry in self.pending.older_than(-1.0):
            if self.pending.done(sid, key, every=True) is not None:
                for answer in entry.answers(retry_later(2)):
                    self._emit(f"{entry.request.type}_response", answer, sid)
        self.responder.running = False

    def shutdown_on(self, signum: int) -> None:
        """On ``signum``: drain in the background, then interrupt the main thread to leave :meth:`serve`."""
        def graceful():
            self.drain()
            if self.cfg.async_mode == "gevent":
                self.socketio.stop()  # closes the connections and the WSGI server: serve() returns
            else:
                os.kill(os.getpid(), signal.SIGINT)  # the Werkzeug loop leaves on KeyboardInterrupt

        signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
        signal.signal(signum, lambda *_: self.socketio.start_background_task(graceful))
